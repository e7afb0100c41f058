"""The TensorRT-LLM model class's own math (plugins/trtllm/model.py) against the HF DMS model.

TensorRT-LLM cannot be installed here, so `DmsAttention.project` and the context phase's decisions run
through tests/trtllm_standin.py: a torch stand-in for the few TensorRT-LLM functions and layers they use
(a stand-in for what cannot run here, not a mock of something that could). The decoder layers are wired
by the model class's own `_swap_attention` (which also makes each input_layernorm hand the residual
stream to the adapter). The reference is what the patched HF model hands its attention kernel in hard
mode: q, k after RoPE, v, and the shifted decisions. This fails if the adapter is fed the normalised
hidden states instead of the residual stream, or if RoPE ignores the checkpoint's rotary_scaling.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import make_tiny_hf  # noqa: E402
from trt_pair import trtllm_checkpoint  # noqa: E402
from trtllm_standin import Module, RmsNorm, standin_modules  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
CASES = [("qwen3", "borrowed"), ("qwen3", "adapter"), ("llama", "borrowed"), ("llama", "adapter")]


def _hf_attention_inputs(hf_dir: Path, ids: torch.Tensor):
    """Per layer: (the decoder layer's input x [T, hidden], q [T, Hq, D], k, v [T, Hkv, D], evicted
    [T, Hkv]) as the HF DMS patch computes them in hard mode."""
    from pipeline.dms import patch
    from pipeline.dms.checkpoint import load_dms_model

    model = load_dms_model(hf_dir)
    seen, inputs = [], []
    hooks = [layer.register_forward_pre_hook(lambda m, args: inputs.append(args[0][0]))
             for layer in model.model.layers]  # fmt: skip
    original = patch.hard_attention

    def capture(q, k, v, evicted, window, scaling):
        seen.append((q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), evicted[0].T))
        return original(q, k, v, evicted, window, scaling)

    patch.hard_attention = capture
    try:
        with torch.inference_mode(), patch.dms_mode(model, "hard"):
            model(ids)
    finally:
        patch.hard_attention = original
        for h in hooks:
            h.remove()
    return [(x, *rest) for x, rest in zip(inputs, seen, strict=True)]


def _trtllm_layers(model_module, ckpt: Path):
    """The model class's decoder layers over the checkpoint's weights (stand-in Modules), wired by
    `_DmsMixin._swap_attention` itself."""
    cfg = json.loads((ckpt / "config.json").read_text())
    config = SimpleNamespace(**cfg)
    config.mapping = SimpleNamespace(tp_size=1, tp_group=None)
    weights = load_file(str(ckpt / "rank0.safetensors"))
    layers = []
    for i in range(cfg["num_hidden_layers"]):
        layer = Module()
        layer.input_layernorm = RmsNorm(cfg["hidden_size"], eps=cfg["norm_epsilon"])
        layer.layer_idx = i
        layers.append(layer)
    stub = type("Stub", (model_module._DmsMixin,), {})()
    stub.config, stub.transformer = config, SimpleNamespace(layers=layers)
    stub._swap_attention()
    for i, layer in enumerate(layers):
        for name, p in layer.named_parameters():
            p.value = weights[f"transformer.layers.{i}.{name}"]
    return layers


@pytest.mark.parametrize("family,mode", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_projection_and_context_decisions_match_hf_dms(tmp_path, family, mode):
    hf = make_tiny_hf(tmp_path / "hf", family, dms=mode, window=8, llama3_rope=family == "llama")
    ckpt = trtllm_checkpoint(hf, tmp_path / "ckpt")
    if family == "llama":
        assert json.loads((ckpt / "config.json").read_text())["rotary_scaling"]["type"] == "llama3"
    t = 30
    ids = torch.randint(0, 96, (1, t), generator=torch.Generator().manual_seed(3))
    want = _hf_attention_inputs(hf, ids)
    pos = torch.arange(t, dtype=torch.int32)
    evictable = torch.ones(t, dtype=torch.int32)
    evictable[-1] = 0  # the sequence's last token: its decision comes with the next token
    with standin_modules() as model_module, torch.inference_mode():
        layers = _trtllm_layers(model_module, ckpt)
        for layer, (x, q_hf, k_hf, v_hf, evicted_hf) in zip(layers, want, strict=True):
            h = layer.input_layernorm(x)  # as TensorRT-LLM's decoder layer calls it
            q, k, v, logit = layer.attention.project(h, pos)
            for name, got, ref in (("q", q, q_hf), ("k", k, k_hf), ("v", v, v_hf)):
                assert (got - ref).abs().max() < 1e-5, name
            evicted = layer.attention.context_evicted(logit, evictable)
            assert evicted.dtype == torch.int32 and torch.equal(evicted.bool(), evicted_hf)
            assert (
                0 < int(evicted.sum()) < evicted.numel() - 1
            )  # decisions both ways: the check means something
