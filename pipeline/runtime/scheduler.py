"""Continuous batching over the block pool (nano-vllm's scheduler, with per-head streams).

Each step either prefills waiting sequences that fit, or decodes every running sequence by one token.
Admission is optimistic about eviction: a waiting sequence is admitted while the pool can hold its
prompt uncompressed and the running batch's next decode step; when a decode step might not fit, the
youngest running sequence is preempted (its blocks freed, requeued at the front, recomputed from its
tokens on readmission; prefill is exact, so the result is unchanged). A request that cannot fit even in
an empty pool finishes with an error; nothing else is affected.
"""

from __future__ import annotations

from collections import deque

from pipeline.runtime.runner import ModelRunner
from pipeline.runtime.sequence import Sequence, Status


class Scheduler:
    def __init__(self, runner: ModelRunner, max_batch_size: int, prefill_chunk_tokens: int | None = None):
        self.runner = runner
        self.pool = runner.pool
        self.max_batch_size = max_batch_size
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        a = runner.args
        self.streams_per_seq = a.num_layers * a.num_kv_heads

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _prefill_blocks(self, seq: Sequence) -> int:
        """Worst case for prefilling all of seq's tokens (before the policy drops any)."""
        return self.streams_per_seq * self.pool.blocks_for(len(seq.token_ids))

    def _decode_blocks(self, num_seqs: int) -> int:
        """Worst case of one decode step: every stream crosses a block boundary."""
        return num_seqs * self.streams_per_seq

    def schedule(self) -> tuple[list[Sequence], list[Sequence], bool]:
        """Returns (sequences to run, sequences that failed, is_prefill)."""
        failed: list[Sequence] = []
        admitted: list[Sequence] = []
        reserve = self._decode_blocks(len(self.running))
        while self.waiting and len(self.running) + len(admitted) < self.max_batch_size:
            seq = self.waiting[0]
            need = self._prefill_blocks(seq)
            if need + self._decode_blocks(1) > self.pool.num_blocks:
                self.waiting.popleft()
                seq.error = (
                    f"request needs {need} KV blocks for its prompt and {self._decode_blocks(1)} for its "
                    f"first decode step, but the pool has {self.pool.num_blocks}; raise kv_pool_tokens in "
                    "the engine limits or shorten the prompt"
                )
                failed.append(seq)
                continue
            if not self.pool.can_allocate(need + reserve):
                break  # queue until running sequences free blocks
            self.waiting.popleft()
            self.runner.attach(seq)
            seq.status = Status.RUNNING
            admitted.append(seq)
            reserve += need + self._decode_blocks(1)
        if admitted:
            return admitted, failed, True
        while self.running and not self.pool.can_allocate(self._decode_blocks(len(self.running))):
            if len(self.running) == 1:
                seq = self.running.pop()
                self.runner.release(seq)
                seq.error = "KV pool exhausted by a single sequence; raise kv_pool_tokens or lower max_tokens"
                failed.append(seq)
                break
            self.preempt(self.running.pop())
        return list(self.running), failed, False

    def preempt(self, seq: Sequence) -> None:
        self.runner.release(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def prefill(self, seq: Sequence):
        """Prefill every uncached token of seq (in chunks if configured); returns the last logits."""
        todo = seq.token_ids[seq.num_cached :]
        chunk = self.prefill_chunk_tokens or len(todo)
        logits = None
        for i in range(0, len(todo), chunk):
            logits = self.runner.prefill(seq, todo[i : i + chunk])
        self.running.append(seq)
        return logits

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        if seq.streams is not None:
            self.runner.release(seq)
        seq.status = Status.FINISHED
