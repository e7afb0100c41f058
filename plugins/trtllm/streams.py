"""Host bookkeeping of the per-head DMS pool for the TensorRT engines (numpy only; no pipeline imports).

One `LayerStreams` per (rank, layer): a free list of pool blocks and, per stream (sequence, KV head), its
block table, its live slots and the ring of the last window + 1 tokens with their eviction flags
(dms-spec.md section 5). It produces the engine inputs `dms_write_rows_L`, `dms_block_tables_L`,
`dms_stream_lens_L` before a generation step, and reads `dms_logit_L` after it:

    rows = ls.plan_step(streams)            # where each stream's new token goes (before the call)
    ... engine call ...
    ls.record_decisions(streams, logits)    # logit > 0: the PREVIOUS token is evicted (shift by one)

After the context call, `ls.admit(stream, evicted)` keeps the survivors (in the ring, or not evicted) and
returns the rows to copy each survivor's K/V into.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass
class _Stream:
    blocks: list[int] = field(default_factory=list)
    slot_of: dict[int, int] = field(default_factory=dict)  # position -> slot (live tokens)
    ring: deque = field(default_factory=deque)  # positions of the last window + 1 tokens, oldest first
    evicted: set[int] = field(default_factory=set)  # positions whose flag is set
    length: int = 0  # logical tokens seen


class LayerStreams:
    def __init__(self, num_blocks: int, block_size: int, window: int):
        if block_size >= window:
            raise ValueError(f"block_size {block_size} must be smaller than the window {window}")
        self.block_size, self.window = block_size, window
        self.free = deque(range(num_blocks))
        self.streams: dict[int, _Stream] = {}

    def _row(self, s: _Stream, slot: int) -> int:
        while slot // self.block_size >= len(s.blocks):
            if not self.free:
                raise MemoryError("the DMS pool is full: raise build.kv_pool_tokens or lower the batch")
            s.blocks.append(self.free.popleft())
        return s.blocks[slot // self.block_size] * self.block_size + slot % self.block_size

    def admit(self, stream_id: int, evicted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """After prefill of T tokens: evicted bool [T] (shifted by one; the last is False).
        Returns (positions kept, pool rows to write them to), both int32 [kept]."""
        s = self.streams.setdefault(stream_id, _Stream())
        t = len(evicted)
        ring_start = max(0, t - 1 - self.window)
        keep = [p for p in range(t) if p >= ring_start or not evicted[p]]
        rows = [self._row(s, i) for i in range(len(keep))]
        s.slot_of = {p: i for i, p in enumerate(keep)}
        s.ring = deque(range(ring_start, t))
        s.evicted = {p for p in range(ring_start, t) if evicted[p]}
        s.length = t
        return np.asarray(keep, np.int32), np.asarray(rows, np.int32)

    def plan_step(self, stream_ids: list[int]) -> np.ndarray:
        """Row for each stream's new token: the slot of the token leaving the window if it was evicted
        (reused in place), else the next free slot. int32 [len(stream_ids)]."""
        rows = []
        for sid in stream_ids:
            s = self.streams[sid]
            new = s.length
            slot = len(s.slot_of)
            s.ring.append(new)
            if len(s.ring) > self.window + 1:
                old = s.ring.popleft()
                if old in s.evicted:
                    slot = s.slot_of.pop(old)
                    s.evicted.discard(old)
            s.slot_of[new] = slot
            s.length += 1
            rows.append(self._row(s, slot))
        return np.asarray(rows, np.int32)

    def record_decisions(self, stream_ids: list[int], logits: np.ndarray) -> None:
        """logits [len(stream_ids)] of the new tokens: > 0 marks each stream's previous token evicted."""
        for sid, logit in zip(stream_ids, logits, strict=True):
            s = self.streams[sid]
            if logit > 0 and s.length >= 2:
                s.evicted.add(s.length - 2)

    def tables(self, stream_ids: list[int], max_blocks: int) -> tuple[np.ndarray, np.ndarray]:
        """(block_tables int32 [n, max_blocks], stream_lens int32 [n]) for the decode plugin."""
        table = np.zeros((len(stream_ids), max_blocks), np.int32)
        lens = np.zeros(len(stream_ids), np.int32)
        for i, sid in enumerate(stream_ids):
            s = self.streams[sid]
            table[i, : len(s.blocks)] = s.blocks
            lens[i] = len(s.slot_of)  # live slots stay dense: 0 .. len-1
        return table, lens

    def live_positions(self, stream_id: int) -> dict[int, int]:
        return dict(self.streams[stream_id].slot_of)

    def release(self, stream_id: int) -> None:
        self.free.extend(self.streams.pop(stream_id).blocks)
