"""Continuous batching over the block pool (nano-vllm's scheduler, with per-head streams).

Each step either prefills waiting sequences that fit, or decodes every running sequence by one token.
Admission is optimistic about eviction: a waiting sequence is admitted while the pool can hold its
prompt uncompressed, the running batch's next decode step, and its own first one. Before a decode
step the blocks it takes are known exactly (the host mirror of the streams' lengths and growth); when
they are not free, the youngest running sequence is preempted (its blocks freed, requeued at the front,
recomputed from its tokens on readmission; prefill is exact, so the result is unchanged). A request
that cannot fit even in an empty pool finishes with an error; nothing else is affected.
"""

from __future__ import annotations

from collections import deque

from pipeline.runtime.runner import ModelRunner
from pipeline.runtime.sequence import Sequence


class Scheduler:
    def __init__(self, runner: ModelRunner, max_batch_size: int, prefill_chunk_tokens: int | None = None):
        self.runner = runner
        self.streams = runner.streams
        self.pool = runner.streams.pool
        self.max_batch_size = max_batch_size
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in batch-slot order
        a = runner.args
        self.streams_per_seq = a.num_layers * a.num_kv_heads

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _prefill_blocks(self, seq: Sequence) -> int:
        """Worst case for prefilling all of seq's tokens (before the policy drops any)."""
        return self.streams_per_seq * self.pool.blocks_for(len(seq.token_ids))

    def _decode_blocks(self) -> int:
        """Blocks the running batch's next decode step takes (exact)."""
        return self.streams.blocks_needed(self.streams.num_rows(len(self.running)))

    def schedule(self) -> tuple[list[Sequence], list[Sequence], bool]:
        """Returns (sequences to run, sequences that failed, is_prefill)."""
        self.runner.sync()
        failed: list[Sequence] = []
        admitted: list[Sequence] = []
        reserve = self._decode_blocks()
        first_step = self.streams_per_seq  # a new sequence's first decode step: one block per stream
        while self.waiting and len(self.running) + len(admitted) < self.max_batch_size:
            seq = self.waiting[0]
            need = self._prefill_blocks(seq)
            if need + first_step > self.pool.num_blocks:
                self.waiting.popleft()
                seq.error = (
                    f"request needs {need} KV blocks for its prompt and {first_step} for its "
                    f"first decode step, but the pool has {self.pool.num_blocks}; raise kv_pool_tokens in "
                    "the engine limits or shorten the prompt"
                )
                failed.append(seq)
                continue
            if not self.pool.can_allocate(need + reserve):
                break  # queue until running sequences free blocks
            self.waiting.popleft()
            self.runner.attach(seq)
            admitted.append(seq)
            reserve += need + first_step
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
