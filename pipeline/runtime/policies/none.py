"""Vanilla: keep every token (the uncompressed baseline)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dms_core.streams import StreamTable
from pipeline.runtime.policies.base import Candidates, EvictionPolicy


@dataclass
class NoEviction(EvictionPolicy):
    name: str = "none"

    def prefill_keep(self, c: Candidates) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones_like(c.flag), c.score

    def place(self, st: StreamTable, layer: int, n: int, width: int, pos: torch.Tensor,
              evict_prev: torch.Tensor | None) -> torch.Tensor:
        return st.take_slots(layer, n, torch.full_like(pos, -1))

    def appends(self, st: StreamTable, layer: int, n: int, pos: torch.Tensor) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bool, device=pos.device)
