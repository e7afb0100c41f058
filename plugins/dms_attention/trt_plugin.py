"""DMS attention as TensorRT plugins (`tensorrt.plugin`, ahead-of-time): `dms::paged_decode`,
`dms::pool_write` and `dms::prefill`.

Runs inside the TensorRT-LLM 1.2.1 environment (TensorRT 10.14, Triton 3.5): imports torch, triton and
this package's kernels only, never `pipeline`. The split of work:

- Host side, testable anywhere (CPU tensors run through Triton's interpreter):
  `dms_decode_trt_kernel` wraps the runtime's decode kernel (`decode.dms_decode_split_kernel`, the same
  source, not a copy) in the one-launch form an AOT plugin needs: a single split, the softmax scale as a
  compile-time constant, the V pool and output strides equal to the K pool and q strides.
  `trt_paged_decode` launches it from torch; `compile_decode_aot` / `compile_prefill_aot` compile the
  two kernels to PTX for sm_90 (no GPU needed); `DECODE_TACTICS` / `PREFILL_TACTICS` are the autotune
  candidates.
- TensorRT side (`register_plugins()`, needs `tensorrt>=10.8`): `@trtp.register` shape/type descriptors,
  `@trtp.autotune` type and tactic combinations, `@trtp.aot_impl` returning (kernel name, PTX, launch
  parameters, extra scalar arguments). AOT is what lets the engine run without Python (trtllm's C++
  runtime, Triton's tensorrtllm backend).

Plugin I/O (S sequences in the generation phase; N packed tokens in the context phase):
    dms::paged_decode(q [S, Hq, D], k_pool [NB, BS, D], v_pool [NB, BS, D], block_tables int32
        [S*Hkv, MB], stream_lens int32 [S*Hkv]; scale: float, num_kv_heads: int) -> out [S, Hq, D]
    dms::pool_write(k_pool, v_pool [NB, BS, D], k_new, v_new [S, Hkv, D], rows int32 [S*Hkv])
        -> (k_pool, v_pool) aliased: each stream's new token written into the row the host chose
    dms::prefill(q [N, Hq, D], k [N, Hkv, D], v [N, Hkv, D], evicted int32 [N, Hkv], cu_seqlens int32
        [B+1], positions int32 [N], k_pool, v_pool [NB, BS, D], past_tables int32 [B*Hkv, MB], past_lens
        int32 [B*Hkv], past_expiry int32 [B*Hkv, P]; scale: float, window: int) -> out [N, Hq, D]
        (a chunk attends to its streams' stored tokens too: chunked prefill, see prefill.py)
"""

# No `from __future__ import annotations`: tensorrt.plugin validates the decorated functions' annotations
# with inspect.signature, which would see strings.
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .decode import LOG2E, dms_decode_split_kernel
from .prefill import dms_prefill_kernel, prefill_block_sizes
from .reference import check_decode_inputs

DECODE_ID = "dms::paged_decode"
PREFILL_ID = "dms::prefill"
POOL_WRITE_ID = "dms::pool_write"


@dataclass(frozen=True)
class Tactic:
    block_n: int
    num_warps: int


# Autotune candidates (tactic id -> launch shape). Ids start at 1: TensorRT reserves 0 for "default".
DECODE_TACTICS = {1: Tactic(32, 4), 2: Tactic(64, 4), 3: Tactic(64, 8)}
PREFILL_TACTICS = {1: Tactic(64, 4), 2: Tactic(32, 4), 3: Tactic(64, 8)}


@triton.jit
def dms_decode_trt_kernel(
    q_ptr,  # [S, Hq, D]      TensorRT passes the inputs' pointers first,
    k_ptr,  # [NB, BS, D]
    v_ptr,  # [NB, BS, D]
    block_tables_ptr,  # int32 [S*Hkv, MB]
    stream_lens_ptr,  # int32 [S*Hkv]
    stride_qs,  # then the extra scalar arguments (aot_impl's SymIntExprs),
    stride_qh,
    stride_kb,
    stride_kt,
    stride_bt,
    num_kv_heads,
    group_size,
    block_size,
    tokens_per_split,
    out_ptr,  # [S, Hq, D]    then the outputs.
    SCALE_LOG2: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    """The runtime's decode kernel, single split (one launch; no scratch buffers)."""
    dms_decode_split_kernel(
        q_ptr, k_ptr, v_ptr, block_tables_ptr, stream_lens_ptr, out_ptr, out_ptr, out_ptr,
        SCALE_LOG2, stride_qs, stride_qh, stride_kb, stride_kt, stride_kb, stride_kt, stride_bt,
        stride_qs, stride_qh, num_kv_heads, group_size, block_size, tokens_per_split, 1,
        BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, HEAD_DIM=HEAD_DIM, SINGLE_SPLIT=True,
        DOT_PRECISION=DOT_PRECISION, DOT_IN_FP32=DOT_IN_FP32,
    )  # fmt: skip


@triton.jit
def dms_pool_write_kernel(
    k_pool_ptr,  # [NB, BS, D]  (input; the outputs below alias it: written in place)
    v_pool_ptr,
    k_new_ptr,  # [S, Hkv, D]  the new token's K of every stream, stream-major
    v_new_ptr,
    rows_ptr,  # int32 [S*Hkv]  pool row (block * BS + slot) of each stream's new token, chosen by the host
    k_out_ptr,  # aliases k_pool
    v_out_ptr,  # aliases v_pool
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Write each stream's new K/V row into its slot (an evicted token's slot reused in place, or the next
    free one): one program per stream."""
    stream = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < HEAD_DIM
    row = tl.load(rows_ptr + stream).to(tl.int64)
    src = stream.to(tl.int64) * HEAD_DIM + offs
    tl.store(k_out_ptr + row * HEAD_DIM + offs, tl.load(k_new_ptr + src, mask=mask), mask=mask)
    tl.store(v_out_ptr + row * HEAD_DIM + offs, tl.load(v_new_ptr + src, mask=mask), mask=mask)


def trt_pool_write(
    k_pool: torch.Tensor, v_pool: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, rows: torch.Tensor
) -> None:
    """Launch `dms_pool_write_kernel` from torch (in place). Shapes as in the kernel."""
    head_dim = k_pool.shape[-1]
    if k_new.shape != v_new.shape or k_new.shape[-1] != head_dim or rows.dtype != torch.int32:
        raise ValueError("k_new, v_new must be [S, Hkv, D] like the pool's rows; rows int32 [S*Hkv]")
    if rows.numel() != k_new.shape[0] * k_new.shape[1]:
        raise ValueError(f"rows has {rows.numel()} entries for {k_new.shape[0] * k_new.shape[1]} streams")
    kernel = dms_pool_write_kernel
    if k_pool.device.type == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        kernel = kernel if isinstance(kernel, InterpretedFunction) else InterpretedFunction(kernel.fn)
    block_d = max(16, triton.next_power_of_2(head_dim))
    kernel[(rows.numel(),)](
        k_pool, v_pool, k_new.contiguous(), v_new.contiguous(), rows, k_pool, v_pool,
        HEAD_DIM=head_dim, BLOCK_D=block_d,
    )  # fmt: skip


def decode_blocks(group_size: int, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_D, num_head_blocks): as decode.plan_decode_launch chooses them."""
    block_h = min(max(16, triton.next_power_of_2(group_size)), 64)
    return block_h, max(16, triton.next_power_of_2(head_dim)), triton.cdiv(group_size, block_h)


def _dot_precision(dtype: torch.dtype) -> str:
    return "tf32x3" if dtype == torch.float32 else "tf32"


def trt_paged_decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    stream_lens: torch.Tensor,
    scale: float,
    num_kv_heads: int,
    tactic: int = 2,
) -> torch.Tensor:
    """Launch the plugin's decode kernel from torch, with the arguments the AOT plugin passes.

    Shapes as `decode.paged_decode_attention`; q, pools and tables contiguous (the plugin's layout).
    """
    num_seqs, _, head_dim, group = check_decode_inputs(
        q, k_pool, v_pool, block_tables, stream_lens, num_kv_heads
    )
    for name, t in (("q", q), ("k_pool", k_pool), ("v_pool", v_pool), ("block_tables", block_tables)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the plugin's layout); call .contiguous()")
    t = DECODE_TACTICS[tactic]
    block_h, block_d, head_blocks = decode_blocks(group, head_dim)
    out = torch.empty_like(q)
    kernel = dms_decode_trt_kernel
    interpreted = q.device.type == "cpu"
    if interpreted:
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(kernel, InterpretedFunction):
            # This wrapper calls the runtime kernel as a function; Triton's interpreter follows such
            # calls only when TRITON_INTERPRET=1 was set before triton was imported.
            raise RuntimeError("CPU tensors: run with TRITON_INTERPRET=1 set before importing triton")
    capacity = block_tables.shape[1] * k_pool.shape[1]
    kernel[(num_seqs * num_kv_heads, head_blocks, 1)](
        q, k_pool, v_pool, block_tables, stream_lens,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), block_tables.stride(0),
        num_kv_heads, group, k_pool.shape[1], max(capacity, 1), out,
        SCALE_LOG2=float(scale) * LOG2E, BLOCK_H=block_h, BLOCK_N=t.block_n, BLOCK_D=block_d,
        HEAD_DIM=head_dim, DOT_PRECISION=_dot_precision(q.dtype),
        DOT_IN_FP32=interpreted and q.dtype == torch.bfloat16, num_warps=t.num_warps,
    )  # fmt: skip
    return out


_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _signature(kernel, pointers: dict[str, str], consts: dict) -> tuple[dict, dict]:
    """Triton 3.x ASTSource signature and 16-byte alignment hints for the pointers."""
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in consts:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
    return signature, attrs


def compile_decode_aot(
    dtype: torch.dtype, head_dim: int, group_size: int, scale: float, tactic: int, capability: int = 90
):
    """Compile `dms_decode_trt_kernel` for one GPU architecture; `.asm["ptx"]`, `.metadata.name`,
    `.metadata.shared` are what the AOT plugin hands TensorRT."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t = DECODE_TACTICS[tactic]
    block_h, block_d, _ = decode_blocks(group_size, head_dim)
    elem = _TRITON_TYPES[dtype]
    consts = {
        "SCALE_LOG2": float(scale) * LOG2E, "BLOCK_H": block_h, "BLOCK_N": t.block_n, "BLOCK_D": block_d,
        "HEAD_DIM": head_dim, "DOT_PRECISION": _dot_precision(dtype), "DOT_IN_FP32": False,
    }  # fmt: skip
    pointers = {"q_ptr": elem, "k_ptr": elem, "v_ptr": elem, "out_ptr": elem,
                "block_tables_ptr": "i32", "stream_lens_ptr": "i32"}
    signature, attrs = _signature(dms_decode_trt_kernel, pointers, consts)
    src = ASTSource(dms_decode_trt_kernel, signature, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options={"num_warps": t.num_warps})


def compile_prefill_aot(
    dtype: torch.dtype, head_dim: int, scale: float, window: int, tactic: int, capability: int = 90
):
    """Compile `prefill.dms_prefill_kernel` for one GPU architecture (see `compile_decode_aot`)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t = PREFILL_TACTICS[tactic]
    block_m, _, block_d = prefill_block_sizes(head_dim)
    elem = _TRITON_TYPES[dtype]
    consts = {"SCALE_LOG2": float(scale) * LOG2E, "WINDOW": int(window), "BLOCK_M": block_m,
              "BLOCK_N": t.block_n, "BLOCK_D": block_d, "HEAD_DIM": head_dim,
              "UPCAST": dtype == torch.float32}
    pointers = {"q_ptr": elem, "k_ptr": elem, "v_ptr": elem, "out_ptr": elem, "k_pool_ptr": elem,
                "v_pool_ptr": elem, "evicted_ptr": "i32", "cu_seqlens_ptr": "i32", "positions_ptr": "i32",
                "past_tables_ptr": "i32", "past_lens_ptr": "i32", "past_expiry_ptr": "i32"}
    signature, attrs = _signature(dms_prefill_kernel, pointers, consts)
    src = ASTSource(dms_prefill_kernel, signature, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options={"num_warps": t.num_warps})


def compile_pool_write_aot(dtype: torch.dtype, head_dim: int, capability: int = 90):
    """Compile `dms_pool_write_kernel` for one GPU architecture (see `compile_decode_aot`)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    elem = _TRITON_TYPES[dtype]
    consts = {"HEAD_DIM": head_dim, "BLOCK_D": max(16, triton.next_power_of_2(head_dim))}
    names = ("k_pool_ptr", "v_pool_ptr", "k_new_ptr", "v_new_ptr", "k_out_ptr", "v_out_ptr")
    pointers = dict.fromkeys(names, elem)
    signature, attrs = _signature(dms_pool_write_kernel, pointers | {"rows_ptr": "i32"}, consts)
    src = ASTSource(dms_pool_write_kernel, signature, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options={"num_warps": 1})


def tensorrt_available() -> tuple[bool, str]:
    """(True, "") where `tensorrt.plugin` imports, else (False, why)."""
    try:
        import tensorrt.plugin  # noqa: F401
    except Exception as exc:  # ImportError, or a bindings wheel without libnvinfer (OSError)
        return False, f"tensorrt.plugin is not importable here ({type(exc).__name__}: {exc})"
    return True, ""


_REGISTERED = False


def register_plugins() -> None:
    """Register both plugins with TensorRT (idempotent). Needs TensorRT >= 10.8 (`tensorrt.plugin`)."""
    global _REGISTERED
    if _REGISTERED:
        return
    ok, why = tensorrt_available()
    if not ok:
        raise RuntimeError(f"cannot register the DMS TensorRT plugins: {why}")
    import tensorrt as trt
    import tensorrt.plugin as trtp

    torch_dtypes = {trt.float16: torch.float16, trt.bfloat16: torch.bfloat16, trt.float32: torch.float32}
    # aot_impl must carry this exact return annotation (tensorrt.plugin validates it at registration).
    AotResult = tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]

    @trtp.register(DECODE_ID)
    def _decode_desc(q: trtp.TensorDesc, k_pool: trtp.TensorDesc, v_pool: trtp.TensorDesc,
                     block_tables: trtp.TensorDesc, stream_lens: trtp.TensorDesc,
                     scale: float, num_kv_heads: int) -> trtp.TensorDesc:  # fmt: skip
        return q.like()

    @trtp.autotune(DECODE_ID)
    def _decode_autotune(q, k_pool, v_pool, block_tables, stream_lens, scale: float, num_kv_heads: int,
                         outputs) -> list[trtp.AutoTuneCombination]:  # fmt: skip
        types = "FP16|BF16,FP16|BF16,FP16|BF16,INT32|INT32,INT32|INT32,FP16|BF16"
        return [trtp.AutoTuneCombination(types, "LINEAR", list(DECODE_TACTICS))]

    @trtp.aot_impl(DECODE_ID)
    def _decode_aot(q, k_pool, v_pool, block_tables, stream_lens, scale: float, num_kv_heads: int,
                    outputs, tactic: int) -> AotResult:  # fmt: skip
        # Head count and head_dim are build-time constants; S, pool blocks and table width are dynamic.
        head_dim = q.shape_expr[2].constant_value
        group = q.shape_expr[1].constant_value // num_kv_heads
        compiled = compile_decode_aot(torch_dtypes[q.dtype], head_dim, group, float(scale), tactic or 2)
        _, _, head_blocks = decode_blocks(group, head_dim)
        launch = trtp.KernelLaunchParams()
        launch.grid_x = q.shape_expr[0] * int(num_kv_heads)  # one program per (sequence, KV head)
        launch.grid_y = head_blocks
        launch.block_x = compiled.metadata.num_warps * 32
        launch.shared_mem = compiled.metadata.shared
        bs, mb = k_pool.shape_expr[1].constant_value, block_tables.shape_expr[1]
        num_q_heads = q.shape_expr[1].constant_value
        scalars = [num_q_heads * head_dim, head_dim, bs * head_dim, head_dim, mb,
                   num_kv_heads, group, bs, mb * bs]  # strides, heads, block size, tokens per split
        extra = trtp.SymIntExprs(len(scalars))
        for i, value in enumerate(scalars):
            extra[i] = trtp.SymInt32(value)
        return compiled.metadata.name, compiled.asm["ptx"], launch, extra

    @trtp.register(PREFILL_ID)
    def _prefill_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc,
                      evicted: trtp.TensorDesc, cu_seqlens: trtp.TensorDesc, positions: trtp.TensorDesc,
                      k_pool: trtp.TensorDesc, v_pool: trtp.TensorDesc, past_tables: trtp.TensorDesc,
                      past_lens: trtp.TensorDesc, past_expiry: trtp.TensorDesc,
                      scale: float, window: int) -> trtp.TensorDesc:  # fmt: skip
        return q.like()

    @trtp.autotune(PREFILL_ID)
    def _prefill_autotune(q, k, v, evicted, cu_seqlens, positions, k_pool, v_pool, past_tables, past_lens,
                          past_expiry, scale: float, window: int, outputs) -> list[trtp.AutoTuneCombination]:
        half, i32 = "FP16|BF16", "INT32|INT32"
        types = ",".join([half] * 3 + [i32] * 3 + [half] * 2 + [i32] * 3 + [half])
        return [trtp.AutoTuneCombination(types, "LINEAR", list(PREFILL_TACTICS))]

    @trtp.aot_impl(PREFILL_ID)
    def _prefill_aot(q, k, v, evicted, cu_seqlens, positions, k_pool, v_pool, past_tables, past_lens,
                     past_expiry, scale: float, window: int, outputs, tactic: int) -> AotResult:
        head_dim = q.shape_expr[2].constant_value
        num_q_heads, num_kv_heads = q.shape_expr[1].constant_value, k.shape_expr[1].constant_value
        dtype = torch_dtypes[q.dtype]
        compiled = compile_prefill_aot(dtype, head_dim, float(scale), int(window), tactic or 1)
        block_m = prefill_block_sizes(head_dim)[0]
        launch = trtp.KernelLaunchParams()
        # Query blocks up to the packed token count (programs past their sequence's end return at once).
        launch.grid_x = trtp.cdiv(q.shape_expr[0], block_m)
        launch.grid_y = (cu_seqlens.shape_expr[0] - 1) * num_q_heads
        launch.block_x = compiled.metadata.num_warps * 32
        launch.shared_mem = compiled.metadata.shared
        block_size = k_pool.shape_expr[1].constant_value
        scalars = [num_q_heads * head_dim, head_dim, num_kv_heads * head_dim, head_dim, num_kv_heads,
                   num_q_heads, num_q_heads // num_kv_heads, num_kv_heads, past_tables.shape_expr[1],
                   past_expiry.shape_expr[1], block_size]
        extra = trtp.SymIntExprs(len(scalars))
        for i, value in enumerate(scalars):
            extra[i] = trtp.SymInt32(value)
        return compiled.metadata.name, compiled.asm["ptx"], launch, extra

    @trtp.register(POOL_WRITE_ID)
    def _pool_write_desc(k_pool: trtp.TensorDesc, v_pool: trtp.TensorDesc, k_new: trtp.TensorDesc,
                         v_new: trtp.TensorDesc, rows: trtp.TensorDesc
                         ) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:  # fmt: skip
        return k_pool.aliased(), v_pool.aliased()  # in place: the pool is the engine's I/O buffer

    @trtp.autotune(POOL_WRITE_ID)
    def _pool_write_autotune(k_pool, v_pool, k_new, v_new, rows, outputs) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP16|BF16,FP16|BF16,FP16|BF16,FP16|BF16,INT32|INT32,FP16|BF16,"
                                         "FP16|BF16", "LINEAR", [1])]

    @trtp.aot_impl(POOL_WRITE_ID)
    def _pool_write_aot(k_pool, v_pool, k_new, v_new, rows, outputs, tactic: int) -> AotResult:
        head_dim = k_pool.shape_expr[2].constant_value
        compiled = compile_pool_write_aot(torch_dtypes[k_pool.dtype], head_dim)
        launch = trtp.KernelLaunchParams()
        launch.grid_x = rows.shape_expr[0]
        launch.block_x = compiled.metadata.num_warps * 32
        launch.shared_mem = compiled.metadata.shared
        return compiled.metadata.name, compiled.asm["ptx"], launch, trtp.SymIntExprs(0)

    _REGISTERED = True
