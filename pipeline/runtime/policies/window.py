"""StreamingLLM: `sinks` first tokens plus the most recent ones, within a fixed budget from a target CR."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dms_core.streams import StreamTable
from pipeline.runtime.policies.base import (
    Candidates,
    DecodeStep,
    EvictionPolicy,
    budget_victim,
    fixed_budget,
    per_stream,
)


@dataclass
class WindowPolicy(EvictionPolicy):
    cr: float = 8.0
    sinks: int = 4
    name: str = "window"

    def budget(self, total_tokens: int) -> int:
        return fixed_budget(total_tokens, self.cr, self.sinks + 1)

    def prefill_keep(self, c: Candidates) -> tuple[torch.Tensor, torch.Tensor]:
        return per_stream(self._keep, c)

    def _keep(self, c: Candidates) -> tuple[torch.Tensor, torch.Tensor]:
        assert c.budget is not None
        recent = c.budget - self.sinks
        order = torch.argsort(c.pos[0], descending=True)
        keep = c.pos[0] < self.sinks
        keep[order[:recent]] = True
        return keep[None], c.score

    def place(
        self, st: StreamTable, layer: int, step: DecodeStep, evict_prev: torch.Tensor | None
    ) -> torch.Tensor:
        # at its budget, a stream overwrites its oldest token that is not a sink
        pool_rows, _ = st.live_rows(layer, step.n, step.widths[layer])
        sink = st.slot_pos[pool_rows] < self.sinks
        reuse = budget_victim(st, layer, step, st.slot_pos, exclude=sink)
        return st.place(layer, step.n, step.append_rows[layer], reuse)
