"""DMS paged decode attention: one Triton source for the runtime, the TensorRT plugin and the tests.

One new query token per sequence attends over its streams' live KV slots (layout in reference.py).
Flash-decoding: pass 1 (`dms_decode_split_kernel`) runs one program per (stream, block of query heads
of its GQA group, split of the token range) with an fp32 online softmax; pass 2
(`dms_decode_reduce_kernel`) merges the splits by their log-sum-exp. With one split, pass 1 writes the
output directly and pass 2 is skipped.

Decode is bandwidth-bound: every live K and V row is read exactly once, as a [BLOCK_N, head_dim] tile
of whole rows (contiguous 16-byte loads), and all G query heads sharing a stream reuse that tile
(padded to 16 rows so `tl.dot` can use the tensor cores; the extra FLOPs are free at this intensity).
The number of splits is planned from shapes only (never from stream_lens, so no host sync and the
launch can be captured in a CUDA graph or compiled ahead of time by the TensorRT plugin).

CPU tensors run the same kernel through Triton's interpreter (no need to set TRITON_INTERPRET before
import; if it is set, the module-level kernels are interpreter objects already).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch
import triton
import triton.language as tl

from .reference import check_decode_inputs

LOG2E = 1.4426950408889634
# Finite stand-in for "no tokens in this split": exp2(EMPTY_LSE - m) underflows to 0 for any real m,
# and an all-empty row merges to 0/0 guarded to 0 without ever forming inf - inf.
EMPTY_LSE = tl.constexpr(-1.0e30)
# The merge pass reads num_splits x head_dim fp32 per query head, SPLIT_BLOCK splits per step.
REDUCE_NUM_WARPS = 4
REDUCE_SPLIT_BLOCK = 16

# The kernels use only Triton builtins plus these combine functions (not tl.max / tl.sum / tl.zeros,
# which are themselves @jit functions): that is what lets a kernel compiled for the GPU also run
# through the interpreter on CPU tensors even when TRITON_INTERPRET was unset at import. Triton's own
# combine functions are preferred because the interpreter reduces them with numpy instead of one
# Python call per element; the local ones keep the module working if a release renames them.


@triton.jit
def _max_combine_fallback(a, b):
    return tl.maximum(a, b)


@triton.jit
def _sum_combine_fallback(a, b):
    return a + b


_max_combine = getattr(tl.standard, "_elementwise_max", _max_combine_fallback)
_sum_combine = getattr(tl.standard, "_sum_combine", _sum_combine_fallback)


@triton.jit
def dms_decode_split_kernel(
    q_ptr,  # [S, Hq, D]
    k_ptr,  # [num_blocks, block_size, D]
    v_ptr,  # [num_blocks, block_size, D]
    block_tables_ptr,  # int32 [S*Hkv, max_blocks]
    stream_lens_ptr,  # int32 [S*Hkv]
    out_ptr,  # [S, Hq, D]             written when SINGLE_SPLIT
    mid_o_ptr,  # fp32 [S*Hq, num_splits, D]  written otherwise (normalised partial outputs)
    mid_lse_ptr,  # fp32 [S*Hq, num_splits]   log2-sum-exp2 of each partial
    scale_log2,  # softmax scale * log2(e): scores are taken in base 2 (exp2 is the native op)
    stride_qs,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_vb,
    stride_vt,
    stride_bt,
    stride_os,
    stride_oh,
    num_kv_heads,
    group_size,
    block_size,
    tokens_per_split,
    num_splits,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    stream = tl.program_id(0)
    head_block = tl.program_id(1)
    split = tl.program_id(2)
    seq = stream // num_kv_heads
    kv_head = stream % num_kv_heads

    offs_g = head_block * BLOCK_H + tl.arange(0, BLOCK_H)  # head index inside the GQA group
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < group_size
    mask_d = offs_d < HEAD_DIM
    q_heads = kv_head * group_size + offs_g
    q_ptrs = q_ptr + seq.to(tl.int64) * stride_qs + q_heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_g[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_H, BLOCK_D]
    kv_dtype = k_ptr.dtype.element_ty
    if DOT_IN_FP32:
        q = q.to(tl.float32)

    length = tl.load(stream_lens_ptr + stream)
    split_start = split * tokens_per_split
    # The last split runs to the stream's end, so any plan is correct even when it was sized from a
    # length hint shorter than a stream (that split just does more of the work).
    split_end = tl.where(split == num_splits - 1, length, tl.minimum(split_start + tokens_per_split, length))

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_H], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_H, BLOCK_D], 0.0, dtype=tl.float32)
    bt_row = block_tables_ptr + stream.to(tl.int64) * stride_bt
    # Every tile of this loop holds at least one live token, so m_i is finite after the first one.
    for start in range(split_start, split_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < split_end
        block_ids = tl.load(bt_row + offs_n // block_size, mask=mask_n, other=0).to(tl.int64)
        slots = offs_n % block_size
        if BLOCK_D == HEAD_DIM:
            kv_mask = mask_n[:, None]  # no mask along d: keeps the row loads 16-byte vectorised
        else:
            kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(
            k_ptr + block_ids[:, None] * stride_kb + slots[:, None] * stride_kt + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        v = tl.load(
            v_ptr + block_ids[:, None] * stride_vb + slots[:, None] * stride_vt + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        if DOT_IN_FP32:  # interpreter + bf16 (see _dot_in_fp32); same bf16 rounding of p, fp32 products
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_H, BLOCK_N]
        scores = tl.where(mask_n[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(scores, 1, _max_combine))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, _sum_combine)
        acc = acc * alpha[:, None] + tl.dot(p.to(kv_dtype).to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has_tokens = l_i > 0.0
    out_tile = acc / tl.where(has_tokens, l_i, 1.0)[:, None]  # empty -> acc is 0 -> 0
    store_mask = mask_g[:, None] & mask_d[None, :]
    if SINGLE_SPLIT:
        o_ptrs = out_ptr + seq.to(tl.int64) * stride_os + q_heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out_tile.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        rows = stream.to(tl.int64) * group_size + offs_g  # = seq * Hq + q_head
        lse = tl.where(has_tokens, m_i + tl.log2(tl.where(has_tokens, l_i, 1.0)), EMPTY_LSE)
        tl.store(mid_lse_ptr + rows * num_splits + split, lse, mask=mask_g)
        mid_ptrs = mid_o_ptr + (rows[:, None] * num_splits + split) * HEAD_DIM + offs_d[None, :]
        tl.store(mid_ptrs, out_tile, mask=store_mask)


@triton.jit
def dms_decode_reduce_kernel(
    mid_o_ptr,  # fp32 [S*Hq, num_splits, D]
    mid_lse_ptr,  # fp32 [S*Hq, num_splits]
    out_ptr,  # [S, Hq, D]
    stride_os,
    stride_oh,
    num_q_heads,
    num_splits,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # seq * Hq + q_head
    offs_d = tl.arange(0, BLOCK_D)
    offs_s = tl.arange(0, SPLIT_BLOCK)
    mask_d = offs_d < HEAD_DIM
    m = tl.full([1], EMPTY_LSE, dtype=tl.float32)
    denom = tl.full([1], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_D], 0.0, dtype=tl.float32)
    # SPLIT_BLOCK partials per step: a few wide loads in flight instead of one dependent load per split.
    for s0 in range(0, num_splits, SPLIT_BLOCK):
        splits = s0 + offs_s
        mask_s = splits < num_splits
        lse = tl.load(mid_lse_ptr + row * num_splits + splits, mask=mask_s, other=EMPTY_LSE)  # [SPLIT_BLOCK]
        o = tl.load(
            mid_o_ptr + (row * num_splits + splits)[:, None] * HEAD_DIM + offs_d[None, :],
            mask=mask_s[:, None] & mask_d[None, :],
            other=0.0,
        )  # [SPLIT_BLOCK, BLOCK_D]
        m_new = tl.maximum(m, tl.reduce(lse, 0, _max_combine))
        alpha = tl.exp2(m - m_new)
        # An empty split has o == 0 and lse == EMPTY_LSE: it adds nothing once any split is non-empty.
        w = tl.where(lse > EMPTY_LSE, tl.exp2(lse - m_new), 0.0)
        acc = acc * alpha + tl.reduce(w[:, None] * o, 0, _sum_combine)
        denom = denom * alpha + tl.reduce(w, 0, _sum_combine)
        m = m_new
    out = acc / tl.where(denom > 0.0, denom, 1.0)
    seq = row // num_q_heads
    head = row % num_q_heads
    o_ptrs = out_ptr + seq * stride_os + head * stride_oh + offs_d
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_d)


@dataclass(frozen=True)
class DecodeLaunchPlan:
    """Compile-time block sizes and the split of each stream's token range; a function of shapes only."""

    block_h: int  # query heads per program (>= 16: tl.dot's minimum M)
    block_n: int  # tokens per tile
    block_d: int  # head_dim rounded up to a power of two
    num_head_blocks: int
    num_splits: int
    tokens_per_split: int  # multiple of block_n
    num_warps: int = 4
    num_stages: int = 2

    def split_grid(self, num_streams: int) -> tuple[int, int, int]:
        return (num_streams, self.num_head_blocks, self.num_splits)


def plan_decode_launch(
    num_streams: int,
    group_size: int,
    head_dim: int,
    capacity_tokens: int,
    elem_bytes: int,
    num_sms: int,
    num_splits: int | None = None,
) -> DecodeLaunchPlan:
    """Choose block sizes and splits over `capacity_tokens` (max_blocks * block_size, or a smaller
    bound on the live lengths when the caller knows one; the kernel's last split covers any excess).

    Splits are sized so the grid holds about 4 programs per SM (a full wave with slack for uneven
    lengths) while each split still reads at least 4 tiles: fewer, longer programs when there are many
    streams; more, shorter ones for a single long sequence.
    """
    block_h = min(max(16, triton.next_power_of_2(group_size)), 64)
    block_d = max(16, triton.next_power_of_2(head_dim))
    # A K and a V tile of 64 x 128 bf16 are 16 KiB each: two pipeline stages fit easily in shared memory.
    block_n = 64 if block_d * elem_bytes <= 256 else 32
    num_head_blocks = triton.cdiv(group_size, block_h)
    min_split_tokens = 4 * block_n
    if num_splits is None:
        programs_per_split = max(1, num_streams * num_head_blocks)
        wanted = triton.cdiv(4 * max(1, num_sms), programs_per_split)
        num_splits = max(1, min(wanted, triton.cdiv(max(capacity_tokens, 1), min_split_tokens)))
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    tokens_per_split = triton.cdiv(triton.cdiv(max(capacity_tokens, 1), num_splits), block_n) * block_n
    num_splits = max(1, triton.cdiv(capacity_tokens, tokens_per_split))
    return DecodeLaunchPlan(block_h, block_n, block_d, num_head_blocks, num_splits, tokens_per_split)


@cache
def _interpreted(kernel):
    """The interpreter twin of a @triton.jit kernel, for CPU tensors when TRITON_INTERPRET was unset."""
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(kernel.fn)


def _kernel_for(kernel, device: torch.device):
    if device.type == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        return kernel if isinstance(kernel, InterpretedFunction) else _interpreted(kernel)
    if device.type != "cuda":
        raise ValueError(f"paged_decode_attention runs on CUDA or (interpreted) CPU tensors, not {device}")
    return kernel


def _dot_in_fp32(kernel, dtype: torch.dtype) -> bool:
    """Triton's interpreter (3.9) multiplies bf16 tl.dot operands as raw integers; there the tiles
    are upcast after loading (p is still rounded to bf16 first, as on the GPU).
    Compiled kernels keep bf16 dots."""
    from triton.runtime.interpreter import InterpretedFunction

    return dtype == torch.bfloat16 and isinstance(kernel, InterpretedFunction)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 pools: three-pass tf32 ("tf32x3", about fp32 accuracy on the tensor cores). Plain "ieee"
    compiles to an FMA dot that spills registers at these tile sizes (sm_90: 255 regs + 384 B stack)."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter runs programs one after another: splitting buys nothing


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    stream_lens: torch.Tensor,
    scale: float,
    num_kv_heads: int,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    plan: DecodeLaunchPlan | None = None,
    max_stream_len: int | None = None,
) -> torch.Tensor:
    """Decode attention of one new token per sequence over each (sequence, KV head) stream's live slots.

    q [S, Hq, D]; k_cache, v_cache [num_blocks, block_size, D] (one layer's pool); block_tables int32
    [S*Hkv, max_blocks]; stream_lens int32 [S*Hkv] (live tokens, including the new one if it was
    written first). Returns [S, Hq, D] in q's dtype; a stream of length 0 yields zeros.
    `num_splits` overrides the planned split count (tests); `plan` replaces the whole launch plan
    (tuning: see ci/gpu_check.py --sweep); `out` may be a preallocated [S, Hq, D] tensor of q's dtype
    (CUDA-graph friendly). `max_stream_len`, a host-side bound on the live lengths (the runtime's
    bookkeeping knows it), sizes the splits to the live KV instead of the block-table capacity: with
    DMS the live lengths are a fraction of the capacity. A bound that is too small stays correct
    (the last split reads the rest), only slower.
    """
    num_seqs, num_q_heads, head_dim, group = check_decode_inputs(
        q, k_cache, v_cache, block_tables, stream_lens, num_kv_heads
    )
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(
            f"out must be a {tuple(q.shape)} {q.dtype} tensor on {q.device} with unit last stride"
        )
    num_streams = num_seqs * num_kv_heads
    if num_streams == 0:
        return out
    capacity = block_tables.shape[1] * k_cache.shape[1]
    if max_stream_len is not None:
        capacity = min(capacity, max(1, int(max_stream_len)))
    if plan is None:
        plan = plan_decode_launch(
            num_streams, group, head_dim, capacity, q.element_size(), _num_sms(q.device), num_splits
        )
    elif plan.block_h * plan.num_head_blocks < group:
        raise ValueError(f"launch plan {plan} covers {plan.block_h * plan.num_head_blocks} of {group} heads")
    single = plan.num_splits == 1
    if single:
        mid_o = mid_lse = out  # unused by the kernel when SINGLE_SPLIT
    else:
        rows = num_seqs * num_q_heads
        mid_o = torch.empty(rows, plan.num_splits, head_dim, dtype=torch.float32, device=q.device)
        mid_lse = torch.empty(rows, plan.num_splits, dtype=torch.float32, device=q.device)
    precision = _dot_precision(q.dtype)
    split_kernel = _kernel_for(dms_decode_split_kernel, q.device)
    split_kernel[plan.split_grid(num_streams)](
        q, k_cache, v_cache, block_tables, stream_lens, out, mid_o, mid_lse,
        float(scale) * LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        num_kv_heads, group, k_cache.shape[1], plan.tokens_per_split, plan.num_splits,
        BLOCK_H=plan.block_h, BLOCK_N=plan.block_n, BLOCK_D=plan.block_d, HEAD_DIM=head_dim,
        SINGLE_SPLIT=single, DOT_PRECISION=precision, DOT_IN_FP32=_dot_in_fp32(split_kernel, q.dtype),
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )  # fmt: skip
    if not single:
        reduce_kernel = _kernel_for(dms_decode_reduce_kernel, q.device)
        reduce_kernel[(num_seqs * num_q_heads,)](
            mid_o, mid_lse, out, out.stride(0), out.stride(1), num_q_heads, plan.num_splits,
            BLOCK_D=plan.block_d, HEAD_DIM=head_dim, SPLIT_BLOCK=REDUCE_SPLIT_BLOCK,
            num_warps=REDUCE_NUM_WARPS,
        )  # fmt: skip
    return out


def default_scale(head_dim: int) -> float:
    """The usual softmax scale 1/sqrt(head_dim)."""
    return 1.0 / math.sqrt(head_dim)


_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# Integer arguments a contiguous pool with head_dim % 16 == 0 makes multiples of 16; the JIT finds the
# same at launch and then emits 16-byte loads. stride_bt (max_blocks) and the counts are left unhinted.
_ALIGNED_INT_ARGS = (
    "stride_qs", "stride_qh", "stride_kb", "stride_kt", "stride_vb", "stride_vt", "stride_os", "stride_oh",
)  # fmt: skip


def compile_decode_kernels(
    dtype: torch.dtype,
    head_dim: int,
    plan: DecodeLaunchPlan,
    capability: int = 90,
) -> dict:
    """Compile both kernels ahead of time for one GPU architecture (no GPU needed: Triton ships ptxas).

    Returns {"split": CompiledKernel, "reduce": CompiledKernel | None} whose `.asm` holds "ptx" and
    "cubin" and whose `.metadata` holds shared memory, num_warps and the kernel name: what a TensorRT
    plugin's ahead-of-time implementation returns. The binaries assume what `paged_decode_attention`
    sees in practice and must be guarded by the caller: all pointers 16-byte aligned and the strides in
    `_ALIGNED_INT_ARGS` multiples of 16 elements (contiguous q/out/pool with head_dim % 16 == 0).
    Written against Triton 3.x's `ASTSource(fn, signature, constexprs, attrs)`.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    elem = _TRITON_TYPES[dtype]
    target = GPUTarget("cuda", capability, 32)
    single = plan.num_splits == 1
    pointer_types = {
        "q_ptr": elem, "k_ptr": elem, "v_ptr": elem, "out_ptr": elem, "block_tables_ptr": "i32",
        "stream_lens_ptr": "i32", "mid_o_ptr": "fp32", "mid_lse_ptr": "fp32",
    }  # fmt: skip
    split_consts = {
        "BLOCK_H": plan.block_h, "BLOCK_N": plan.block_n, "BLOCK_D": plan.block_d, "HEAD_DIM": head_dim,
        "SINGLE_SPLIT": single, "DOT_PRECISION": _dot_precision(dtype),
        "DOT_IN_FP32": False,
    }  # fmt: skip
    reduce_consts = {"BLOCK_D": plan.block_d, "HEAD_DIM": head_dim, "SPLIT_BLOCK": REDUCE_SPLIT_BLOCK}

    def build(kernel, consts: dict, options: dict):
        names = kernel.arg_names
        signature, attrs = {}, {}
        for i, name in enumerate(names):
            if name in consts:
                signature[name] = "constexpr"
            elif name in pointer_types:
                signature[name] = "*" + pointer_types[name]
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif name == "scale_log2":
                signature[name] = "fp32"
            else:
                signature[name] = "i32"
                if name in _ALIGNED_INT_ARGS:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        # Constexprs keyed by (argument index,): the form every Triton 3.x ASTSource accepts.
        constexprs = {(names.index(name),): value for name, value in consts.items()}
        src = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
        return triton.compile(src, target=target, options=options)

    split = build(
        dms_decode_split_kernel, split_consts, {"num_warps": plan.num_warps, "num_stages": plan.num_stages}
    )
    reduce = (
        None if single else build(dms_decode_reduce_kernel, reduce_consts, {"num_warps": REDUCE_NUM_WARPS})
    )
    return {"split": split, "reduce": reduce}
