"""Per-stream paged KV bookkeeping for a batch of sequences: one owner for every stream's state.

A stream is one (sequence, layer, KV head). Sequences occupy batch slots 0..num_active-1 (kept compact,
so a step's streams are the rows 0..num_active*Hkv-1 of every per-layer tensor, a view, no gather);
stream row = slot * Hkv + kv_head. Per layer and row:

- `tables` int32 [L, rows, max_blocks]: block ids in slot order. The HOST allocates blocks, so the host
  array `tables_host` is the truth and the device tensor `tables` a copy updated entry by entry;
- `lens` int32 [L, rows]: live slots (dense 0..len-1). The device step changes it (a DMS stream grows
  only when the token leaving its ring was kept), so the device tensor is the truth and `lens_host`
  its mirror, refreshed once per step (`refresh`), in the step's single device-to-host copy;
- `ring_row` int64 / `ring_flag` bool [L, rows, window + 1]: the DMS ring (dms_core.rule): the pool
  row and eviction flag of each stream's last window + 1 tokens;
- `budget` int32 [rows]: live-token budget of fixed-size policies (a large number: none);
- `slot_pos` int64 / `slot_score` float32 [(num_blocks + 1) * block_size]: the logical position and
  attention statistics of the token in each pool row (the last block is scratch: padding rows and
  masked-out entries point there).

All streams of all layers draw blocks from one `BlockPool` (integers only). Blocks are handed out one
step ahead (`reserve`: a stream about to grow past its last block gets its next one before the step;
whether it grows is known a step early, see `rule.ring_appends`), and return to the pool when a stream
is rewritten shorter or its sequence leaves.

Imports torch and numpy only: the torch engine (pipeline.runtime) and the TensorRT host driver
(plugins/trtllm) share it.
"""

from __future__ import annotations

import numpy as np
import torch

NO_BUDGET = 1 << 30


class PoolExhausted(RuntimeError):
    """Not enough free blocks; the scheduler queues or preempts instead of crashing."""


class BlockPool:
    """A free stack of block ids over a preallocated pool (nano-vllm's BlockManager, vectorised)."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = np.arange(num_blocks - 1, -1, -1, dtype=np.int32)  # popped from the end: 0 first
        self._top = num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self._top

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self._top

    def stats(self) -> dict[str, int]:
        """The pool's figures as the engines report them (pool_stats; the Triton model's gauges)."""
        return {"blocks_total": self.num_blocks, "blocks_used": self.num_used_blocks,
                "blocks_free": self.num_free_blocks, "block_size": self.block_size}  # fmt: skip

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self._top

    def take(self, n: int) -> np.ndarray:
        """n block ids (int32); raises PoolExhausted and changes nothing when fewer are free."""
        if n > self._top:
            raise PoolExhausted(f"KV pool exhausted: need {n} more blocks, {self._top} free")
        self._top -= n
        return self._free[self._top : self._top + n][::-1].copy()

    def give(self, blocks: np.ndarray) -> None:
        n = len(blocks)
        self._free[self._top : self._top + n] = np.asarray(blocks, np.int32)[::-1]
        self._top += n


class StreamTable:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        max_seqs: int,
        max_blocks_per_stream: int,
        pool: BlockPool,
        ring: int = 0,
        device: torch.device | str = "cpu",
        track_scores: bool = False,
    ):
        self.num_layers, self.num_kv_heads, self.max_seqs = num_layers, num_kv_heads, max_seqs
        self.max_blocks = max_blocks_per_stream
        self.pool = pool
        self.block_size = pool.block_size
        self.device = torch.device(device)
        rows = max_seqs * num_kv_heads
        self.scratch_block = pool.num_blocks  # one block past the pool: never handed out
        dev = self.device
        self.tables_host = np.full((num_layers, rows, max_blocks_per_stream), self.scratch_block, np.int32)
        self.held = np.zeros((num_layers, rows), np.int32)  # blocks each stream holds
        self.lens_host = np.zeros((num_layers, rows), np.int32)
        self.grows_host = np.ones((num_layers, rows), bool)  # will the stream's next token append?
        self.tables = torch.from_numpy(self.tables_host.copy()).to(dev)
        self.lens = torch.zeros((num_layers, rows), dtype=torch.int32, device=dev)
        self.budget = torch.full((rows,), NO_BUDGET, dtype=torch.int32, device=dev)
        self.ring_size = ring  # entries per DMS ring (window + 1), 0: no rings
        self.ring_row = torch.zeros((num_layers, rows, max(ring, 1)), dtype=torch.int64, device=dev)
        self.ring_flag = torch.zeros((num_layers, rows, max(ring, 1)), dtype=torch.bool, device=dev)
        pool_rows = (pool.num_blocks + 1) * self.block_size
        self.slot_pos = torch.zeros(pool_rows, dtype=torch.int64, device=dev)
        self.slot_score = torch.zeros(pool_rows if track_scores else 1, dtype=torch.float32, device=dev)
        self.row_index = torch.arange(rows, device=dev)
        self.row_base = self.row_index * max_blocks_per_stream  # flat offset of each row's table
        self.num_active = 0

    # -- batch slots ---------------------------------------------------------------------------
    def rows_of(self, slot: int) -> slice:
        return slice(slot * self.num_kv_heads, (slot + 1) * self.num_kv_heads)

    def open(self, budget: int | None = None) -> int:
        """A new sequence's slot (empty streams; `budget` live tokens per stream, None: unbounded)."""
        if self.num_active >= self.max_seqs:
            raise RuntimeError(f"all {self.max_seqs} batch slots are in use")
        slot = self.num_active
        self.num_active += 1
        rows = self.rows_of(slot)
        self.lens[:, rows] = 0
        self.lens_host[:, rows] = 0
        self.grows_host[:, rows] = True
        self.ring_flag[:, rows] = False
        self.budget[rows] = NO_BUDGET if budget is None else budget
        return slot

    def close(self, slot: int) -> int | None:
        """Free a sequence's blocks. The last active sequence moves into `slot` (the batch stays
        compact): returns its former slot, or None when `slot` was the last."""
        rows = self.rows_of(slot)
        self._release(rows)
        last = self.num_active - 1
        self.num_active = last
        if slot == last:
            return None
        src = self.rows_of(last)
        for host in (self.tables_host, self.held, self.lens_host, self.grows_host):
            host[:, rows] = host[:, src]
        for dev in (self.tables, self.lens, self.ring_row, self.ring_flag):
            dev[:, rows] = dev[:, src]
        self.budget[rows] = self.budget[src]
        self.tables_host[:, src] = self.scratch_block
        self.held[:, src] = 0
        self.tables[:, src] = self.scratch_block
        return last

    def _release(self, rows: slice) -> None:
        held = self.held[:, rows]
        cols = np.arange(self.max_blocks)[None, None, :] < held[..., None]
        self.pool.give(self.tables_host[:, rows][cols])
        self.tables_host[:, rows] = self.scratch_block
        self.tables[:, rows] = self.scratch_block
        self.held[:, rows] = 0
        self.lens_host[:, rows] = 0
        self.lens[:, rows] = 0

    # -- one stream (prefill) --------------------------------------------------------------------
    def resize(self, layer: int, row: int, num_tokens: int) -> None:
        """Set a stream's length (its contents are rewritten by the caller), taking or returning blocks.
        Raises PoolExhausted (nothing changed) or ValueError (longer than max_blocks)."""
        need = self.pool.blocks_for(num_tokens)
        if need > self.max_blocks:
            raise ValueError(f"stream of {num_tokens} tokens exceeds the engine's max length per stream")
        held = int(self.held[layer, row])
        if need > held:
            blocks = self.pool.take(need - held)
            self.tables_host[layer, row, held:need] = blocks
            self.tables[layer, row, held:need] = torch.from_numpy(blocks).to(self.device)
        elif need < held:
            self.pool.give(self.tables_host[layer, row, need:held].copy())
            self.tables_host[layer, row, need:held] = self.scratch_block
            self.tables[layer, row, need:held] = self.scratch_block
        self.held[layer, row] = need
        self.lens_host[layer, row] = num_tokens
        self.lens[layer, row] = num_tokens

    def pool_rows(self, layer: int, row: int, num_tokens: int) -> torch.Tensor:
        """Flat pool row ids int64 [num_tokens] of a stream's slots 0..num_tokens-1 (host tables)."""
        slot = np.arange(num_tokens)
        blocks = self.tables_host[layer, row, slot // self.block_size].astype(np.int64)
        return torch.from_numpy(blocks * self.block_size + slot % self.block_size).to(self.device)

    # -- a decode step (all active streams) ----------------------------------------------------
    def num_rows(self, num_seqs: int) -> int:
        return num_seqs * self.num_kv_heads

    def blocks_needed(self, num_rows: int) -> int:
        """Blocks the next decode step of rows 0..num_rows-1 takes (exact, from the host mirror)."""
        lens, held = self.lens_host[:, :num_rows], self.held[:, :num_rows]
        return int(np.count_nonzero(self.grows_host[:, :num_rows] & (lens >= held * self.block_size)))

    def reserve(self, num_rows: int) -> None:
        """Before a decode step: every stream that will grow past its last block gets its next one.
        Raises PoolExhausted (nothing changed) when the pool is short; the scheduler checks first."""
        lens, held = self.lens_host[:, :num_rows], self.held[:, :num_rows]
        layer, row = np.nonzero(self.grows_host[:, :num_rows] & (lens >= held * self.block_size))
        if not len(layer):
            return
        col = self.held[layer, row]
        if int(col.max()) >= self.max_blocks:
            raise ValueError("a sequence grew past the engine's max length per stream")
        blocks = self.pool.take(len(layer))
        self.tables_host[layer, row, col] = blocks
        self.held[layer, row] = col + 1
        index = [torch.from_numpy(a.astype(np.int64)).to(self.device) for a in (layer, row, col)]
        self.tables.index_put_(tuple(index), torch.from_numpy(blocks).to(self.device))

    def width(self, num_rows: int) -> int:
        """Block-table columns a decode step must read: enough for the longest stream after it grows."""
        return max(self.widths(num_rows))

    def widths(self, num_rows: int) -> tuple[int, ...]:
        """`width` per layer: DMS layers keep very different amounts (one head keeping a quarter of its
        tokens while the others keep their window), and reading every layer to the longest stream of
        all of them multiplies the attention work of the short ones."""
        if not num_rows:
            return (1,) * self.num_layers
        longest = self.lens_host[:, :num_rows].max(axis=1) + 1
        return tuple(min(self.max_blocks, self.pool.blocks_for(int(n))) for n in longest)

    def append_rows(self, num_rows: int) -> torch.Tensor:
        """int64 [L, num_rows]: the pool row of each stream's next free slot (slot `len`), for every layer
        at once before a decode step (its blocks are reserved already)."""
        bs = self.block_size
        lens = self.lens[:, :num_rows].long()
        block = self.tables[:, :num_rows].gather(2, (lens // bs)[..., None])[..., 0]
        return block * bs + lens % bs

    def place(
        self, layer: int, n: int, append_rows: torch.Tensor, reuse_rows: torch.Tensor | None
    ) -> torch.Tensor:
        """Streams 0..n-1 each place one new token: at reuse_rows[r] (an evicted token's row, in place)
        or, where it is negative (or reuse_rows is None: every stream), at append_rows[r], the stream's
        next free slot (it grows). Returns the pool rows int64 [n]."""
        lens = self.lens[layer, :n]
        if reuse_rows is None:
            lens.add_(1)
            return append_rows
        appended = reuse_rows < 0
        lens.add_(appended.to(lens.dtype))
        return torch.where(appended, append_rows, reuse_rows)

    def live_rows(self, layer: int, num_rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat pool rows int64 [R, width * block_size] of every slot of the first `width` blocks, with
        slots past a stream's length pointing at the scratch block; live bool [R, width * block_size])."""
        bs = self.block_size
        slot = torch.arange(width * bs, device=self.device)
        live = slot[None, :] < self.lens[layer, :num_rows, None]
        blocks = self.tables[layer, :num_rows, :width].long().repeat_interleave(bs, dim=1)
        rows = torch.where(live, blocks * bs + slot % bs, self.scratch_block * bs)
        return rows, live

    def refresh(self, num_rows: int, lens: torch.Tensor, grows: torch.Tensor) -> None:
        """Take the host mirror of rows 0..num_rows-1 from the step's copy (lens int32 and grows bool,
        both [L, num_rows], on the host already)."""
        self.lens_host[:, :num_rows] = lens.numpy()
        self.grows_host[:, :num_rows] = grows.numpy()

    # -- accounting ----------------------------------------------------------------------------
    def seq_lens(self, slot: int) -> np.ndarray:
        """int32 [L, Hkv] live tokens of a sequence's streams (host mirror)."""
        return self.lens_host[:, self.rows_of(slot)].copy()

    def positions(self, layer: int, row: int) -> list[int]:
        """Logical positions of a stream's live tokens, in slot order (reads the device: tests, debugging)."""
        rows = self.pool_rows(layer, row, int(self.lens_host[layer, row]))
        return self.slot_pos[rows].tolist()

    def seq_blocks(self, slot: int) -> int:
        return int(self.held[:, self.rows_of(slot)].sum())
