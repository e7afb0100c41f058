"""DMS prefill attention (the context phase) as one Triton kernel, for the TensorRT plugin.

Exact prefill (docs/dms.md section 4): query q sees key k when k <= q, unless k is beyond the window
(q - k > window) and k was evicted (its decision, already shifted by one, is set). Sequences are packed
without padding (TensorRT-LLM's remove_input_padding): token rows of sequence b are
cu_seqlens[b] .. cu_seqlens[b+1]-1, at consecutive logical positions from positions[cu_seqlens[b]].

Chunked prefill: a sequence's chunk also attends to what its streams already store from earlier chunks
(its "past"), read from the per-head paged pool through a block table as the decode kernel does. Stored
tokens carry an expiry instead of a flag: the first query position that no longer sees them (position +
window + 1 for a token whose eviction is decided, effectively never for a kept one), which the host
computes from its bookkeeping.

Shapes: q [N, Hq, D]; k, v [N, Hkv, D]; evicted int32 [N, Hkv] (1 = evicted, shifted by one, 0 for each
sequence's last token); cu_seqlens int32 [B+1]; positions int32 [N]; past: k_pool, v_pool [NB, BS, D],
past_tables int32 [B*Hkv, MB], past_lens int32 [B*Hkv], past_expiry int32 [B*Hkv, P] (P >= every past
length). Output [N, Hq, D].

Like decode.py this imports only torch and triton (it runs inside the TensorRT-LLM environment), and CPU
tensors run through Triton's interpreter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
NEVER = 1 << 30  # expiry of a stored token that stays visible to every later query


# tl.max / tl.sum are themselves @jit functions, which a kernel compiled for the GPU cannot call when
# it runs through the interpreter (TRITON_INTERPRET unset at import): reduce with plain combine
# functions instead, as decode.py does.
@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _sum_combine(a, b):
    return a + b


@triton.jit
def dms_prefill_kernel(
    q_ptr,  # [N, Hq, D]
    k_ptr,  # [N, Hkv, D]
    v_ptr,  # [N, Hkv, D]
    evicted_ptr,  # int32 [N, Hkv]
    cu_seqlens_ptr,  # int32 [B+1]
    positions_ptr,  # int32 [N]
    k_pool_ptr,  # [NB, BS, D]   the past, paged
    v_pool_ptr,
    past_tables_ptr,  # int32 [B*Hkv, MB]
    past_lens_ptr,  # int32 [B*Hkv]
    past_expiry_ptr,  # int32 [B*Hkv, P]
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_en,
    num_q_heads,
    group_size,
    num_kv_heads,
    stride_bt,
    stride_ex,
    block_size,
    out_ptr,  # [N, Hq, D]: after the scalars, where a TensorRT AOT plugin passes its outputs
    SCALE_LOG2: tl.constexpr,
    WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    UPCAST: tl.constexpr,  # fp32 tiles: fp32 inputs, and the interpreter (which mishandles bf16 dots)
):
    q_block = tl.program_id(0)
    bh = tl.program_id(1)
    seq = bh // num_q_heads
    head = bh % num_q_heads
    kv_head = head // group_size
    start = tl.load(cu_seqlens_ptr + seq)
    length = tl.load(cu_seqlens_ptr + seq + 1) - start
    if q_block * BLOCK_M < length:
        offs_m = q_block * BLOCK_M + tl.arange(0, BLOCK_M)  # offsets inside the chunk
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < length
        mask_d = offs_d < HEAD_DIM
        rows = (start + offs_m).to(tl.int64)
        q = tl.load(
            q_ptr + rows[:, None] * stride_qn + head * stride_qh + offs_d[None, :],
            mask=mask_m[:, None] & mask_d[None, :],
            other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
        acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
        # Keys 0..past_len-1 are the stored tokens (every one precedes the chunk; hidden from queries at or
        # after its expiry), then the chunk's own (causal; an evicted one hidden beyond the window). One
        # loop over both: a tile may straddle the two, so each key is loaded from where it lives.
        stream = (seq * num_kv_heads + kv_head).to(tl.int64)
        past_len = tl.load(past_lens_ptr + stream)
        q_pos = tl.load(positions_ptr + start) + offs_m
        hi = past_len + tl.minimum((q_block + 1) * BLOCK_M, length)  # causal: no key after the last query
        for j_start in range(0, hi, BLOCK_N):
            offs_j = j_start + tl.arange(0, BLOCK_N)
            in_past = offs_j < past_len
            offs_c = offs_j - past_len  # offset inside the chunk (negative for stored keys)
            in_chunk = (offs_c >= 0) & (offs_c < length)
            block = tl.load(
                past_tables_ptr + stream * stride_bt + offs_j // block_size, mask=in_past, other=0
            )
            prow = block.to(tl.int64) * block_size + offs_j % block_size
            crow = (start + offs_c).to(tl.int64)
            p_mask = in_past[:, None] & mask_d[None, :]
            c_mask = in_chunk[:, None] & mask_d[None, :]
            c_off = crow[:, None] * stride_kn + kv_head * stride_kh + offs_d[None, :]
            p_off = prow[:, None] * HEAD_DIM + offs_d[None, :]
            k = tl.load(k_pool_ptr + p_off, mask=p_mask, other=0.0) + tl.load(
                k_ptr + c_off, mask=c_mask, other=0.0
            )
            v = tl.load(v_pool_ptr + p_off, mask=p_mask, other=0.0) + tl.load(
                v_ptr + c_off, mask=c_mask, other=0.0
            )
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            expiry = tl.load(past_expiry_ptr + stream * stride_ex + offs_j, mask=in_past, other=0)
            gone = tl.load(evicted_ptr + crow * stride_en + kv_head, mask=in_chunk, other=0) != 0
            dist = offs_m[:, None] - offs_c[None, :]
            visible = (in_past[None, :] & (q_pos[:, None] < expiry[None, :])) | (
                in_chunk[None, :] & (dist >= 0) & ~((dist > WINDOW) & gone[None, :])
            )
            scores = tl.dot(q, tl.trans(k)) * SCALE_LOG2  # fp32 accumulation
            scores = tl.where(visible, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.reduce(scores, 1, _max_combine))
            # Every query sees itself, so after the tile that holds it m_new is finite; before it, a row
            # may be all -inf: keep the update finite with a 0 reference.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(scores - m_safe[:, None])
            l_i = l_i * alpha + tl.reduce(p, 1, _sum_combine)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + rows[:, None] * stride_qn + head * stride_qh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=mask_m[:, None] & mask_d[None, :],
        )


def prefill_block_sizes(head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D): 16 x 16 tiles keep the interpreter fast; 64 x 64 on the GPU."""
    return 64, 64, max(16, triton.next_power_of_2(head_dim))


@dataclass(frozen=True)
class PrefillPast:
    """What each stream of the call already stores (see the module docstring). positions: int32 [N], the
    logical position of every packed token (a chunk's start, where its sequence has a past)."""

    positions: torch.Tensor
    k_pool: torch.Tensor
    v_pool: torch.Tensor
    tables: torch.Tensor
    lens: torch.Tensor
    expiry: torch.Tensor

    @classmethod
    def empty(cls, q: torch.Tensor, num_streams: int) -> PrefillPast:
        """No past (every sequence starts at position 0)."""
        dev, d = q.device, q.shape[-1]
        zeros = torch.zeros((num_streams, 1), dtype=torch.int32, device=dev)
        pool = torch.zeros((1, 1, d), dtype=q.dtype, device=dev)
        return cls(torch.zeros(q.shape[0], dtype=torch.int32, device=dev), pool, pool, zeros,
                   zeros[:, 0].contiguous(), zeros)  # fmt: skip

    def check(self, n: int, num_streams: int, q: torch.Tensor) -> None:
        int32 = ("positions", "tables", "lens", "expiry")
        for name in int32:
            if getattr(self, name).dtype != torch.int32:
                raise ValueError(f"past.{name} must be int32, got {getattr(self, name).dtype}")
        if self.positions.shape != (n,) or self.lens.shape != (num_streams,):
            raise ValueError(f"past.positions must be [{n}] and past.lens [{num_streams}]")
        if self.tables.shape[0] != num_streams or self.expiry.shape[0] != num_streams:
            raise ValueError(f"past.tables and past.expiry need {num_streams} rows (sequences x KV heads)")
        if self.k_pool.shape != self.v_pool.shape or self.k_pool.shape[-1] != q.shape[-1]:
            raise ValueError("past.k_pool and past.v_pool must be [num_blocks, block_size, head_dim]")
        if self.k_pool.dtype != q.dtype:
            raise ValueError(f"the pool is {self.k_pool.dtype}, q is {q.dtype}")
        for name in ("positions", "k_pool", "v_pool", "tables", "lens", "expiry"):
            if not getattr(self, name).is_contiguous():
                raise ValueError(f"past.{name} must be contiguous; call .contiguous()")


def dms_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    evicted: torch.Tensor,
    cu_seqlens: torch.Tensor,
    window: int,
    scale: float,
    past: PrefillPast | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Launch `dms_prefill_kernel` (CUDA, or the interpreter for CPU tensors). Shapes: module docstring."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    if k.shape != v.shape or k.shape[0] != n or k.shape[2] != d or hq % hkv:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit together")
    if evicted.shape != (n, hkv) or evicted.dtype != torch.int32:
        raise ValueError(f"evicted must be int32 [{n}, {hkv}], got {evicted.dtype} {tuple(evicted.shape)}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        raise ValueError("cu_seqlens must be int32 [num_seqs + 1]")
    for name, t in (("q", q), ("k", k), ("v", v), ("evicted", evicted)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous; call .contiguous()")
    batch = cu_seqlens.shape[0] - 1
    past = past or PrefillPast.empty(q, batch * hkv)
    past.check(n, batch * hkv, q)
    bm, bn, bd = prefill_block_sizes(d)
    bm, bn = block_m or bm, block_n or bn
    out = torch.empty_like(q)
    kernel = dms_prefill_kernel
    if q.device.type == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        kernel = kernel if isinstance(kernel, InterpretedFunction) else InterpretedFunction(kernel.fn)
    grid = (triton.cdiv(max(n, 1), bm), batch * hq)
    kernel[grid](
        q, k, v, evicted, cu_seqlens, past.positions, past.k_pool, past.v_pool, past.tables, past.lens,
        past.expiry, q.stride(0), q.stride(1), k.stride(0), k.stride(1), evicted.stride(0), hq, hq // hkv,
        hkv, past.tables.stride(0), past.expiry.stride(0), past.k_pool.shape[1], out,
        SCALE_LOG2=float(scale) * LOG2E, WINDOW=int(window), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, HEAD_DIM=d,
        UPCAST=q.device.type == "cpu" or q.dtype == torch.float32,
    )  # fmt: skip
    return out


def reference_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    evicted: torch.Tensor,
    cu_seqlens: torch.Tensor,
    window: int,
    scale: float,
    past: PrefillPast | None = None,
) -> torch.Tensor:
    """The same function in float64 torch, one sequence and head at a time (the kernel's ground truth)."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    hkv = k.shape[1]
    g = q.shape[1] // hkv
    bounds = cu_seqlens.tolist()
    for b, (s, e) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        pos = torch.arange(e - s)
        dist = pos[:, None] - pos[None, :]
        for h in range(q.shape[1]):
            kv = h // g
            gone = evicted[s:e, kv].bool()
            keys, values = k[s:e, kv].double(), v[s:e, kv].double()
            visible = (dist >= 0) & ~((dist > window) & gone[None, :])
            if past is not None and e > s:
                stream = b * hkv + kv
                n = int(past.lens[stream])
                slot = torch.arange(n)
                bs = past.k_pool.shape[1]
                rows = past.tables[stream, slot // bs].long() * bs + slot % bs
                d = past.k_pool.shape[-1]
                keys = torch.cat([past.k_pool.reshape(-1, d)[rows].double(), keys])
                values = torch.cat([past.v_pool.reshape(-1, d)[rows].double(), values])
                q_pos = int(past.positions[s]) + pos
                seen = q_pos[:, None] < past.expiry[stream, :n][None, :]
                visible = torch.cat([seen, visible], dim=1)
            scores = (q[s:e, h].double() @ keys.T) * scale
            probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
            out[s:e, h] = probs @ values
    return out
