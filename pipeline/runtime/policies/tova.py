"""TOVA: drop the token the current query attends to least (averaged over the GQA group), fixed budget."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.runtime.policies.base import Candidates, EvictionPolicy, Stream, fixed_budget, keep_top


@dataclass
class TOVAPolicy(EvictionPolicy):
    cr: float = 8.0
    name: str = "tova"
    needs_probs: bool = True

    def budget(self, total_tokens: int) -> int:
        return fixed_budget(total_tokens, self.cr, 2)

    def prefill_keep(self, c: Candidates) -> tuple[torch.Tensor, torch.Tensor]:
        assert c.budget is not None
        forced = c.pos == int(c.pos.max())  # the newest token has no score from its own query yet
        return keep_top(c.probs_last, c.budget - 1, forced), c.probs_last

    def place(self, stream: Stream, new_pos: int, evict_prev: bool) -> int:
        if stream.budget is None or len(stream.pos) < stream.budget:
            return -1
        # one step behind TOVA's paper order: the previous query's weights pick the victim, so the
        # new token can take its slot before this step's attention runs
        slot = int(np.argmin(stream.score[: len(stream.pos)]))
        stream.score[slot] = np.inf  # the new token is kept until its own query scores it
        return slot

    def observe(self, stream: Stream, probs: np.ndarray) -> None:
        stream.score[: len(probs)] = probs
