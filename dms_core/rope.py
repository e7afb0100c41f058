"""RoPE frequencies: plain and llama3-scaled (the `llama-3.2-1b` card's checkpoints need the scaling).

One function for the torch engine, the HF patch's tests and the TensorRT-LLM model class, so a model
is never run with frequencies other than the ones it was trained with.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """float32 [head_dim / 2] inverse frequencies. scaling: None (plain) or a llama3 rope dict
    (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is not None:  # llama3: low frequencies divided by `factor`, a smooth ramp in between
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return inv.float()


def rope_scaling_of(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, llama3 scaling or None) from an HF config.json (transformers 4 `rope_theta`/`rope_scaling`
    or 5 `rope_parameters`) or a TensorRT-LLM one (`rotary_base`/`rotary_scaling`). Raises ValueError
    for a scaling type other than default or llama3."""
    params = dict(config.get("rope_parameters") or {})
    theta = params.get("rope_theta", config.get("rope_theta", config.get("rotary_base", 10000.0)))
    scaling = config.get("rope_scaling") or config.get("rotary_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ("default", "llama3"):
            raise ValueError(f"rope scaling type {kind!r} is not supported (default or llama3 only)")
        if kind == "default":
            scaling = None
    return float(theta), scaling
