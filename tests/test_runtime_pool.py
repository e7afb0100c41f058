"""BlockPool: integer bookkeeping of per-stream block tables over one free list."""

from __future__ import annotations

import pytest

from pipeline.runtime.block_pool import BlockPool, PoolExhausted


def test_append_resize_free_return_blocks():
    pool = BlockPool(num_blocks=8, block_size=4)
    a, b = pool.new_stream(), pool.new_stream()
    slots = [pool.append(a) for _ in range(5)]
    assert [s for s, _ in slots] == [0, 1, 2, 3, 4]
    assert [blk is not None for _, blk in slots] == [True, False, False, False, True]
    assert pool.num_used_blocks == 2 and pool.length(a) == 5
    pool.resize(b, 9)  # 3 blocks
    assert pool.num_used_blocks == 5
    assert len(set(pool.table(a)) | set(pool.table(b))) == 5  # no block shared between streams
    assert pool.locate(a, 4) == (pool.table(a)[1], 0)
    pool.resize(b, 4)  # shrink: two blocks go back at once
    assert pool.num_used_blocks == 3 and pool.length(b) == 4
    pool.free(a)
    pool.free(b)
    assert pool.num_used_blocks == 0 and pool.num_streams == 0


def test_exhaustion_raises_and_changes_nothing():
    pool = BlockPool(num_blocks=3, block_size=2)
    a = pool.new_stream()
    pool.resize(a, 6)  # 3 full blocks
    assert not pool.can_allocate(1)
    with pytest.raises(PoolExhausted, match="exhausted"):
        pool.append(a)
    assert pool.length(a) == 6 and len(pool.table(a)) == 3
    b = pool.new_stream()
    with pytest.raises(PoolExhausted):
        pool.resize(b, 1)
    assert pool.length(b) == 0 and pool.table(b) == []
    pool.free(a)
    assert pool.can_allocate(3)


def test_rejects_bad_sizes():
    with pytest.raises(ValueError, match="positive"):
        BlockPool(0, 16)
