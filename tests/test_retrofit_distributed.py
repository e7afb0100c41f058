"""The retrofit stage with two training processes: torchrun + FSDP2 on gloo, as on a GPU node but on CPU."""

import dataclasses
import json

import pytest
import torch
import yaml

from pipeline.card import CARDS_DIR, load_card
from pipeline.dms.checkpoint import load_dms_model
from pipeline.runner import StageContext
from pipeline.stages import retrofit

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")

MICRO = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 8,
         "intermediate_size": 64, "vocab_size": 512}


def _card_file(tmp_path, decision="borrowed", **retro):
    """tiny-qwen3 shrunk to a micro model and a 4-step run, written as a card file (the worker
    processes load the card by path, as they do for a user's card)."""
    raw = yaml.safe_load((CARDS_DIR / "tiny-qwen3.yaml").read_text())
    raw["pretrain"].update(MICRO)
    raw["retrofit"].update(dict(steps=4, ramp_steps=0, seq_len=128, batch_size=1, schedule_cr=4.0,
                                checkpoint_crs=[2.0, 4.0], lr=1e-2, **retro))
    # Borrowed decisions train the attention weights themselves: the case where the teacher forward must
    # swap the frozen originals into FSDP-sharded parameters.
    raw["dms"].update(window=16, target_cr=4.0, decision=decision)
    raw["build"]["kv_block_size"] = 8
    raw["eval"]["lengths"] = [128]
    raw["perf"].pop("equal_memory", None)  # sized for the tiny model: a micro model never fills it
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_card(str(path))


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory):
    from pipeline.data.pretrain import build_model
    from pipeline.data.tokenizer import save_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("prepare")
    tok = train_tokenizer(512, n_items=20)
    save_tokenizer(tok, root / "model")
    build_model(_card_file(root).pretrain, tok).save_pretrained(root / "model")
    return root


def test_two_processes_train_and_save_loadable_checkpoints(micro_model, tmp_path):
    card = _card_file(tmp_path, nproc_per_node=2)
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(card=card, out_dir=out, inputs={"prepare": micro_model}, reports={})
    report = retrofit.run(ctx)
    assert report["processes"] == 2 and report["steps"] == 4
    assert report["checkpoints"] == {"2": "checkpoints/cr2", "4": "checkpoints/cr4"}
    assert report["measured_cr"] >= 1.0 and report["final_loss"] == pytest.approx(report["final_loss"])
    assert report["warm_start"] and report["first_step"]["train_cr"] < 1.05  # sharded q_proj rows zeroed
    for rel in report["checkpoints"].values():
        config = json.loads((out / rel / "config.json").read_text())
        assert config["dms_window_size"] == 16
        model = load_dms_model(out / rel)  # gathered from both shards: every weight present
        assert sum(p.numel() for p in model.parameters()) > 0
    # Trained: the attention weights moved away from the prepared model's.
    from safetensors.torch import load_file

    before = load_file(micro_model / "model" / "model.safetensors")
    after = load_file(out / "checkpoints" / "cr4" / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(before[name], after[name])
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert not retrofit.resume_dir(ctx).exists()


def test_two_processes_train_adapters_from_the_residual_stream(micro_model, tmp_path):
    """Adapter decisions under FSDP2: the pre-hook that hands each layer's residual input to its adapter
    works on sharded layers; only the adapters move."""
    from safetensors.torch import load_file

    card = _card_file(tmp_path, decision="adapter", nproc_per_node=2)
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(card=card, out_dir=out, inputs={"prepare": micro_model}, reports={})
    report = retrofit.run(ctx)
    assert report["processes"] == 2 and report["decision"] == "adapter"
    before = load_file(micro_model / "model" / "model.safetensors")
    after = load_file(out / "checkpoints" / "cr4" / "model.safetensors")
    assert after["model.layers.0.self_attn.dms_proj_alpha.weight"].abs().sum() > 0
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(before[name], after[name])


def test_a_failing_worker_group_names_the_fix(micro_model, tmp_path):
    card = _card_file(tmp_path, nproc_per_node=2)
    missing = {"prepare": tmp_path / "missing"}
    ctx = StageContext(card=card, out_dir=tmp_path / "out", inputs=missing, reports={})
    with pytest.raises(RuntimeError, match="nproc_per_node: 1"):
        retrofit.run(ctx)


def test_nproc_zero_means_one_per_gpu():
    card = load_card("tiny-qwen3")
    zero = dataclasses.replace(card, retrofit=dataclasses.replace(card.retrofit, nproc_per_node=0))
    assert retrofit.processes(zero) == max(1, torch.cuda.device_count())
    assert retrofit.processes(card) == 1
