"""TOVA: drop the token the current query attends to least (averaged over the GQA group), fixed budget."""

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
    keep_top,
    per_stream,
)


@dataclass
class TOVAPolicy(EvictionPolicy):
    cr: float = 8.0
    name: str = "tova"
    needs_probs: bool = True
    tracks_scores: bool = True

    def budget(self, total_tokens: int) -> int:
        return fixed_budget(total_tokens, self.cr, 2)

    def prefill_keep(self, c: Candidates) -> tuple[torch.Tensor, torch.Tensor]:
        return per_stream(self._keep, c)

    def _keep(self, c: Candidates) -> tuple[torch.Tensor, torch.Tensor]:
        assert c.budget is not None
        forced = c.pos[0] == int(c.pos.max())  # the newest token has no score from its own query yet
        return keep_top(c.probs_last[0], c.budget - 1, forced)[None], c.probs_last

    def place(
        self, st: StreamTable, layer: int, step: DecodeStep, evict_prev: torch.Tensor | None
    ) -> torch.Tensor:
        # one step behind TOVA's paper order: the previous query's weights pick the victim, so the
        # new token can take its slot before this step's attention runs (which then scores it)
        return st.place(layer, step.n, step.append_rows[layer], budget_victim(st, layer, step, st.slot_score))

    def observe(self, st: StreamTable, layer: int, step: DecodeStep, pool_rows: torch.Tensor,
                live: torch.Tensor, probs: torch.Tensor) -> None:
        # dead entries all point at the scratch row: write it with whatever, it is never read as live
        st.slot_score[pool_rows] = torch.where(live, probs, 0.0)
