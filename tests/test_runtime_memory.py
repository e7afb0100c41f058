"""Memory: DMS bookkeeping on 4096-token sequences at CR 8 really frees blocks (the window is the only
overhead), capacity in a fixed pool, and the pool returns to zero. Runs the real DMSPolicy over the real
StreamTable without the model, the way a decode step does (reserve, place, refresh)."""

from __future__ import annotations

import torch

from dms_core.rule import RingStep
from dms_core.streams import BlockPool, StreamTable
from pipeline.runtime.policies import DMSPolicy, NoEviction
from pipeline.runtime.policies.base import DecodeStep, EvictionPolicy

LAYERS, KV_HEADS, BLOCK, WINDOW, TOKENS = 4, 2, 16, 32, 4096


def _blocks_for_one_sequence(policy: EvictionPolicy, pool: BlockPool) -> tuple[int, list[int]]:
    st = StreamTable(LAYERS, KV_HEADS, 1, TOKENS // BLOCK + 1, pool, ring=policy.ring_size())
    st.open()
    n = KV_HEADS
    pos = torch.arange(TOKENS)[None]
    evict = policy.decisions(None, pos, KV_HEADS)  # [1, Hkv, T] or None
    for t in range(TOKENS):
        st.reserve(n)
        at = torch.full((n,), t)
        ring = RingStep.at(st.row_index[:n], at, st.ring_size) if st.ring_size else None
        step = DecodeStep(n, st.widths(n), at, st.append_rows(n), ring)
        for layer in range(LAYERS):
            policy.place(st, layer, step, evict[0, :, t] if evict is not None else None)
        st.refresh(n, st.lens[:, :n].clone(), policy.appends(st, n, at + 1))
    used = pool.num_used_blocks
    lens = st.lens_host[:, :n].reshape(-1).tolist()
    st.close(0)
    return used, lens


def test_dms_cr8_frees_memory_on_4096_tokens():
    pool = BlockPool(num_blocks=LAYERS * KV_HEADS * TOKENS // BLOCK * 2, block_size=BLOCK)
    vanilla_blocks, vanilla_lens = _blocks_for_one_sequence(NoEviction(), pool)
    dms_blocks, dms_lens = _blocks_for_one_sequence(DMSPolicy(window=WINDOW, force_cr=8), pool)
    assert pool.num_used_blocks == 0
    assert vanilla_lens == [TOKENS] * (LAYERS * KV_HEADS)
    # the ring of window + 1 tokens plus one in eight of the older ones
    older = TOKENS - (WINDOW + 1)
    assert dms_lens == [WINDOW + 1 + older // 8] * (LAYERS * KV_HEADS)
    # blocks are taken only as streams really grow: exactly what the live tokens need
    assert dms_blocks == LAYERS * KV_HEADS * -(-dms_lens[0] // BLOCK)
    assert vanilla_blocks == LAYERS * KV_HEADS * TOKENS // BLOCK
    kv_bytes_ratio = vanilla_blocks / dms_blocks
    capacity_ratio = (pool.num_blocks // dms_blocks) / (pool.num_blocks // vanilla_blocks)
    assert kv_bytes_ratio >= 6 and capacity_ratio >= 6, (kv_bytes_ratio, capacity_ratio)


def test_each_layer_reads_only_as_many_block_columns_as_its_longest_stream():
    """A layer whose heads keep their window is not read to the length of another layer's long head."""
    pool = BlockPool(num_blocks=64, block_size=BLOCK)
    st = StreamTable(LAYERS, KV_HEADS, 1, 16, pool, ring=0)
    st.open()
    for layer, tokens in enumerate((40, 200, 17, 0)):
        st.resize(layer, 0, tokens)
        st.resize(layer, 1, tokens // 2)
    # after the step's one new token: ceil((len + 1) / 16) columns, at least one
    assert st.widths(KV_HEADS) == (3, 13, 2, 1) and st.width(KV_HEADS) == 13
    st.close(0)
    assert pool.num_used_blocks == 0
