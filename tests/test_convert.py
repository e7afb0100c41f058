"""HF (DMS) -> TensorRT-LLM checkpoint -> HF again: exact weights, engine logits equal HF, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.convert.checkpoint import read_checkpoint, to_hf, write_hf_dir
from pipeline.convert.export import convert_checkpoint, read_hf_tensors
from pipeline.convert.names import ConversionError
from tests.tiny_models import make_hf

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def qwen_dms(tmp_path_factory):
    return make_hf(tmp_path_factory.mktemp("hf") / "qwen3_dms", "qwen3", "borrowed")


def _hf_state(hf_dir):
    return read_hf_tensors(hf_dir)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize(
    "family,dms,tie", [("qwen3", "borrowed", False), ("qwen3", "adapter", True), ("llama", "adapter", False)]
)
def test_weights_round_trip_exactly(tmp_path, family, dms, tie, tp):
    hf = make_hf(tmp_path / "hf", family, dms, tie=tie)
    summary = convert_checkpoint(hf, tmp_path / "ckpt", tp_size=tp, dtype="float32", log=lambda *_: None)
    assert summary["tp_size"] == tp and summary["dms_decision"] == dms and summary["dms_eviction"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted(
        ["config.json", *[f"rank{r}.safetensors" for r in range(tp)]]
    )
    cfg, state = to_hf(read_checkpoint(tmp_path / "ckpt"))
    original = _hf_state(hf)
    if tie:
        original.pop("lm_head.weight", None)
    assert set(state) == set(original)
    for name, tensor in original.items():
        assert torch.equal(state[name], tensor), name
    assert cfg["dms_separate_alpha"] == (dms == "adapter") and cfg["dms_window_size"] == 8


def test_tp8_shards_and_merges(tmp_path):
    hf = make_hf(tmp_path / "hf", "qwen3", "adapter", kv_heads=8)  # 8 query heads, 8 KV heads
    convert_checkpoint(hf, tmp_path / "ckpt", tp_size=8, dtype="float32", log=lambda *_: None)
    ckpt = read_checkpoint(tmp_path / "ckpt")
    assert ckpt.tp_size == 8
    _, state = to_hf(ckpt)
    for name, tensor in _hf_state(hf).items():
        assert torch.equal(state[name], tensor), name


def test_adapter_is_sharded_by_kv_head(tmp_path):
    hf = make_hf(tmp_path / "hf", "qwen3", "adapter", kv_heads=4)
    convert_checkpoint(hf, tmp_path / "ckpt", tp_size=2, dtype="float32", log=lambda *_: None)
    full = _hf_state(hf)["model.layers.1.self_attn.dms_proj_alpha.weight"]  # [Hkv=4, hidden]
    for rank in range(2):
        part = load_file(tmp_path / "ckpt" / f"rank{rank}.safetensors")
        got = part["transformer.layers.1.attention.dms_proj_alpha.weight"]
        assert torch.equal(got, full[2 * rank : 2 * rank + 2])  # the rank's own two KV heads
        # the rank's qkv holds its 4 query heads (2 GQA groups), each group's first head first
        q = _hf_state(hf)["model.layers.1.self_attn.q_proj.weight"]
        qkv = part["transformer.layers.1.attention.qkv.weight"]
        assert torch.equal(qkv[:32], q[32 * rank : 32 * rank + 32])


@pytest.mark.parametrize("tp", [1, 2])
def test_engine_from_checkpoint_matches_hf_dms_logits(qwen_dms, tmp_path, tp):
    from pipeline.convert.roundtrip import roundtrip_max_abs_diff

    convert_checkpoint(qwen_dms, tmp_path / "ckpt", tp_size=tp, dtype="float32", log=lambda *_: None)
    diff = roundtrip_max_abs_diff(qwen_dms, tmp_path / "ckpt", num_tokens=24, kv_block_size=4)
    assert diff < 1e-4
    # ...and that agreement means evicting alike: over these 24 tokens (window 8) the same engine with
    # eviction off is far away, so a conversion that lost the DMS settings could not have matched.
    from pipeline.convert.roundtrip import engine_logits

    ids = torch.randint(0, 64, (24,), generator=torch.Generator().manual_seed(0)).tolist()  # as above
    dms = engine_logits(tmp_path / "ckpt", ids, 12, kv_block_size=4)
    off = engine_logits(tmp_path / "ckpt", ids, 12, kv_block_size=4, policy="none")
    assert (dms - off).abs().max() > 1e-2


def test_converted_dir_loads_in_transformers(qwen_dms, tmp_path):
    """The HF directory rebuilt from TensorRT-LLM's config alone gives the original's logits."""
    import transformers

    convert_checkpoint(qwen_dms, tmp_path / "ckpt", tp_size=2, dtype="float32", log=lambda *_: None)
    back = write_hf_dir(tmp_path / "ckpt", tmp_path / "back")
    ids = torch.randint(0, 64, (1, 12))
    a = transformers.Qwen3ForCausalLM.from_pretrained(qwen_dms).eval()(ids).logits
    b = transformers.Qwen3ForCausalLM.from_pretrained(back).eval()(ids).logits
    assert torch.allclose(a, b, atol=1e-6)


def test_bf16_checkpoint_is_modelopts_bytes(qwen_dms, tmp_path):
    convert_checkpoint(qwen_dms, tmp_path / "ckpt", tp_size=1, dtype="bfloat16", log=lambda *_: None)
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    tensors = load_file(tmp_path / "ckpt" / "rank0.safetensors")
    assert cfg["dtype"] == "bfloat16" and all(t.dtype == torch.bfloat16 for t in tensors.values())


def test_plain_model_converts_with_eviction_off(tmp_path):
    hf = make_hf(tmp_path / "hf", "llama", dms=None)
    said = []
    summary = convert_checkpoint(hf, tmp_path / "ckpt", tp_size=1, dtype="float32", log=said.append)
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert summary["dms_eviction"] is False and cfg["dms_disable_eviction"] is True
    assert "dms_window_size" not in cfg  # no window, no borrowed channel: runtimes run the plain model
    assert any("eviction off" in line for line in said)
    from pipeline.convert.roundtrip import roundtrip_max_abs_diff

    assert roundtrip_max_abs_diff(hf, tmp_path / "ckpt", num_tokens=16, kv_block_size=4) < 1e-4


def test_unsupported_tp_sizes(qwen_dms, tmp_path):
    with pytest.raises(ConversionError, match="tp_size 3 is not supported"):
        convert_checkpoint(qwen_dms, tmp_path / "a", tp_size=3, log=lambda *_: None)
    with pytest.raises(ConversionError, match="does not divide num_key_value_heads"):
        convert_checkpoint(qwen_dms, tmp_path / "b", tp_size=8, log=lambda *_: None)


def test_missing_rank_file(qwen_dms, tmp_path):
    convert_checkpoint(qwen_dms, tmp_path / "ckpt", tp_size=2, dtype="float32", log=lambda *_: None)
    (tmp_path / "ckpt" / "rank1.safetensors").unlink()
    with pytest.raises(ConversionError, match="rank1.safetensors is missing"):
        read_checkpoint(tmp_path / "ckpt")


def test_corrupted_rank_file(qwen_dms, tmp_path):
    convert_checkpoint(qwen_dms, tmp_path / "ckpt", tp_size=1, dtype="float32", log=lambda *_: None)
    f = tmp_path / "ckpt" / "rank0.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ConversionError, match="corrupted or truncated"):
        to_hf(read_checkpoint(tmp_path / "ckpt"))


def test_rank_file_with_wrong_names(qwen_dms, tmp_path):
    from safetensors.torch import save_file

    convert_checkpoint(qwen_dms, tmp_path / "ckpt", tp_size=1, dtype="float32", log=lambda *_: None)
    f = tmp_path / "ckpt" / "rank0.safetensors"
    tensors = load_file(f)
    tensors["transformer.layers.0.mlp.fc_typo.weight"] = tensors.pop("transformer.layers.0.mlp.fc.weight")
    save_file(tensors, f)
    with pytest.raises(ConversionError, match="does not match the config"):
        to_hf(read_checkpoint(tmp_path / "ckpt"))


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ConversionError, match="no config.json"):
        read_checkpoint(tmp_path)
    with pytest.raises(ConversionError, match="not a Hugging Face model directory"):
        convert_checkpoint(tmp_path, tmp_path / "out", log=lambda *_: None)
