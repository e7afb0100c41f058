"""The eviction-policy interface: every policy (DMS, none, window, H2O, TOVA) is a dataclass behind it.

The runner owns the tensors and the block pool; a policy only decides, per stream (one sequence, layer
and KV head), which tokens stay:
- `decisions`: DMS-style per-token eviction flags from the model's decision logits (None = no learned
  eviction, plain causal attention in prefill);
- `prefill_keep`: after a prefill chunk, which of the stream's candidate tokens are stored;
- `start`: build the policy's per-stream state from the stored slots;
- `place`: at decode, which slot the new token overwrites in place (-1 = append a slot);
- `observe`: attention probabilities of the step over the stream's slots (only if `needs_probs`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class Stream:
    """One (sequence, layer, KV head) stream: its pool id and per-slot metadata, slot order."""

    id: int
    budget: int | None = None  # live-token budget of fixed-size policies for this request
    pos: list[int] = field(default_factory=list)  # logical position of the token in each slot
    flag: list[bool] = field(default_factory=list)  # DMS: token marked for (delayed) eviction
    score: np.ndarray | None = None  # attention statistics per slot (H2O: accumulated, TOVA: last)
    state: Any = None  # owned by the policy


@dataclass
class Candidates:
    """A stream's tokens after a prefill chunk (stored slots first, then the chunk), N of them.

    pos [N] int64; flag [N] bool (DMS flags, shifted by one); score [N] float32 (stored statistics,
    0 for new tokens); probs_sum [N] and probs_last [N] float32: attention the chunk's queries (summed
    over queries and the GQA group) and its last query paid to each token.
    """

    pos: torch.Tensor
    flag: torch.Tensor
    score: torch.Tensor
    probs_sum: torch.Tensor
    probs_last: torch.Tensor
    budget: int | None


class EvictionPolicy(ABC):
    name: str = "policy"
    needs_probs: bool = False

    def decisions(
        self, logits: torch.Tensor | None, pos: torch.Tensor, num_kv_heads: int
    ) -> torch.Tensor | None:
        """Eviction decisions [B, Hkv, T] bool: entry t decides the fate of token t-1 (before the
        shift by one). logits [B, Hkv, T] or None; pos [B, T] logical positions. None = never."""
        return None

    def bind(self, args: Any) -> EvictionPolicy:
        """This policy resolved against a model (its ModelArgs); raises ValueError if unusable."""
        return self

    def check_block_size(self, block_size: int) -> None:
        """Raise ValueError if the pool's block size does not suit this policy."""
        return None

    def mask_window(self) -> int:
        """Steps a flagged token stays visible (DMS delayed eviction); unused when flags never set."""
        return 0

    def budget(self, total_tokens: int) -> int | None:
        """Live tokens a stream may keep for a request of `total_tokens`; None = no fixed budget."""
        return None

    def max_live_tokens(self, total_tokens: int) -> int:
        """Worst-case live tokens per stream (the scheduler's reservation)."""
        b = self.budget(total_tokens)
        return total_tokens if b is None else min(b, total_tokens)

    @abstractmethod
    def prefill_keep(self, c: Candidates) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (keep [N] bool, new score [N] float32) for the candidates."""

    def start(self, stream: Stream) -> None:
        """(Re)build `stream.state` from its slots after a prefill chunk."""
        stream.state = None

    @abstractmethod
    def place(self, stream: Stream, new_pos: int, evict_prev: bool) -> int:
        """Slot the token at `new_pos` overwrites in place, or -1 to append one. `evict_prev` is the
        decision the new token made about the previous one (DMS)."""

    def observe(self, stream: Stream, probs: np.ndarray) -> None:
        """Attention probabilities [len] of this decode step over the stream's slots."""
        return None


def fixed_budget(total_tokens: int, cr: float, minimum: int) -> int:
    """Budget of a fixed-size baseline at compression ratio `cr` for a request of `total_tokens`."""
    return max(minimum, math.ceil(total_tokens / cr))


def keep_top(values: torch.Tensor, k: int, forced: torch.Tensor) -> torch.Tensor:
    """Bool mask keeping `forced` plus the top-k of `values` among the rest (k >= 0)."""
    keep = forced.clone()
    k = min(k, int((~forced).sum()))
    if k > 0:
        rest = values.masked_fill(forced, float("-inf"))
        keep[torch.topk(rest, k).indices] = True
    return keep
