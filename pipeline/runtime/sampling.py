"""Sampling settings (the sampler itself is dms_core.sampling, shared with the TensorRT host driver)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dms_core.sampling import sample_batch  # noqa: F401  (re-exported: the engine's import)


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
