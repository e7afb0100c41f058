"""The eviction-policy interface: every policy (DMS, none, window, H2O, TOVA) is a dataclass behind it.

The runner owns the tensors; `dms_core.streams.StreamTable` owns every stream's state (block tables,
lengths, DMS rings, per-slot positions and scores). A policy only decides which tokens stay:
- `decisions`: DMS-style per-token eviction flags from the model's decision logits (None = no learned
  eviction, plain causal attention in prefill);
- prefill, the KV heads of one layer at once (not the hot path): `stored_flags` (eviction flags of a
  stream's stored tokens), `prefill_keep` (which candidates stay), `load` (the policy's own state from
  the survivors);
- decode, all streams of a layer at once, tensors in and out, no host sync: `place` (the slot each new
  token takes: an evicted one in place, or a new one; lengths updated), `appends` (whether the NEXT
  token of each stream will take a new slot, so blocks can be reserved a step ahead), `observe`
  (attention probabilities of the step, only if `needs_probs`).
A policy changes only its own columns of the table (the DMS ring, the attention scores); lengths,
tables and positions change through StreamTable's methods.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from dms_core.rule import RingStep
from dms_core.streams import StreamTable


@dataclass(frozen=True)
class DecodeStep:
    """What every layer of one decode step shares: streams 0..n-1 each take the token at pos [n]
    (int64); widths[layer] block-table columns cover every stream of that layer after it grows
    (StreamTable.widths);
    append_rows int64 [layers, n] the pool row of each stream's next free slot; `ring` the DMS ring
    indices (None without rings)."""

    n: int
    widths: tuple[int, ...]
    pos: torch.Tensor
    append_rows: torch.Tensor
    ring: RingStep | None


@dataclass
class Candidates:
    """The streams of one layer (H of them, one per KV head) after a prefill chunk: each stream's stored
    slots, then the chunk, padded to N.

    pos [H, N] int64; valid [H, N] bool (False on padding); flag [H, N] bool (DMS flags, shifted by
    one); score [H, N] float32 (stored statistics, 0 for new tokens); probs_sum and probs_last [H, N]
    float32 (only for policies that need probabilities, else None): attention the chunk's queries
    (summed over queries and the GQA group) and its last query paid to each token; seen: the tokens each
    stream has seen after the chunk; budget: the request's live-token budget (None: none).
    """

    pos: torch.Tensor
    flag: torch.Tensor
    score: torch.Tensor
    valid: torch.Tensor
    probs_sum: torch.Tensor | None
    probs_last: torch.Tensor | None
    budget: int | None
    seen: int

    def row(self, h: int) -> Candidates:
        """Stream h's valid candidates alone ([1, n]), for policies that decide one stream at a time."""
        keep = self.valid[h]
        pick = lambda t: None if t is None else t[h][keep][None]  # noqa: E731
        return Candidates(pick(self.pos), pick(self.flag), pick(self.score), pick(self.valid),
                          pick(self.probs_sum), pick(self.probs_last), self.budget, self.seen)


class EvictionPolicy(ABC):
    name: str = "policy"
    reads_decisions: bool = False  # uses the model's DMS decision logits (the others skip computing them)
    needs_probs: bool = False  # decode attention must return probabilities (observe)
    tracks_scores: bool = False  # keeps per-slot attention statistics in StreamTable.slot_score
    reconstructs: bool = False  # compresses the context after a reconstruction pass (KVzip)

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

    def ring_size(self) -> int:
        """Entries of the per-stream ring StreamTable keeps for this policy (DMS: window + 1)."""
        return 0

    def budget(self, total_tokens: int) -> int | None:
        """Live tokens a stream may keep for a request of `total_tokens`; None = no fixed budget."""
        return None

    def max_live_tokens(self, total_tokens: int) -> int:
        """Worst-case live tokens per stream for a request of `total_tokens`."""
        b = self.budget(total_tokens)
        return total_tokens if b is None else min(b, total_tokens)

    def expected_live_tokens(self, total_tokens: int, kept_fraction: float) -> int:
        """Live tokens a stream will hold at the end of a request of `total_tokens` (the scheduler's
        admission). kept_fraction: the share of tokens beyond the ring (ring_size) that running streams
        keep, as observed; fixed-size policies know their answer without it."""
        return self.max_live_tokens(total_tokens)

    # -- prefill (one stream) ----------------------------------------------------------------------
    def stored_flags(
        self, st: StreamTable, layer: int, row: int, pos: torch.Tensor, seen: int
    ) -> torch.Tensor:
        """Eviction flags bool [n] of a stream's stored tokens (at positions pos [n]; `seen` so far)."""
        return torch.zeros(pos.shape, dtype=torch.bool, device=pos.device)

    @abstractmethod
    def prefill_keep(self, c: Candidates) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (keep [H, N] bool, new score [H, N] float32) for the candidates (padding: anything)."""

    def load(self, st: StreamTable, layer: int, streams: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
             flag: torch.Tensor, score: torch.Tensor, seen: int) -> None:
        """After a prefill rewrote streams with their survivors: survivor i belongs to stream streams[i],
        lives in pool row rows[i], is the token at pos[i] with flag[i] and score[i]. Set the policy's own
        state."""
        if self.tracks_scores:
            st.slot_score[rows] = score

    # -- decode (every stream of a layer) ----------------------------------------------------------
    @abstractmethod
    def place(
        self, st: StreamTable, layer: int, step: DecodeStep, evict_prev: torch.Tensor | None
    ) -> torch.Tensor:
        """The pool row int64 [n] each stream's new token is written to (an evicted token's, in place, or
        the next free slot's); updates lengths. evict_prev bool [n]: the decision the new token made about
        the previous one (DMS)."""

    def appends(self, st: StreamTable, n: int, pos: torch.Tensor) -> torch.Tensor:
        """bool [layers, n]: whether the token at pos [n] of each of streams 0..n-1 will take a new slot
        rather than reuse one (so its block can be reserved before that step)."""
        return (st.lens[:, :n] < st.budget[:n]).expand(st.num_layers, n)

    def observe(self, st: StreamTable, layer: int, step: DecodeStep, pool_rows: torch.Tensor,
                live: torch.Tensor, probs: torch.Tensor) -> None:
        """Attention probabilities float32 [n, L] of this decode step over each stream's slots (pool rows
        int64 [n, L], live bool [n, L]; dead entries point at the scratch row)."""
        return None


def fixed_budget(total_tokens: int, cr: float, minimum: int) -> int:
    """Budget of a fixed-size baseline at compression ratio `cr` for a request of `total_tokens`."""
    return max(minimum, math.ceil(total_tokens / cr))


def per_stream(policy_keep, c: Candidates) -> tuple[torch.Tensor, torch.Tensor]:
    """prefill_keep of a policy that decides one stream at a time (policy_keep on [1, n] candidates),
    for all streams of the layer."""
    keep = torch.zeros_like(c.valid)
    score = torch.zeros_like(c.score)
    for h in range(c.valid.shape[0]):
        k, s = policy_keep(c.row(h))
        keep[h, c.valid[h]] = k[0]
        score[h, c.valid[h]] = s[0]
    return keep, score


def keep_top(values: torch.Tensor, k: int, forced: torch.Tensor) -> torch.Tensor:
    """Bool mask keeping `forced` plus the top-k of `values` among the rest (k >= 0)."""
    keep = forced.clone()
    k = min(k, int((~forced).sum()))
    if k > 0:
        rest = values.masked_fill(forced, float("-inf"))
        keep[torch.topk(rest, k).indices] = True
    return keep


def budget_victim(st: StreamTable, layer: int, step: DecodeStep, values: torch.Tensor,
                  exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Reuse row for each stream of the step: -1 (append) while a stream is under its budget, else the
    pool row of the slot with the smallest `values` (a pool-shaped per-slot tensor) among its live slots
    not `exclude`d (bool [n, L], or None). Ties go to the lowest slot."""
    pool_rows, live = st.live_rows(layer, step.n, step.widths[layer])
    candidate = live if exclude is None else live & ~exclude
    victim = torch.where(candidate, values[pool_rows].float(), float("inf")).argmin(dim=1, keepdim=True)
    return torch.where(st.lens[layer, : step.n] >= st.budget[: step.n], pool_rows.gather(1, victim)[:, 0], -1)
