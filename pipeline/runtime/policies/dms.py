"""DMS: learned per-head decisions with delayed eviction (docs/dms.md section 5).

Each stream keeps a ring of its last window+1 tokens' slots (`dms_core.rule.ring_place_`): a new
token's decision sets the flag of the previous token (shift by one); the oldest ring entry leaves the
window, and if it is flagged the new token takes its slot in place, otherwise the stream grows by one.

`force_cr` replaces the learned decisions by a fixed pattern that keeps one token in `force_cr`
(benchmarks and tests on models without trained DMS weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from dms_core import rule
from dms_core.streams import StreamTable
from pipeline.runtime.policies.base import Candidates, DecodeStep, EvictionPolicy


@dataclass
class DMSPolicy(EvictionPolicy):
    window: int | None = None  # None: the checkpoint's dms_window_size
    force_cr: float | None = None
    name: str = "dms"
    reads_decisions: bool = True

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
        return rule.evicts(logits)

    def bind(self, args: Any) -> DMSPolicy:
        policy = self
        if policy.window is None:
            if args.dms is None:
                raise ValueError("DMSPolicy on a plain checkpoint needs an explicit window=")
            policy = replace(policy, window=args.dms.window_size)
        if policy.force_cr is None and args.dms is None:
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

    def ring_size(self) -> int:
        return self._window() + 1

    def expected_live_tokens(self, total_tokens: int, kept_fraction: float) -> int:
        # the ring of window + 1 tokens always stays; of the older ones, what streams keep so far
        ring = self.ring_size()
        return min(total_tokens, ring + math.ceil(max(0, total_tokens - ring) * kept_fraction))

    # -- prefill ---------------------------------------------------------------------------------
    def stored_flags(
        self, st: StreamTable, layer: int, row: int, pos: torch.Tensor, seen: int
    ) -> torch.Tensor:
        return rule.stored_evicted(st.ring_flag[layer, row], pos, seen)

    def prefill_keep(self, c: Candidates) -> tuple[torch.Tensor, torch.Tensor]:
        return c.valid & rule.survivors(c.pos, c.flag, c.seen, self._window()), c.score

    def load(self, st: StreamTable, layer: int, streams: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
             flag: torch.Tensor, score: torch.Tensor, seen: int) -> None:
        rule.ring_load_(st.ring_row[layer], st.ring_flag[layer], streams, pos, flag, rows, seen)

    # -- decode ----------------------------------------------------------------------------------
    def place(
        self, st: StreamTable, layer: int, step: DecodeStep, evict_prev: torch.Tensor | None
    ) -> torch.Tensor:
        return rule.ring_place_(
            st.ring_row[layer], st.ring_flag[layer], st.lens[layer], step.ring, step.append_rows[layer],
            evict_prev,
        )

    def appends(self, st: StreamTable, n: int, pos: torch.Tensor) -> torch.Tensor:
        return rule.ring_appends(st.ring_flag, rule.RingStep.at(st.row_index[:n], pos, st.ring_size))
