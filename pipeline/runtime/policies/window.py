"""StreamingLLM: `sinks` first tokens plus the most recent ones, within a fixed budget from a target CR."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from pipeline.runtime.policies.base import Candidates, EvictionPolicy, Stream, fixed_budget


@dataclass
class WindowPolicy(EvictionPolicy):
    cr: float = 8.0
    sinks: int = 4
    name: str = "window"

    def budget(self, total_tokens: int) -> int:
        return fixed_budget(total_tokens, self.cr, self.sinks + 1)

    def prefill_keep(self, c: Candidates) -> tuple[torch.Tensor, torch.Tensor]:
        assert c.budget is not None
        recent = c.budget - self.sinks
        order = torch.argsort(c.pos, descending=True)
        keep = c.pos < self.sinks
        keep[order[:recent]] = True
        return keep, c.score

    def start(self, stream: Stream) -> None:
        recent = [s for s, p in enumerate(stream.pos) if p >= self.sinks]
        stream.state = deque(sorted(recent, key=lambda s: stream.pos[s]))

    def place(self, stream: Stream, new_pos: int, evict_prev: bool) -> int:
        ring: deque[int] = stream.state
        slot = -1
        if stream.budget is not None and len(stream.pos) >= stream.budget and ring:
            slot = ring.popleft()
        ring.append(len(stream.pos) if slot < 0 else slot)
        return slot
