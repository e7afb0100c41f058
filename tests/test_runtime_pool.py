"""BlockPool and StreamTable: integer bookkeeping of per-stream block tables over one free list."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dms_core.streams import BlockPool, PoolExhausted, StreamTable


def _table(num_blocks: int = 8, block: int = 4, seqs: int = 2) -> StreamTable:
    return StreamTable(num_layers=1, num_kv_heads=1, max_seqs=seqs, max_blocks_per_stream=4,
                       pool=BlockPool(num_blocks, block))


def test_take_give_and_exhaustion():
    pool = BlockPool(num_blocks=3, block_size=2)
    a = pool.take(2)
    assert pool.num_used_blocks == 2 and len(set(a.tolist())) == 2
    with pytest.raises(PoolExhausted, match="exhausted"):
        pool.take(2)
    assert pool.num_free_blocks == 1  # a refused take changes nothing
    pool.give(a)
    assert pool.num_used_blocks == 0 and pool.can_allocate(3)


def test_resize_reserve_and_close_return_blocks():
    st = _table()
    a, b = st.open(), st.open()
    st.resize(0, a, 5)  # 2 blocks
    st.resize(0, b, 9)  # 3 blocks
    assert st.pool.num_used_blocks == 5
    held = {int(x) for x in st.tables_host[0, a, :2]} | {int(x) for x in st.tables_host[0, b, :3]}
    assert len(held) == 5, "no block shared between streams"
    assert (st.tables.numpy() == st.tables_host).all(), "the device copy follows the host tables"
    st.resize(0, b, 4)  # shrink: two blocks go back at once
    assert st.pool.num_used_blocks == 3 and st.held[0, b] == 1
    # stream a has 5 of 8 slots: no block before growing; b is full (4 of 4): one block, taken ahead
    assert st.blocks_needed(2) == 1
    st.reserve(2)
    assert st.held[0, b] == 2 and st.pool.num_used_blocks == 4
    moved = st.close(a)  # b moves into slot 0
    assert moved == 1 and st.num_active == 1 and st.lens_host[0, 0] == 4 and st.held[0, 0] == 2
    st.close(0)
    assert st.pool.num_used_blocks == 0 and st.num_active == 0


def test_exhaustion_in_resize_changes_nothing():
    st = _table(num_blocks=3, block=2)
    a = st.open()
    st.resize(0, a, 6)  # 3 full blocks
    b = st.open()
    with pytest.raises(PoolExhausted):
        st.resize(0, b, 1)
    assert st.lens_host[0, b] == 0 and st.held[0, b] == 0 and st.lens_host[0, a] == 6


def test_place_appends_or_reuses_in_place():
    st = _table()
    a, b = st.open(), st.open()
    st.resize(0, a, 3)
    st.resize(0, b, 4)
    st.reserve(2)  # b is full: its next slot needs a block
    append = st.append_rows(2)[0]
    expect = [st.tables_host[0, a, 0] * 4 + 3, st.tables_host[0, b, 1] * 4]
    assert append.tolist() == [int(x) for x in expect]
    reused = int(st.tables_host[0, b, 0] * 4 + 1)  # b's slot 1, say an evicted token's
    rows = st.place(0, 2, append, torch.tensor([-1, reused]))
    assert rows.tolist() == [int(expect[0]), reused]
    assert st.lens[0, :2].tolist() == [4, 4]


def test_rejects_bad_sizes():
    with pytest.raises(ValueError, match="positive"):
        BlockPool(0, 16)
    st = _table()
    with pytest.raises(ValueError, match="max length"):
        st.resize(0, st.open(), 17)  # 4 blocks of 4 at most
    assert np.all(st.held == 0)
