"""Pure-torch reference for DMS paged decode attention (and the input checks the kernel shares).

Pool layout (one pool per layer, shared by every stream):
  k_cache, v_cache: [num_blocks, block_size, head_dim]
A stream is one (sequence, KV head); stream index = seq * num_kv_heads + kv_head. Its live tokens are
DENSE in logical slots 0..len-1 of its block table (DMS reuses an evicted slot in place), so slot n of
stream s lives at k_cache[block_tables[s, n // block_size], n % block_size].
GQA: query heads kv_head*G .. kv_head*G+G-1 (G = num_q_heads // num_kv_heads) read stream (seq, kv_head).

Only torch and the standard library are imported here: this module is reused inside the TensorRT-LLM
environment, which has an older torch and none of this project's `pipeline` package.
"""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_decode_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    stream_lens: torch.Tensor,
    num_kv_heads: int,
) -> tuple[int, int, int, int]:
    """Validate shapes, dtypes, devices and strides; return (num_seqs, num_q_heads, head_dim, group_size).

    Raises ValueError naming the problem and the fix. Never reads device memory (no host sync), so it
    is safe inside CUDA-graph capture; token/block bounds are the caller's contract
    (see `check_stream_bounds` for a host-side check).
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [num_seqs, num_q_heads, head_dim], got shape {tuple(q.shape)}")
    if k_cache.dim() != 3:
        raise ValueError(
            f"k_cache must be [num_blocks, block_size, head_dim], got shape {tuple(k_cache.shape)}"
        )
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"v_cache shape {tuple(v_cache.shape)} must equal k_cache shape {tuple(k_cache.shape)}"
        )
    num_seqs, num_q_heads, head_dim = q.shape
    if k_cache.shape[2] != head_dim:
        raise ValueError(f"head_dim mismatch: q has {head_dim}, k_cache/v_cache have {k_cache.shape[2]}")
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_q_heads ({num_q_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})"
        )
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q dtype {q.dtype} unsupported; use one of {SUPPORTED_DTYPES}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(
            f"dtype mismatch: q {q.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype}; "
            "cast q to the pool dtype before the call"
        )
    num_streams = num_seqs * num_kv_heads
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2:
        raise ValueError(
            f"block_tables must be int32 [num_seqs*num_kv_heads, max_blocks], "
            f"got {block_tables.dtype} {tuple(block_tables.shape)}"
        )
    if block_tables.shape[0] != num_streams:
        raise ValueError(
            f"block_tables has {block_tables.shape[0]} rows, expected num_seqs*num_kv_heads = {num_streams}"
        )
    if stream_lens.dtype != torch.int32 or tuple(stream_lens.shape) != (num_streams,):
        raise ValueError(
            f"stream_lens must be int32 [{num_streams}], got {stream_lens.dtype} {tuple(stream_lens.shape)}"
        )
    devices = {t.device for t in (q, k_cache, v_cache, block_tables, stream_lens)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(str(d) for d in devices)}")
    # The kernel walks the last dimension with unit stride (16-byte vector loads on the GPU).
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride in its last dimension; call .contiguous()")
    if not stream_lens.is_contiguous():
        raise ValueError("stream_lens must be contiguous; call .contiguous()")
    return num_seqs, num_q_heads, head_dim, num_q_heads // num_kv_heads


def check_stream_bounds(
    block_tables: torch.Tensor, stream_lens: torch.Tensor, num_blocks: int, block_size: int
) -> None:
    """Host-side check (syncs the device) that every live slot maps to a real block.

    Use in tests and debugging; the kernel itself trusts these bounds.
    """
    lens = stream_lens.to("cpu", torch.int64)
    capacity = block_tables.shape[1] * block_size
    if bool((lens < 0).any()) or bool((lens > capacity).any()):
        raise ValueError(f"stream_lens must lie in [0, {capacity}] (max_blocks * block_size)")
    needed = (lens + block_size - 1) // block_size  # blocks in use per stream
    cols = torch.arange(block_tables.shape[1])
    used = cols[None, :] < needed[:, None]
    ids = block_tables.to("cpu", torch.int64)[used]
    if ids.numel() and (bool((ids < 0).any()) or bool((ids >= num_blocks).any())):
        raise ValueError(f"block_tables holds block ids outside [0, {num_blocks}) for live slots")


def reference_paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    stream_lens: torch.Tensor,
    scale: float,
    num_kv_heads: int,
    compute_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Decode attention over each stream's live slots; the kernel's ground truth.

    Shapes: q [S, Hq, D]; k_cache, v_cache [num_blocks, block_size, D];
    block_tables int32 [S*Hkv, max_blocks]; stream_lens int32 [S*Hkv].
    Returns [S, Hq, D] in `out_dtype` (default q's dtype); a stream of length 0 yields zeros.
    Arithmetic runs in `compute_dtype` (float32 by default; float64 for high-precision checks, with
    out_dtype=torch.float64 so the reference is not rounded back to q's precision).
    Gathers only up to the longest live stream (one host sync for that length).
    """
    num_seqs, num_q_heads, head_dim, group = check_decode_inputs(
        q, k_cache, v_cache, block_tables, stream_lens, num_kv_heads
    )
    num_streams = num_seqs * num_kv_heads
    block_size = k_cache.shape[1]
    max_len = int(stream_lens.max()) if num_streams else 0
    out_dtype = q.dtype if out_dtype is None else out_dtype
    out = torch.zeros(num_seqs, num_q_heads, head_dim, dtype=compute_dtype, device=q.device)
    if max_len == 0:
        return out.to(out_dtype)
    if max_len > block_tables.shape[1] * block_size:
        raise ValueError(
            f"a stream has {max_len} live tokens but block_tables covers only "
            f"{block_tables.shape[1]} blocks x {block_size}; widen the block table"
        )
    pos = torch.arange(max_len, device=q.device)
    live = pos[None, :] < stream_lens[:, None].long()  # [streams, L]
    # Slots past a stream's length may hold any block id (even garbage): point them at block 0.
    blocks = torch.where(live, block_tables[:, pos // block_size].long(), 0)
    slots = (pos % block_size).expand_as(blocks)
    k = k_cache[blocks, slots].to(compute_dtype)  # [streams, L, D]
    v = v_cache[blocks, slots].to(compute_dtype)
    qg = q.reshape(num_streams, group, head_dim).to(compute_dtype)  # stream-major: seq, kv_head, g
    scores = torch.einsum("sgd,sld->sgl", qg, k) * scale
    scores = scores.masked_fill(~live[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(live.any(dim=-1)[:, None, None], probs, 0.0)  # empty stream: 0/0 -> 0
    out = torch.einsum("sgl,sld->sgd", probs, v).reshape(num_seqs, num_q_heads, head_dim)
    return out.to(out_dtype)


def dense_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Plain softmax attention of one query per head over dense keys, in float64.

    Shapes: q [Hq, D]; k, v [Hkv, L, D] (L may be 0: zeros). GQA by repeating KV heads.
    Returns [Hq, D] float64.
    """
    num_q_heads = q.shape[0]
    num_kv_heads, length, _ = k.shape
    if length == 0:
        return torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    group = num_q_heads // num_kv_heads
    kk = k.double().repeat_interleave(group, dim=0)  # [Hq, L, D]
    vv = v.double().repeat_interleave(group, dim=0)
    scores = torch.einsum("hd,hld->hl", q.double(), kk) * scale
    return torch.einsum("hl,hld->hd", torch.softmax(scores, dim=-1), vv)


def reference_pool_write(
    k_pool: torch.Tensor, v_pool: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, rows: torch.Tensor
) -> None:
    """What the `dms::pool_write` plugin does, in torch: each stream's new K/V row into the pool row the
    host chose (in place). k_pool, v_pool [NB, BS, D]; k_new, v_new [S, Hkv, D]; rows int32 [S*Hkv]."""
    d = k_pool.shape[-1]
    k_pool.view(-1, d)[rows.long()] = k_new.reshape(-1, d).to(k_pool.dtype)
    v_pool.view(-1, d)[rows.long()] = v_new.reshape(-1, d).to(v_pool.dtype)
