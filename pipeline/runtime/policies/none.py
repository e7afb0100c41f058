"""Vanilla: keep every token (the uncompressed baseline)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.runtime.policies.base import Candidates, EvictionPolicy, Stream


@dataclass
class NoEviction(EvictionPolicy):
    name: str = "none"

    def prefill_keep(self, c: Candidates) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones_like(c.flag), c.score

    def place(self, stream: Stream, new_pos: int, evict_prev: bool) -> int:
        return -1
