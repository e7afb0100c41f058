"""Continuous batching over the block pool (nano-vllm's scheduler, with per-head streams).

Each step either prefills waiting sequences that fit, or decodes every running sequence by one token.

Admission follows what a sequence will really hold at its end, not its uncompressed length: the policy
says how many live tokens a stream of a request of (prompt + max_tokens) keeps (`expected_live_tokens`:
a baseline its budget, vanilla everything, DMS its ring plus the share of older tokens that running
streams keep, measured from the host mirror of their lengths). A waiting sequence is admitted while the
pool's free blocks, less what the running sequences are still expected to take, hold its expectation
and its prompt's worst case. Vanilla is thereby admitted only as far as its whole request fits, so it
never preempts; DMS runs as many sequences as its compression allows.

Before a decode step the blocks it takes are known exactly (the host mirror of the streams' lengths and
growth). When an estimate was wrong and they are not free, the youngest running sequence is preempted
(its blocks freed, requeued at the front, recomputed from its tokens on readmission; prefill is exact,
so the result is unchanged). A request that cannot fit even in an empty pool finishes with an error;
nothing else is affected.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from pipeline.runtime.model_runner import ModelRunner
from pipeline.runtime.sequence import Sequence


class Scheduler:
    def __init__(self, runner: ModelRunner, max_batch_size: int, prefill_chunk_tokens: int | None = None):
        self.runner = runner
        self.streams = runner.streams
        self.pool = runner.streams.pool
        self.policy = runner.policy
        self.max_batch_size = max_batch_size
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in batch-slot order
        a = runner.args
        self.streams_per_seq = a.num_layers * a.num_kv_heads
        self.kept_fraction = 1.0  # until streams run past their ring: assume they keep everything
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- capacity --------------------------------------------------------------------------------
    def _prefill_blocks(self, seq: Sequence) -> int:
        """Worst case for prefilling all of seq's tokens (before the policy drops any)."""
        return self.streams_per_seq * self.pool.blocks_for(len(seq.token_ids))

    def _expected_blocks(self, seq: Sequence) -> int:
        """Blocks a sequence is expected to hold at its end (one more per stream: the block a stream is
        handed a step ahead of need)."""
        live = self.policy.expected_live_tokens(seq.total_budget_tokens, self.kept_fraction)
        return self.streams_per_seq * (self.pool.blocks_for(live) + 1)

    def _still_to_take(self) -> int:
        """Blocks the running sequences are expected to take beyond what they hold now."""
        return sum(max(0, self._expected_blocks(s) - self.streams.seq_blocks(s.slot)) for s in self.running)

    def _observe_kept_fraction(self) -> None:
        """The share of tokens beyond the ring that running streams keep (host mirror, no device work)."""
        st, ring = self.streams, self.streams.ring_size
        if not self.running:
            return
        n = st.num_rows(len(self.running))
        cached = np.repeat([s.num_cached for s in self.running], st.num_kv_heads)[None, :]  # [1, n]
        beyond = cached - ring
        lens = st.lens_host[:, :n]
        mask = np.broadcast_to(beyond > 0, lens.shape)
        if mask.any():
            kept = (lens - np.minimum(cached, ring))[mask].sum()
            self.kept_fraction = float(min(1.0, kept / np.broadcast_to(beyond, lens.shape)[mask].sum()))

    # -- one step ----------------------------------------------------------------------------------
    def _decode_blocks(self) -> int:
        """Blocks the running batch's next decode step takes (exact)."""
        return self.streams.blocks_needed(self.streams.num_rows(len(self.running)))

    def schedule(self) -> tuple[list[Sequence], list[Sequence], bool]:
        """Returns (sequences to run, sequences that failed, is_prefill)."""
        self.runner.sync()
        failed: list[Sequence] = []
        admitted: list[Sequence] = []
        committed = 0
        if self.waiting and len(self.running) < self.max_batch_size:  # admission work only when it can admit
            self._observe_kept_fraction()
            committed = self._still_to_take() + self._decode_blocks()
        first_step = self.streams_per_seq  # a new sequence's first decode step: one block per stream
        while self.waiting and len(self.running) + len(admitted) < self.max_batch_size:
            seq = self.waiting[0]
            prefill = self._prefill_blocks(seq)
            if prefill + first_step > self.pool.num_blocks:
                self.waiting.popleft()
                seq.error = (
                    f"request needs {prefill} KV blocks for its prompt and {first_step} for its "
                    f"first decode step, but the pool has {self.pool.num_blocks}; raise kv_pool_tokens in "
                    "the engine limits or shorten the prompt"
                )
                failed.append(seq)
                continue
            expected = max(self._expected_blocks(seq), prefill + first_step)
            # an empty engine takes the request whatever the estimate says: preemption covers it
            if (self.running or admitted) and not self.pool.can_allocate(committed + expected):
                break  # queue until running sequences free blocks
            if not self.pool.can_allocate(committed + prefill + first_step):
                break
            self.waiting.popleft()
            self.runner.attach(seq)
            admitted.append(seq)
            committed += expected
        if admitted:
            return admitted, failed, True
        while self.running and not self.pool.can_allocate(self._decode_blocks()):
            if len(self.running) == 1:
                seq = self.running[0]
                self._detach(seq)
                seq.error = "KV pool exhausted by a single sequence; raise kv_pool_tokens or lower max_tokens"
                failed.append(seq)
                break
            self.preempt(max(self.running, key=lambda s: s.request_id))  # the youngest
        return list(self.running), failed, False

    def _detach(self, seq: Sequence) -> None:
        """Release a sequence's streams; the running list stays in slot order (the last one moves)."""
        self.runner.release(seq)
        if seq in self.running:
            self.running.remove(seq)
        self.running.sort(key=lambda s: s.slot)

    def preempt(self, seq: Sequence) -> None:
        self._detach(seq)
        seq.num_cached = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def prefill(self, seq: Sequence):
        """Prefill every uncached token of seq (in chunks if configured); returns the last logits."""
        logits = None
        for chunk in seq.prefill_chunks(self.prefill_chunk_tokens):
            logits = self.runner.prefill(seq, chunk)
        self.running.append(seq)
        self.running.sort(key=lambda s: s.slot)
        return logits

    def finish(self, seq: Sequence) -> None:
        if seq.slot is not None:
            self._detach(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
