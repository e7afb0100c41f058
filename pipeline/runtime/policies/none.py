"""Vanilla: keep every token (the uncompressed baseline)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dms_core.streams import StreamTable
from pipeline.runtime.policies.base import Candidates, DecodeStep, EvictionPolicy


@dataclass
class NoEviction(EvictionPolicy):
    name: str = "none"

    def prefill_keep(self, c: Candidates) -> tuple[torch.Tensor, torch.Tensor]:
        return c.valid, c.score

    def place(
        self, st: StreamTable, layer: int, step: DecodeStep, evict_prev: torch.Tensor | None
    ) -> torch.Tensor:
        return st.place(layer, step.n, step.append_rows[layer], None)

    def appends(self, st: StreamTable, n: int, pos: torch.Tensor) -> torch.Tensor:
        return torch.ones((st.num_layers, n), dtype=torch.bool, device=pos.device)
