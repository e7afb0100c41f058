"""The DMS engine pair's extra I/O: names and shapes, shared by the model class that declares them
(model.py), the host driver that feeds them (driver.py) and the sessions that run them (sessions.py).

Plain Python (no TensorRT): importable everywhere. Besides these, each engine takes TensorRT-LLM's own
`input_ids`, `position_ids` and `last_token_ids` (remove_input_padding: tokens packed, `last_token_ids`
the 1-based end of each sequence) and returns `logits` [sequences, vocab] at each sequence's last token.

Context engine (B sequences, N packed tokens; chunked prefill):
    dms_position_ids int32 [N]        logical positions (a chunk starts where its sequence's stored part ends)
    dms_cu_seqlens int32 [B+1]        token offsets of the sequences
    dms_evictable int32 [N]           0: this token is kept whatever the next token decides (each sequence's
                                      last token, every token of a request served with eviction off)
    dms_k_pool, dms_v_pool [NB, BS, D]  the per-head pool of every layer (read: what earlier chunks stored)
    dms_block_tables_L int32 [B*Hkv, MB], dms_stream_lens_L int32 [B*Hkv]   each stream's stored part
    dms_past_expiry_L int32 [B*Hkv, P]  first query position that no longer sees each stored slot
  -> dms_k_L, dms_v_L [N, Hkv, D] (k after RoPE), dms_logit_L float32 [N, Hkv]

Generation engine (S sequences, one token each):
    dms_position_ids int32 [S]
    dms_k_pool, dms_v_pool [NB, BS, D]  written in place (each stream's new token at its write row)
    dms_block_tables_L int32 [S*Hkv, MB], dms_stream_lens_L int32 [S*Hkv] (counting the new token)
    dms_write_rows_L int32 [S*Hkv]    pool row (block * BS + slot) of each stream's new token
  -> dms_logit_L float32 [S, Hkv]
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

PREFIX = "dms_"
POSITIONS = "dms_position_ids"
CU_SEQLENS = "dms_cu_seqlens"
EVICTABLE = "dms_evictable"
K_POOL = "dms_k_pool"
V_POOL = "dms_v_pool"
PHASES = ("context", "generation")


def tables(layer: int) -> str:
    return f"dms_block_tables_{layer}"


def lens(layer: int) -> str:
    return f"dms_stream_lens_{layer}"


def expiry(layer: int) -> str:
    return f"dms_past_expiry_{layer}"


def write_rows(layer: int) -> str:
    return f"dms_write_rows_{layer}"


def keys(layer: int) -> str:
    return f"dms_k_{layer}"


def values(layer: int) -> str:
    return f"dms_v_{layer}"


def logits(layer: int) -> str:
    return f"dms_logit_{layer}"


@dataclass(frozen=True)
class Shapes:
    """What the build fixes about the engines' DMS inputs (the upper ends of their profiles)."""

    num_layers: int
    kv_heads: int  # per rank
    head_dim: int
    block_size: int
    pool_blocks: int  # rows of the pool tensors: every layer's blocks, plus one scratch block
    max_blocks: int  # block-table columns: blocks of the longest stream
    max_batch: int
    max_tokens: int  # tokens of one engine call (the context engine's chunk budget)

    ENV = {
        "block_size": "DMS_TRTLLM_BLOCK_SIZE",
        "pool_blocks": "DMS_TRTLLM_POOL_BLOCKS",
        "max_blocks": "DMS_TRTLLM_MAX_BLOCKS_PER_STREAM",
    }

    @classmethod
    def from_env(cls, env: Mapping[str, str], **known: int) -> Shapes:
        """The build driver passes the pool's sizes through the environment (build_engine.py)."""
        missing = [v for v in cls.ENV.values() if v not in env]
        if missing:
            raise RuntimeError(
                f"{', '.join(missing)} not set: build the DMS engines with plugins/trtllm/build_engine.py"
            )
        return cls(**known, **{k: int(env[v]) for k, v in cls.ENV.items()})


def inputs(phase: str, s: Shapes) -> dict[str, tuple[str, OrderedDict]]:
    """{name: (kind "int32" | "pool", dim ranges)} of one phase's DMS inputs, one optimisation profile:
    dim ranges map each dimension's name to [(min, opt, max)], TensorRT-LLM's `Tensor(dim_range=...)`."""
    if phase not in PHASES:
        raise ValueError(f"DMS_TRTLLM_PHASE must be one of {PHASES}, got {phase!r}")

    def dims(*named: tuple[str, int, int]) -> OrderedDict:
        # the pool is always bound whole (optimise for it); other dims for half their range
        opt = {n: hi if n == "pool_blocks" else max(lo, hi // 2) for n, lo, hi in named}
        return OrderedDict((n, [(lo, opt[n], hi)]) for n, lo, hi in named)

    tokens = ("num_tokens", 1, s.max_tokens) if phase == "context" else ("batch_size", 1, s.max_batch)
    streams = ("streams", s.kv_heads, s.max_batch * s.kv_heads)
    pool = dims(
        ("pool_blocks", 1, s.pool_blocks),
        ("block", s.block_size, s.block_size),
        ("head_dim", s.head_dim, s.head_dim),
    )
    out = {POSITIONS: ("int32", dims(tokens)), K_POOL: ("pool", pool), V_POOL: ("pool", pool)}
    if phase == "context":
        out[CU_SEQLENS] = ("int32", dims(("batch_plus_one", 2, s.max_batch + 1)))
        out[EVICTABLE] = ("int32", dims(tokens))
    for layer in range(s.num_layers):
        out[tables(layer)] = ("int32", dims(streams, ("max_blocks", 1, s.max_blocks)))
        out[lens(layer)] = ("int32", dims(streams))
        if phase == "context":
            out[expiry(layer)] = ("int32", dims(streams, ("past_slots", 1, s.max_blocks * s.block_size)))
        else:
            out[write_rows(layer)] = ("int32", dims(streams))
    return out
