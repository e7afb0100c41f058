"""`DmsConfig`: NVIDIA's `dms_*` checkpoint keys, their defaults, and the one test of "is this DMS".

docs/dms.md section 7. A checkpoint is a DMS checkpoint when its config carries `dms_window_size`; its
other keys default as below when absent. Read from an HF config.json (a dict), a transformers or
TensorRT-LLM config object (attributes), written back as dms_* keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

PREFIX = "dms_"


@dataclass(frozen=True)
class DmsConfig:
    window_size: int = 512
    separate_alpha: bool = False  # True: adapter on the residual stream; False: borrowed query channel
    alpha_per: str = "head"  # "head" or "layer" (one decision shared by the KV heads of a layer)
    alpha_scale: float = 100.0
    initial_alpha_offset: float = 5.0
    tau: float = 0.1  # Gumbel-sigmoid temperature (training only)
    disable_eviction: bool = False
    cr: float = 8  # the compression ratio the checkpoint was trained for (informational)
    paged_attention_block_size: int = 256
    chunked_prefill: int | None = None
    preallocate_for_tokens: int = 4096

    def __post_init__(self) -> None:
        if self.alpha_per not in ("head", "layer"):
            raise ValueError(f"dms_alpha_per must be 'head' or 'layer', got {self.alpha_per!r}")
        if self.window_size < 1:
            raise ValueError(f"dms_window_size must be >= 1, got {self.window_size}")

    @staticmethod
    def is_dms(config: Mapping[str, Any] | Any) -> bool:
        """Whether a config (dict or object) describes a DMS checkpoint."""
        return _get(config, PREFIX + "window_size") is not None

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | Any) -> DmsConfig | None:
        """The dms_* keys of a config (dict or object), defaults filled in; None for a plain model."""
        return cls.read(config) if cls.is_dms(config) else None

    @classmethod
    def read(cls, config: Mapping[str, Any] | Any) -> DmsConfig:
        """Whatever dms_* keys a config has, defaults for the rest (also for a plain model being made a
        DMS one)."""
        values = {}
        for name, convert in _TYPES.items():
            value = _get(config, PREFIX + name)
            if value is not None:
                values[name] = convert(value)
        return cls(**values)

    def to_hf_config(self) -> dict[str, Any]:
        """Every dms_* key with its value (what a saved DMS checkpoint's config.json carries)."""
        return {PREFIX + name: value for name, value in asdict(self).items()}


# JSON and config objects carry ints for floats and the like: each key read back as its field's type.
_TYPES: dict[str, Any] = {
    "window_size": int,
    "separate_alpha": bool,
    "alpha_per": str,
    "alpha_scale": float,
    "initial_alpha_offset": float,
    "tau": float,
    "disable_eviction": bool,
    "cr": float,
    "paged_attention_block_size": int,
    "chunked_prefill": int,
    "preallocate_for_tokens": int,
}
assert set(_TYPES) == {f.name for f in fields(DmsConfig)}


def _get(config: Mapping[str, Any] | Any, key: str) -> Any:
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)
