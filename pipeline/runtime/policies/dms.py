"""DMS: learned per-head decisions with delayed eviction (dms-spec.md section 5).

Each stream keeps a ring of its last window+1 tokens' slots. A new token's decision sets the flag of the
previous token (shift by one); the oldest ring entry leaves the window, and if it is flagged the new
token takes its slot in place, otherwise the stream grows by one slot.

`force_cr` replaces the learned decisions by a fixed pattern that keeps one token in `force_cr`
(benchmarks and tests on models without trained DMS weights).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace
from typing import Any

import torch

from pipeline.runtime.policies.base import Candidates, EvictionPolicy, Stream


@dataclass
class DMSPolicy(EvictionPolicy):
    window: int | None = None  # None: the checkpoint's dms_window_size
    force_cr: float | None = None
    name: str = "dms"

    def decisions(self, logits: torch.Tensor | None, pos: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
        if self.force_cr is not None:
            # decision at t about token p = t-1: keep p iff a multiple of 1/cr falls in (p, p+1]
            p = pos - 1
            keep = torch.floor((p + 1) / self.force_cr) > torch.floor(p / self.force_cr)
            keep = keep | (p < 0)
            evict = ~keep  # [B, T]
            return evict[:, None, :].expand(-1, num_kv_heads, -1)
        if logits is None:
            raise ValueError(
                "the DMS policy needs a DMS checkpoint (config.json with dms_* keys); use policy 'none' "
                "or DMSPolicy(force_cr=...) for a plain model"
            )
        return logits > 0  # hard decision at inference: no noise

    def bind(self, args: Any) -> DMSPolicy:
        policy = self
        if policy.window is None:
            if not args.dms:
                raise ValueError("DMSPolicy on a plain checkpoint needs an explicit window=")
            policy = replace(policy, window=args.dms_window)
        if policy.force_cr is None and not args.dms:
            raise ValueError(
                "this checkpoint has no dms_* config keys: use policy 'none', a baseline, or "
                "DMSPolicy(window=..., force_cr=...) to force decisions"
            )
        return policy

    def check_block_size(self, block_size: int) -> None:
        if block_size >= self._window():
            raise ValueError(
                f"kv_block_size ({block_size}) must be smaller than the DMS window ({self.window})"
            )

    def _window(self) -> int:
        assert self.window is not None, "DMSPolicy.window is set by the engine from the checkpoint"
        return self.window

    def mask_window(self) -> int:
        return self._window()

    def prefill_keep(self, c: Candidates) -> tuple[torch.Tensor, torch.Tensor]:
        last = int(c.pos.max())
        # rule.live_after_prefill on compacted candidates: the ring of window+1 tokens, or unflagged
        keep = (c.pos >= last - self._window()) | ~c.flag
        return keep, c.score

    def start(self, stream: Stream) -> None:
        last = max(stream.pos, default=0)
        in_ring = [s for s, p in enumerate(stream.pos) if p >= last - self._window()]
        in_ring.sort(key=lambda s: stream.pos[s])
        stream.state = deque(in_ring)

    def place(self, stream: Stream, new_pos: int, evict_prev: bool) -> int:
        ring: deque[int] = stream.state
        if ring:
            stream.flag[ring[-1]] = evict_prev
        slot = -1
        if len(ring) == self._window() + 1:
            oldest = ring.popleft()
            if stream.flag[oldest]:
                slot = oldest
        ring.append(len(stream.pos) if slot < 0 else slot)
        return slot
