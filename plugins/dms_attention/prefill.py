"""DMS prefill attention (the context phase) as one Triton kernel, for the TensorRT plugin.

Exact prefill (docs/dms.md section 4): query q sees key k when k <= q, unless k is beyond the window
(q - k > window) and k was evicted (its decision, already shifted by one, is set). Sequences are packed
without padding (TensorRT-LLM's remove_input_padding): token rows of sequence b are
cu_seqlens[b] .. cu_seqlens[b+1]-1, positions restart at 0 for each sequence.

Shapes: q [N, Hq, D]; k, v [N, Hkv, D]; evicted int32 [N, Hkv] (1 = evicted, shifted by one, 0 for each
sequence's last token); cu_seqlens int32 [B+1]. Output [N, Hq, D].

Like decode.py this imports only torch and triton (it runs inside the TensorRT-LLM environment), and CPU
tensors run through Triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


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
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_en,
    num_q_heads,
    group_size,
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
        offs_m = q_block * BLOCK_M + tl.arange(0, BLOCK_M)  # positions inside the sequence
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
        hi = tl.minimum((q_block + 1) * BLOCK_M, length)  # causal: no key after the block's last query
        for k_start in range(0, hi, BLOCK_N):
            offs_n = k_start + tl.arange(0, BLOCK_N)
            mask_n = offs_n < length
            krows = (start + offs_n).to(tl.int64)
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(
                k_ptr + krows[:, None] * stride_kn + kv_head * stride_kh + offs_d[None, :],
                mask=kv_mask,
                other=0.0,
            )
            v = tl.load(
                v_ptr + krows[:, None] * stride_kn + kv_head * stride_kh + offs_d[None, :],
                mask=kv_mask,
                other=0.0,
            )
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            gone = tl.load(evicted_ptr + krows * stride_en + kv_head, mask=mask_n, other=0) != 0
            dist = offs_m[:, None] - offs_n[None, :]
            visible = (dist >= 0) & mask_n[None, :] & ~((dist > WINDOW) & gone[None, :])
            scores = tl.dot(q, tl.trans(k)) * SCALE_LOG2  # fp32 accumulation
            scores = tl.where(visible, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.reduce(scores, 1, _max_combine))
            # Every query sees itself, so after the first tile that holds it m_new is finite; before
            # it, a row may be all -inf: keep the update finite with a 0 reference.
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


def dms_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    evicted: torch.Tensor,
    cu_seqlens: torch.Tensor,
    window: int,
    scale: float,
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
    bm, bn, bd = prefill_block_sizes(d)
    bm, bn = block_m or bm, block_n or bn
    out = torch.empty_like(q)
    batch = cu_seqlens.shape[0] - 1
    kernel = dms_prefill_kernel
    if q.device.type == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        kernel = kernel if isinstance(kernel, InterpretedFunction) else InterpretedFunction(kernel.fn)
    grid = (triton.cdiv(max(n, 1), bm), batch * hq)
    kernel[grid](
        q, k, v, evicted, cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), evicted.stride(0), hq, hq // hkv, out,
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
) -> torch.Tensor:
    """The same function in float64 torch, one sequence at a time (the kernel's ground truth)."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    hkv = k.shape[1]
    g = q.shape[1] // hkv
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        pos = torch.arange(e - s)
        dist = pos[:, None] - pos[None, :]
        for h in range(q.shape[1]):
            kv = h // g
            gone = evicted[s:e, kv].bool()
            visible = (dist >= 0) & ~((dist > window) & gone[None, :])
            scores = (q[s:e, h].double() @ k[s:e, kv].double().T) * scale
            probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
            out[s:e, h] = probs @ v[s:e, kv].double()
    return out
