"""The retrofit stage end to end on a micro model, and its refusals before any training starts."""

import dataclasses
import json

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from pipeline.card import CardError, PretrainSpec, load_card, validate_card
from pipeline.dms.patch import UnsupportedModelError
from pipeline.runner import StageContext
from pipeline.stages import retrofit


def _card(**retro):
    card = load_card("tiny-qwen3")
    settings = dict(
        steps=4, ramp_steps=0, seq_len=128, batch_size=2, schedule_cr=4.0, checkpoint_crs=(2.0, 4.0), lr=1e-2
    )
    r = dataclasses.replace(card.retrofit, **{**settings, **retro})
    return dataclasses.replace(
        card,
        retrofit=r,
        dms=dataclasses.replace(card.dms, window=16, target_cr=4.0),
        build=dataclasses.replace(card.build, kv_block_size=8),
        eval=dataclasses.replace(card.eval, lengths=(128,)),
        perf=dataclasses.replace(card.perf, equal_memory=None),  # sized for the tiny model, not a micro one
        pretrain=PretrainSpec(
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=8,
            intermediate_size=64,
            vocab_size=512,
        ),
    )


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory):
    from pipeline.data.pretrain import build_model
    from pipeline.data.tokenizer import save_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("prepare")
    tok = train_tokenizer(512, n_items=20)
    save_tokenizer(tok, root / "model")
    build_model(_card().pretrain, tok).save_pretrained(root / "model")
    return root


def test_micro_retrofit_writes_checkpoints_and_report(micro_model, tmp_path):
    torch.set_num_threads(1)
    ctx = StageContext(card=_card(), out_dir=tmp_path, inputs={"prepare": micro_model}, reports={})
    report = retrofit.run(ctx)
    assert report["checkpoints"] == {"2": "checkpoints/cr2", "4": "checkpoints/cr4"}
    for rel in report["checkpoints"].values():
        config = json.loads((tmp_path / rel / "config.json").read_text())
        assert config["dms_window_size"] == 16 and config["dms_paged_attention_block_size"] == 8
        assert (tmp_path / rel / "model.safetensors").is_file() and (
            tmp_path / rel / "tokenizer.json"
        ).is_file()
    assert report["steps"] == 4 and report["target_cr"] == 4.0 and report["measured_cr"] >= 1.0
    assert set(report["measured_cr_by_checkpoint"]) == {"2", "4"}
    assert not retrofit.resume_dir(ctx).exists()


def test_ramp_then_hold_makes_the_final_state_the_target_checkpoint(micro_model, tmp_path):
    """With ramp_steps, the target-CR checkpoint is the run's last state (it still meets the target);
    lower CRs keep the state that first reached them. Decisions start at 'evict' (logit ~ +5: scale
    1e-3, offset -5), so the held-out CR is above 4 from the first check."""
    torch.set_num_threads(1)
    card = _card(steps=6, ramp_steps=3)
    evict_all = dataclasses.replace(card.dms, initial_alpha_offset=-5.0, alpha_scale=1e-3)
    card = dataclasses.replace(card, dms=evict_all)
    ctx = StageContext(card=card, out_dir=tmp_path, inputs={"prepare": micro_model}, reports={})
    report = retrofit.run(ctx)
    assert report["checkpoint_step"] == {"2": 1, "4": 6}
    assert report["measured_cr"] >= 4.0


@pytest.mark.parametrize("warm_start", [False, True])
def test_borrowed_warm_start_trains_from_the_base_model(micro_model, tmp_path, warm_start):
    """Borrowed decisions on the random-init micro model evict about half the tokens at step one; with
    the warm start they evict (almost) nothing, so the run starts at CR 1. Adapter runs ignore the key
    (not in their cache key either)."""
    torch.set_num_threads(1)
    card = _card(steps=1, warm_start=warm_start)
    card = dataclasses.replace(card, dms=dataclasses.replace(card.dms, decision="borrowed"))
    ctx = StageContext(card=card, out_dir=tmp_path, inputs={"prepare": micro_model}, reports={})
    report = retrofit.run(ctx)
    assert report["warm_start"] is warm_start
    first_cr = report["first_step"]["train_cr"]
    assert (first_cr < 1.05) if warm_start else (first_cr > 1.3)
    adapter = _card(warm_start=warm_start)
    assert retrofit.settings(adapter, None) == retrofit.settings(_card(warm_start=not warm_start), None)


def test_unsupported_architecture_refused_before_training(tmp_path):
    prepare = tmp_path / "prepare"
    cfg = MistralConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=64,
        architectures=["MistralForCausalLM"],
    )
    MistralForCausalLM(cfg).save_pretrained(prepare / "model")
    ctx = StageContext(card=_card(), out_dir=tmp_path / "out", inputs={"prepare": prepare}, reports={})
    with pytest.raises(UnsupportedModelError, match="MistralForCausalLM"):
        retrofit.run(ctx)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(dms=dict(window=2048)), "dms.window"),
        (dict(dms=dict(target_cr=0.5)), "target_cr"),
        (dict(build=dict(kv_block_size=16)), "kv_block_size"),
        (dict(retrofit=dict(checkpoint_crs=(2.0,))), "must include dms.target_cr"),
        (dict(retrofit=dict(schedule_cr=3.0)), "schedule_cr"),
        (dict(retrofit=dict(ramp_steps=5)), "ramp_steps"),
    ],
)
def test_bad_cards_are_clear_errors(change, message):
    card = _card()
    for section, values in change.items():
        card = dataclasses.replace(card, **{section: dataclasses.replace(getattr(card, section), **values)})
    with pytest.raises(CardError, match=message):
        retrofit.check_card(card)


def test_only_what_training_reads_is_in_the_cache_key():
    card = _card()

    def with_eval(**values):
        changed = dataclasses.replace(card, eval=dataclasses.replace(card.eval, **values))
        return retrofit.settings(changed, None)

    base = retrofit.settings(card, None)
    assert with_eval(max_accuracy_drop=9.0, items_per_task=3) == base  # gate and eval size: no retraining
    assert with_eval(lengths=(64, 4096)) != base  # the synthetic held-out rows are this long


def test_shipped_cards_pass_retrofit_checks():
    for name in ("tiny-qwen3", "smollm2-135m"):
        card = load_card(name)
        validate_card(card)
        retrofit.check_card(card)


def test_local_jsonl_is_read_and_packed(tmp_path, micro_model):
    from transformers import AutoTokenizer

    from pipeline.dms.distill_data import pack_records, read_records, row_batches

    tok = AutoTokenizer.from_pretrained(micro_model / "model")
    path = tmp_path / "traces.jsonl"
    path.write_text("\n".join(json.dumps({"text": " ".join(["a"] * 50)}) for _ in range(10)) + "\n")
    rows = pack_records(tok, read_records(path), 64)
    assert rows.shape == (7, 64)  # 10 records x (50 tokens + EOS) = 510 tokens -> 7 full rows
    batch = row_batches(rows, 3, seed=1)
    assert torch.equal(batch(5), batch(5)) and batch(5).shape == (3, 64)
    path.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match="'messages' \\(chat\\) or 'text'"):
        read_records(path)
