"""Memory: DMS bookkeeping on 4096-token sequences at CR 8 really frees blocks (the window is the only
overhead), capacity in a fixed pool, and the pool returns to zero. Runs the real DMSPolicy and BlockPool
without the model (4096 decode steps of integer bookkeeping take well under a second)."""

from __future__ import annotations

import torch

from pipeline.runtime.block_pool import BlockPool
from pipeline.runtime.policies import DMSPolicy, NoEviction
from pipeline.runtime.policies.base import EvictionPolicy, Stream

LAYERS, KV_HEADS, BLOCK, WINDOW, TOKENS = 4, 2, 16, 32, 4096


def _blocks_for_one_sequence(policy: EvictionPolicy, pool: BlockPool) -> tuple[int, list[int]]:
    streams = [Stream(id=pool.new_stream()) for _ in range(LAYERS * KV_HEADS)]
    pos = torch.arange(TOKENS)[None]
    evict = policy.decisions(None, pos, KV_HEADS)  # [1, Hkv, T] or None
    for stream in streams:
        policy.start(stream)  # an empty stream: what decode sees token by token
    for t in range(TOKENS):
        for i, stream in enumerate(streams):
            e = bool(evict[0, i % KV_HEADS, t]) if evict is not None else False
            slot = policy.place(stream, t, e)
            if slot < 0:  # what ModelRunner.decode does with the answer
                pool.append(stream.id)
                stream.pos.append(t)
                stream.flag.append(False)
            else:
                stream.pos[slot], stream.flag[slot] = t, False
    used = pool.num_used_blocks
    lens = [pool.length(s.id) for s in streams]
    for s in streams:
        pool.free(s.id)
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
    kv_bytes_ratio = vanilla_blocks / dms_blocks
    capacity_ratio = (pool.num_blocks // dms_blocks) / (pool.num_blocks // vanilla_blocks)
    assert kv_bytes_ratio >= 6 and capacity_ratio >= 6, (kv_bytes_ratio, capacity_ratio)
