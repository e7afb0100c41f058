"""The decode step at a real model's shape: does its cost stay flat as batch x layers x heads grow?

A random model with the layer and head counts of a named real model (Qwen3-8B: 36 layers, 32 query and
8 KV heads of 128 channels). With `tiny_widths` the hidden size, head_dim, MLP and vocabulary shrink so
that the tensor math is small next to the host work around it (what this measures on a CPU); without,
the real widths (a GPU, in bf16). DMS decisions come from random adapters offset to evict most tokens,
through the learned path the product runs (not forced).

Per method (dms, vanilla) and batch: the median wall time of a decode step (`steps` timed steps after
a `prompt_tokens` prefill and an untimed warm-up step), and the host fraction: the share of a step that
is not spent inside tensor kernels. On CUDA that is 1 - (GPU kernel time / wall time) from a profile; on
CPU, where both run on the same cores, 1 - (self time of the aten ops that touch tensor data / wall
time), with the dispatch overhead inside those ops counted as math: a lower bound on the host share.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.runtime.engine import Engine
from pipeline.runtime.limits import EngineLimits
from pipeline.runtime.model import ModelArgs, Transformer

# aten ops that only describe a tensor (no data touched): their time is host work
METADATA_OPS = {
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided", "aten::select", "aten::slice",
    "aten::expand", "aten::transpose", "aten::t", "aten::unsqueeze", "aten::squeeze", "aten::permute",
    "aten::split", "aten::split_with_sizes", "aten::chunk", "aten::detach", "aten::alias", "aten::unbind",
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::to", "aten::lift_fresh",
    "aten::resolve_conj", "aten::resolve_neg", "aten::flatten", "aten::view_as_real", "aten::narrow",
    "aten::result_type", "aten::is_nonzero",
}  # fmt: skip


@dataclass(frozen=True)
class Shape:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int


SHAPES = {
    "qwen3-8b": Shape(36, 32, 8, 128, 4096, 12288, 151936),
    "qwen3-1.7b": Shape(28, 16, 8, 128, 2048, 6144, 151936),
    "llama-3.2-1b": Shape(16, 32, 8, 64, 2048, 8192, 128256),
}
TINY_WIDTHS = dict(head_dim=8, hidden_size=64, intermediate_size=64, vocab_size=256)
WINDOW, BLOCK = 16, 8  # small enough that a short prompt already evicts


def shape_config(name: str, tiny_widths: bool) -> dict[str, Any]:
    """An HF Qwen3 config.json (with DMS adapter keys) of the named shape."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    s = SHAPES[name].__dict__ | (TINY_WIDTHS if tiny_widths else {})
    return {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "vocab_size": s["vocab_size"],
        "hidden_size": s["hidden_size"],
        "intermediate_size": s["intermediate_size"],
        "num_hidden_layers": s["num_layers"],
        "num_attention_heads": s["num_heads"],
        "num_key_value_heads": s["num_kv_heads"],
        "head_dim": s["head_dim"],
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e6,
        "tie_word_embeddings": False,
        # adapter decisions: logit = proj(norm(x)) - offset with proj ~ N(0, 1): about 7 in 8 evicted
        "dms_window_size": WINDOW,
        "dms_separate_alpha": True,
        "dms_alpha_scale": 1.0,
        "dms_initial_alpha_offset": -1.15,
    }


def random_state(
    config: dict[str, Any], seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Random weights for the config, made where they will run (an 8B model at real widths is 16 GB in
    bf16); adapters scaled so their logits are about N(0, 1)."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_hf_config(config))
    state = {}
    for name, p in model.state_dict().items():
        std = 1.0 / config["hidden_size"] ** 0.5 if "dms_proj_alpha.weight" in name else 0.02
        if "norm" in name:
            state[name] = torch.ones(p.shape, device=device, dtype=dtype)
        else:
            state[name] = (torch.randn(p.shape, device=device, dtype=torch.float32) * std).to(dtype)
    return state


def _host_fraction(engine: Engine, steps: int) -> float:
    from torch.profiler import ProfilerActivity, profile

    cuda = engine.cache.k.device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        if cuda:
            torch.cuda.synchronize()
    wall_us = (time.perf_counter() - start) * 1e6
    events = prof.key_averages()
    if cuda:
        busy = sum(e.self_device_time_total for e in events)
    else:
        data_ops = (e for e in events if e.key.startswith("aten::") and e.key not in METADATA_OPS)
        busy = sum(e.self_cpu_time_total for e in data_ops)
    return max(0.0, 1.0 - busy / wall_us)


def measure(
    config: dict[str, Any], state: dict[str, torch.Tensor], policy: str, batch: int, prompt_tokens: int,
    steps: int, device: str, dtype: str,
) -> dict[str, float]:
    """Median decode-step wall time (ms), host fraction and measured CR of one engine."""
    limits = EngineLimits(
        max_batch_size=batch, max_input_len=prompt_tokens, max_output_len=2 * steps + 8,
        kv_block_size=BLOCK, kv_pool_tokens=batch * (prompt_tokens + 2 * steps + 8 + 2 * BLOCK),
    )  # fmt: skip
    engine = Engine.from_state(config, state, limits, policy=policy, device=device, dtype=dtype)
    g = torch.Generator().manual_seed(batch)
    handles = [
        engine.submit(torch.randint(1, config["vocab_size"], (prompt_tokens,), generator=g).tolist(),
                      max_tokens=2 * steps + 4, ignore_eos=True)
        for _ in range(batch)
    ]  # fmt: skip
    while engine.last_step_kind != "decode":  # prefill every request, then one untimed decode step
        engine.step()
    times = []
    for _ in range(steps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    host = _host_fraction(engine, max(2, steps // 4))
    assert engine.pool_stats()["running"] == batch, "every request still decoding while timed"
    for h in handles:
        h.cancel()
    while engine.has_work():
        engine.step()
    return {
        "step_ms": statistics.median(times) * 1e3,
        "host_fraction": host,
        "compression_ratio": statistics.mean(h.result().stats.get("compression_ratio", 1.0) for h in handles),
    }


def run_shape(
    name: str = "qwen3-8b",
    tiny_widths: bool = True,
    batches: tuple[int, ...] = (8, 64),
    prompt_tokens: int = 32,
    steps: int = 32,
    device: str | None = None,
) -> dict[str, Any]:
    """The `shape` section of bench.json."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    config = shape_config(name, tiny_widths)
    state = random_state(config, device=device, dtype=getattr(torch, dtype))
    out: dict[str, Any] = {
        "name": name, "tiny_widths": tiny_widths, "device": device, "dtype": dtype,
        "prompt_tokens": prompt_tokens, "timed_steps": steps, "window": WINDOW, "block_size": BLOCK,
        "step_ms": {}, "host_fraction": {}, "compression_ratio": {},
    }  # fmt: skip
    for method, policy in (("dms", "dms"), ("vanilla", "none")):
        for key in ("step_ms", "host_fraction", "compression_ratio"):
            out[key][method] = {}
        for batch in batches:
            figures = measure(config, state, policy, batch, prompt_tokens, steps, device, dtype)
            for key, value in figures.items():
                out[key][method][str(batch)] = value
    if len(batches) > 1:
        lo, hi = str(min(batches)), str(max(batches))
        out["step_ratio_largest_over_smallest_batch"] = {
            m: out["step_ms"][m][hi] / out["step_ms"][m][lo] for m in ("dms", "vanilla")
        }
    return out
