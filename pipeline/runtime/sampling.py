"""Sampling settings and the sampler: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None  # None: up to the engine's max_output_len
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def validate(self) -> None:
        """ValueError naming the field for anything the sampler cannot take: non-finite, denormal or
        out-of-range numbers, and non-integers where counts and ids belong (requests come from clients)."""
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 1)
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if 0 < self.temperature < MIN_TEMPERATURE:  # logits / 2e-38 overflow to inf, softmax gives NaN
            raise ValueError(
                f"temperature {self.temperature} is too small to sample with; use 0 for greedy decoding or "
                f"at least {MIN_TEMPERATURE}"
            )
        _check_int("top_k", self.top_k, 0, note=" (0 = off)")
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:  # NaN fails the comparison too
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None:
            _check_int("seed", self.seed, 0, 2**64 - 1)
        for token in self.stop_token_ids:
            _check_int("stop_token_ids", token, 0)


MIN_TEMPERATURE = 1e-3


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_int(name: str, value: object, low: int, high: int | None = None, note: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high and value > high):
        allowed = f"between {low} and {high}" if high else f">= {low}"
        raise ValueError(f"{name} must be an integer {allowed}{note}, got {value!r}")


def sample_batch(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """One token per row of logits [S, V] (float32, on the engine's device). Returns int64 [S] there.

    Greedy rows take the argmax. Sampled rows are tempered, cut to top-k and top-p (each row its own
    settings), and drawn by inverse CDF from one uniform number per row, taken from the request's own
    generator (or torch's global one): a seeded request gets the same tokens whatever it is batched with.
    """
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if p.temperature > 0.0]
    if not sampled:
        return tokens
    dev = logits.device
    rows = torch.tensor(sampled, device=dev)
    picked = [params[i] for i in sampled]
    temperature = torch.tensor([p.temperature for p in picked], device=dev)
    x = logits[rows].float() / temperature[:, None]
    order = torch.sort(x, dim=-1, descending=True)
    top_k = torch.tensor([p.top_k if p.top_k > 0 else x.shape[-1] for p in picked], device=dev)
    kth = order.values.gather(1, (top_k.clamp(max=x.shape[-1]) - 1)[:, None])
    probs = torch.softmax(x.masked_fill(x < kth, float("-inf")), dim=-1)
    top_p = torch.tensor([p.top_p for p in picked], device=dev)
    if any(p.top_p < 1.0 for p in picked):
        sorted_probs = probs.gather(1, order.indices)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= top_p[:, None], 0.0)
        probs = torch.zeros_like(probs).scatter(1, order.indices, sorted_probs)
    uniform = torch.stack([torch.rand((), generator=generators[i]) for i in sampled]).to(dev)
    cdf = torch.cumsum(probs, dim=-1)
    drawn = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True)[:, 0]
    tokens[rows] = drawn.clamp(max=x.shape[-1] - 1)
    return tokens
