"""Sampling settings (the sampler itself is dms_core.sampling, shared with the TensorRT host driver)."""

from __future__ import annotations

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
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
