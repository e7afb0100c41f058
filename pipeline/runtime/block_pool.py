"""Per-stream paged KV bookkeeping: integers only, no tensors (nano-vllm's BlockManager, per head).

A stream is one (sequence, layer, KV head). Each stream owns a block table (block ids, in slot order)
and a length (live tokens, dense in slots 0..length-1). All streams share one free list over a
preallocated pool of `num_blocks` blocks of `block_size` slots. Blocks go back to the free list as soon
as a stream shrinks below a block boundary or is freed, so a sequence's memory is what it keeps live.
"""

from __future__ import annotations

from collections import deque


class PoolExhausted(RuntimeError):
    """Not enough free blocks; the scheduler queues or preempts instead of crashing."""


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._tables: dict[int, list[int]] = {}
        self._lens: dict[int, int] = {}
        self._next_id = 0

    # -- queries -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_streams(self) -> int:
        return len(self._tables)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def table(self, stream: int) -> list[int]:
        return self._tables[stream]

    def length(self, stream: int) -> int:
        return self._lens[stream]

    def locate(self, stream: int, slot: int) -> tuple[int, int]:
        """(block id, offset) of a live slot."""
        assert 0 <= slot < self._lens[stream], (stream, slot, self._lens[stream])
        return self._tables[stream][slot // self.block_size], slot % self.block_size

    # -- verbs ---------------------------------------------------------------------------------
    def new_stream(self) -> int:
        stream = self._next_id
        self._next_id += 1
        self._tables[stream] = []
        self._lens[stream] = 0
        return stream

    def resize(self, stream: int, num_tokens: int) -> list[int]:
        """Set a stream's length, taking or returning blocks. Returns the blocks newly taken.

        Raises PoolExhausted (and changes nothing) when the free list is too short.
        """
        table = self._tables[stream]
        need = self.blocks_for(num_tokens)
        if need > len(table) and need - len(table) > len(self._free):
            raise PoolExhausted(
                f"KV pool exhausted: need {need - len(table)} more blocks, {len(self._free)} free"
            )
        taken = []
        while len(table) < need:
            block = self._free.popleft()
            table.append(block)
            taken.append(block)
        while len(table) > need:
            self._free.append(table.pop())
        self._lens[stream] = num_tokens
        return taken

    def append(self, stream: int) -> tuple[int, int | None]:
        """Grow a stream by one slot. Returns (slot index, newly taken block id or None)."""
        length = self._lens[stream]
        if length < len(self._tables[stream]) * self.block_size:  # fast path: room in the last block
            self._lens[stream] = length + 1
            return length, None
        taken = self.resize(stream, length + 1)
        return length, (taken[0] if taken else None)

    def free(self, stream: int) -> None:
        """Return every block of the stream and forget it."""
        self._free.extend(reversed(self._tables.pop(stream)))
        del self._lens[stream]
