"""H2O: heavy hitters (largest accumulated attention) plus the most recent tokens, fixed budget."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.runtime.policies.base import Candidates, EvictionPolicy, Stream, fixed_budget, keep_top


@dataclass
class H2OPolicy(EvictionPolicy):
    cr: float = 8.0
    recent_fraction: float = 0.5  # share of the budget reserved for the most recent tokens
    name: str = "h2o"
    needs_probs: bool = True

    def budget(self, total_tokens: int) -> int:
        return fixed_budget(total_tokens, self.cr, 2)

    def _recent(self, budget: int) -> int:
        return max(1, int(budget * self.recent_fraction))

    def prefill_keep(self, c: Candidates) -> tuple[torch.Tensor, torch.Tensor]:
        assert c.budget is not None
        score = c.score + c.probs_sum
        recent = self._recent(c.budget)
        forced = c.pos > int(c.pos.max()) - recent
        return keep_top(score, c.budget - int(forced.sum()), forced), score

    def place(self, stream: Stream, new_pos: int, evict_prev: bool) -> int:
        if stream.budget is None or len(stream.pos) < stream.budget:
            return -1
        pos = np.asarray(stream.pos)
        score = stream.score[: len(pos)].copy()
        score[pos >= new_pos - self._recent(stream.budget)] = np.inf  # the recent ones stay
        slot = int(np.argmin(score))
        stream.score[slot] = 0.0
        return slot

    def observe(self, stream: Stream, probs: np.ndarray) -> None:
        stream.score[: len(probs)] += probs
