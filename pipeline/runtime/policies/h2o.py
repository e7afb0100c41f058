"""H2O: heavy hitters (largest accumulated attention) plus the most recent tokens, fixed budget."""

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
class H2OPolicy(EvictionPolicy):
    cr: float = 8.0
    recent_fraction: float = 0.5  # share of the budget reserved for the most recent tokens
    name: str = "h2o"
    needs_probs: bool = True
    tracks_scores: bool = True

    def budget(self, total_tokens: int) -> int:
        return fixed_budget(total_tokens, self.cr, 2)

    def _recent(self, budget: int) -> int:
        return max(1, int(budget * self.recent_fraction))

    def prefill_keep(self, c: Candidates) -> tuple[torch.Tensor, torch.Tensor]:
        return per_stream(self._keep, c)

    def _keep(self, c: Candidates) -> tuple[torch.Tensor, torch.Tensor]:
        assert c.budget is not None
        score = (c.score + c.probs_sum)[0]
        recent = self._recent(c.budget)
        forced = c.pos[0] > int(c.pos.max()) - recent
        return keep_top(score, c.budget - int(forced.sum()), forced)[None], score[None]

    def place(
        self, st: StreamTable, layer: int, step: DecodeStep, evict_prev: torch.Tensor | None
    ) -> torch.Tensor:
        # at its budget, a stream overwrites its lowest-scoring token outside the recent ones
        n = step.n
        pool_rows, _ = st.live_rows(layer, n, step.widths[layer])
        num_recent = (st.budget[:n] * self.recent_fraction).long().clamp_min(1)  # _recent, per stream
        recent = st.slot_pos[pool_rows] >= (step.pos - num_recent)[:, None]
        reuse = budget_victim(st, layer, step, st.slot_score, exclude=recent)
        rows = st.place(layer, n, step.append_rows[layer], reuse)
        st.slot_score[rows] = 0.0  # the new token's attention starts from 0
        return rows

    def observe(self, st: StreamTable, layer: int, step: DecodeStep, pool_rows: torch.Tensor,
                live: torch.Tensor, probs: torch.Tensor) -> None:
        st.slot_score.index_put_((pool_rows,), torch.where(live, probs, 0.0), accumulate=True)
