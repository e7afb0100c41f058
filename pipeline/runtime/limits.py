"""EngineLimits: what an engine is sized for. The card's `build` section is these limits plus how to build.

No heavy imports: the card loader imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


class LimitsError(ValueError):
    """Limits that no engine can be built with."""


@dataclass(frozen=True)
class EngineLimits:
    """Serving limits (the card's `build` section uses the same names)."""

    max_batch_size: int = 8
    max_input_len: int = 1024
    max_output_len: int = 1024
    kv_block_size: int = 16
    kv_pool_tokens: int = 65536  # tokens per (layer, KV head), summed over all streams

    @classmethod
    def from_mapping(cls, values: Any) -> EngineLimits:
        """From a dict or any object with these attributes (e.g. the card's BuildSpec)."""
        names = [f.name for f in fields(cls)]
        if isinstance(values, dict):
            unknown = sorted(set(values) - set(names))
            if unknown:
                raise LimitsError(f"unknown engine limits {unknown}; allowed: {names}")
            got = values
        else:
            got = {n: getattr(values, n) for n in names if hasattr(values, n)}
        limits = cls(**{n: int(v) for n, v in got.items()})
        limits.validate()
        return limits

    def validate(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise LimitsError(f"engine limit {f.name} must be positive, got {getattr(self, f.name)}")
        if self.kv_pool_tokens < self.kv_block_size:
            raise LimitsError("kv_pool_tokens must hold at least one block (>= kv_block_size)")
