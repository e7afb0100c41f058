"""GPU check of the DMS paged decode kernel: compile, compare with the torch reference, measure bandwidth.

Needs only PyTorch and Triton (not the `pipeline` package). On a CUDA machine:

    python ci/gpu_check.py --out gpu_check.json            # Qwen3-8B shapes, bf16, up to 64 x 32K
    python ci/gpu_check.py --quick --sweep --out r.json    # fewer sizes, plus a tile/stage sweep

Steps: (1) compile the kernels for the device's architecture and read registers / spills / shared
memory / load widths from the binary; (2) for each (batch, context) size, fresh random inputs (never
zeros), output poisoned with NaN, kernel vs the float64 torch reference: ||out-ref||/||ref|| < 1e-2 and
no NaN; (3) device copy bandwidth (device-to-device copy, bytes read + written) and the kernel's
achieved bandwidth (live KV bytes read / median time; CUDA events, warm-up excluded, L2 flushed before
each timed launch). Prints a table and writes JSON. Without a CUDA device it says so and exits 0
(`--require-gpu` makes that exit 2); `--compile-only` still builds for sm_90 on a CPU-only machine.
Then (4) the engine's decode step at Qwen3-8B's real shape in bf16 (`--engine-shape`), batch 8 and 64,
through `python -m pipeline bench --sections shape --real-widths` in a subprocess. Exit 1 if any check
fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

# Qwen3-8B attention: 32 query heads, 8 KV heads (GQA 4), head_dim 128; DMS pages of 256 tokens.
QWEN3_8B = {"num_kv_heads": 8, "group": 4, "head_dim": 128, "block_size": 256}
FULL_SIZES = [(1, 4096), (1, 32768), (8, 8192), (8, 32768), (32, 16384), (64, 4096), (64, 32768)]
QUICK_SIZES = [(1, 32768), (8, 8192), (64, 4096)]
REL_ERR_LIMIT = 1e-2
NO_GPU_MESSAGE = (
    "gpu_check: no CUDA device visible (torch.cuda.is_available() is False); nothing to run. "
    "Kernel correctness on CPU is covered by tests/test_kernel.py (Triton interpreter). "
    "Run this script on a machine with an NVIDIA GPU, PyTorch and Triton."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help=f"only the sizes {QUICK_SIZES}")
    parser.add_argument(
        "--sizes",
        type=str,
        default=None,
        help="comma-separated BATCHxCONTEXT list, e.g. 1x32768,64x4096 (overrides --quick)",
    )
    parser.add_argument("--iters", type=int, default=50, help="timed launches per size (median reported)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed launches before timing")
    parser.add_argument("--copy-mib", type=int, default=1024, help="buffer size of the copy-bandwidth test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sweep", action="store_true", help="also time tile/stage/warp variants")
    parser.add_argument("--compile-only", action="store_true", help="only compile and report resources")
    parser.add_argument("--arch", type=int, default=None, help="compute capability for --compile-only (90)")
    parser.add_argument("--require-gpu", action="store_true", help="exit 2 instead of 0 without a GPU")
    parser.add_argument(
        "--engine-shape",
        default="qwen3-8b",
        help="after the kernel check, time the engine's decode step at this model's real shape in bf16 "
        "(`python -m pipeline bench --sections shape --real-widths`, a subprocess: this script itself "
        "imports no pipeline code); 'none' skips it",
    )
    parser.add_argument("--engine-timeout", type=int, default=420, help="seconds for the engine benchmark")
    args = parser.parse_args(argv)
    args.size_list = parse_sizes(args.sizes) if args.sizes else (QUICK_SIZES if args.quick else FULL_SIZES)
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be >= 1 and --warmup >= 0")
    return args


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'1x32768,64x4096' -> [(1, 32768), (64, 4096)]."""
    sizes = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", item)
        if not match or int(match[1]) < 1 or int(match[2]) < 1:
            raise argparse.ArgumentTypeError(f"bad size {item!r}: expected BATCHxCONTEXT, e.g. 8x32768")
        sizes.append((int(match[1]), int(match[2])))
    return sizes


def decode_bytes(
    stream_lens: list[int], group: int, head_dim: int, elem_bytes: int, block_size: int, num_splits: int
) -> dict[str, int]:
    """Fewest bytes one decode-attention launch must move through device memory.

    stream_lens: live tokens of each (sequence, KV head) stream; group: query heads per KV head.
    kv: live K and V rows, each read once (the headline: DMS decode reads only live KV);
    q_out: the queries read and the outputs written; meta: block-table entries of live blocks plus
    the lengths; split_partials: fp32 partial outputs + log-sum-exps written by pass 1, read by pass 2.
    """
    num_streams = len(stream_lens)
    q_rows = num_streams * group  # = num_seqs * num_q_heads
    kv = 2 * sum(stream_lens) * head_dim * elem_bytes
    q_out = 2 * q_rows * head_dim * elem_bytes
    meta = 4 * sum(-(-n // block_size) for n in stream_lens) + 4 * num_streams
    split_partials = 0 if num_splits == 1 else 2 * q_rows * num_splits * (head_dim + 1) * 4
    return {
        "kv": kv,
        "q_out": q_out,
        "meta": meta,
        "split_partials": split_partials,
        "total": kv + q_out + meta + split_partials,
    }


# ------------------------------------------------------------------ compile report (no GPU needed)


def _cuobjdump() -> Path | None:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return path if path.exists() else None


def binary_report(cubin: bytes, workdir: Path) -> dict[str, int]:
    """Registers, stack, spill instructions, 16-byte global loads and MMA instructions of one cubin."""
    tool = _cuobjdump()
    if tool is None:
        return {}
    path = workdir / "kernel.cubin"
    path.write_bytes(cubin)
    usage = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True, text=True, check=True)
    sass = subprocess.run([str(tool), "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage.stdout))
    return {
        "registers": int(fields.get("REG", -1)),
        "stack_bytes": int(fields.get("STACK", -1)),
        "local_bytes": int(fields.get("LOCAL", -1)),
        "spill_instructions": len(re.findall(r"\b(?:LDL|STL)\b", sass)),
        "global_loads_128bit": len(re.findall(r"\bLDG(?:STS)?\.E(?:\.[A-Z]+)*\.128\b", sass)),
        "async_copies": len(re.findall(r"\bLDGSTS\b", sass)),
        "mma_instructions": len(re.findall(r"\bHMMA\b", sass)),
    }


def compile_report(capability: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, dict]:
    """Compile both kernels for `capability` at Qwen3-8B shape and read their resources."""
    import tempfile

    from plugins.dms_attention.decode import compile_decode_kernels, plan_decode_launch

    cfg = QWEN3_8B
    elem_bytes = torch.empty(0, dtype=dtype).element_size()
    # One 32K sequence on a 132-SM part: the split-K path, so both kernels are built.
    plan = plan_decode_launch(cfg["num_kv_heads"], cfg["group"], cfg["head_dim"], 32768, elem_bytes, 132)
    kernels = compile_decode_kernels(dtype, cfg["head_dim"], plan, capability=capability)
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kernel in kernels.items():
            if kernel is None:
                continue
            report[name] = {
                "shared_memory_bytes": int(kernel.metadata.shared),
                "num_warps": int(kernel.metadata.num_warps),
                **binary_report(kernel.asm["cubin"], Path(tmp)),
            }
    report["plan"] = dataclasses.asdict(plan)
    return report


# ------------------------------------------------------------------ GPU measurements


def make_inputs(
    batch: int, context: int, seed: int, dtype: torch.dtype, device: str, live_fraction: float = 1.0
) -> dict:
    """Random Qwen3-8B-shaped decode inputs: per-stream lengths in [1, max_live] with
    max_live = context * live_fraction (one stream exactly max_live, one empty, one of length 1), block
    tables as wide as `context`, only live blocks allocated, shuffled block ids, and -1 in the entries
    past each stream's live blocks (a kernel reading them would fault). live_fraction 0.25 gives a
    mean live length of context/8: DMS at 8x compression."""
    cfg = QWEN3_8B
    num_kv_heads, group, head_dim, block_size = (
        cfg[k] for k in ("num_kv_heads", "group", "head_dim", "block_size")
    )
    gen = torch.Generator(device="cpu").manual_seed(seed)
    num_streams = batch * num_kv_heads
    max_live = max(1, int(context * live_fraction))
    lens = torch.randint(1, max_live + 1, (num_streams,), generator=gen, dtype=torch.int32)
    lens[0] = max_live
    if num_streams > 2:
        lens[1], lens[2] = 0, 1
    max_blocks = -(-context // block_size)
    needed = (lens.long() + block_size - 1) // block_size
    live = torch.arange(max_blocks)[None, :] < needed[:, None]
    num_blocks = int(needed.sum()) + 1
    block_tables = torch.full((num_streams, max_blocks), -1, dtype=torch.int32)
    block_tables[live] = torch.randperm(num_blocks, generator=gen)[: int(needed.sum())].to(torch.int32)
    torch.manual_seed(seed)
    return {
        "q": torch.randn(batch, num_kv_heads * group, head_dim, device=device).to(dtype),
        "k_cache": torch.randn(num_blocks, block_size, head_dim, device=device).to(dtype),
        "v_cache": torch.randn(num_blocks, block_size, head_dim, device=device).to(dtype),
        "block_tables": block_tables.to(device),
        "stream_lens": lens.to(device),
        "lens_list": lens.tolist(),
        "scale": head_dim**-0.5,
        "num_kv_heads": num_kv_heads,
    }


def reference_float64(inp: dict, max_chunk_bytes: float = 4e9) -> torch.Tensor:
    """The torch reference in float64, a few sequences at a time (the gathered KV would not fit at once)."""
    from plugins.dms_attention.reference import reference_paged_decode_attention

    q, hkv = inp["q"], inp["num_kv_heads"]
    context = inp["block_tables"].shape[1] * inp["k_cache"].shape[1]
    per_seq = hkv * context * q.shape[-1] * 8 * 3  # fp64 K, V and their product terms
    step = max(1, int(max_chunk_bytes // per_seq))
    parts = []
    for s0 in range(0, q.shape[0], step):
        s1 = min(q.shape[0], s0 + step)
        parts.append(
            reference_paged_decode_attention(
                q[s0:s1], inp["k_cache"], inp["v_cache"], inp["block_tables"][s0 * hkv : s1 * hkv],
                inp["stream_lens"][s0 * hkv : s1 * hkv], inp["scale"], hkv,
                compute_dtype=torch.float64, out_dtype=torch.float64,
            )
        )  # fmt: skip
    return torch.cat(parts)


def time_cuda(fn, warmup: int, iters: int, flush: torch.Tensor | None) -> dict[str, float]:
    """Median / p10 / p90 microseconds of fn() with CUDA events; `flush` is overwritten before each
    timed launch so the inputs come from device memory, not from L2."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends, strict=True):
        if flush is not None:
            flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(1000.0 * s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))
    return {
        "median_us": statistics.median(times),
        "p10_us": times[len(times) // 10],
        "p90_us": times[(len(times) * 9) // 10],
    }


def copy_bandwidth(mib: int, warmup: int, iters: int) -> dict[str, float]:
    """Device-to-device copy of a `mib` MiB buffer; GB/s counts bytes read plus bytes written."""
    nbytes = mib * 2**20
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    timing = time_cuda(lambda: dst.copy_(src), warmup, iters, flush=None)
    if not torch.equal(dst, src):
        raise RuntimeError("device copy produced different bytes")
    return {"bytes": 2 * nbytes, "GBps": 2 * nbytes / (timing["median_us"] * 1e-6) / 1e9, **timing}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def check_once(inp: dict, plan, ref: torch.Tensor | None = None) -> tuple[dict, torch.Tensor]:
    """Poison the output with NaN, launch once, compare with the float64 reference (computed if not given).

    Returns ({"rel_err", "nan", "ok"}, ref). Runs on any device the kernel runs on (CPU: interpreter).
    """
    from plugins.dms_attention.decode import paged_decode_attention

    args = (inp["q"], inp["k_cache"], inp["v_cache"], inp["block_tables"], inp["stream_lens"])
    out = torch.full_like(inp["q"], float("nan"))
    paged_decode_attention(*args, inp["scale"], inp["num_kv_heads"], out=out, plan=plan)
    if out.is_cuda:
        torch.cuda.synchronize()
    ref = reference_float64(inp) if ref is None else ref
    err = rel_err(out, ref)
    has_nan = bool(out.isnan().any())
    return {"rel_err": err, "nan": has_nan, "ok": (not has_nan) and err < REL_ERR_LIMIT}, ref


def graph_or_eager(fn):
    """A CUDA-graph replay of fn (how a decode step runs in the runtime: no launch gaps in the timing);
    fn itself if capture fails. fn must have run once already (Triton compiles on the first launch)."""
    try:
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            fn()
        return graph.replay, "cuda_graph"
    except Exception as exc:  # timing still works eagerly; say so in the results
        return fn, f"eager ({type(exc).__name__})"


def check_and_time(
    inp: dict, plan, warmup: int, iters: int, flush: torch.Tensor, ref: torch.Tensor | None = None
) -> tuple[dict, torch.Tensor]:
    """One kernel configuration on one input set: poisoned-output correctness, then timing."""
    from plugins.dms_attention.decode import paged_decode_attention

    row, ref = check_once(inp, plan, ref)
    args = (inp["q"], inp["k_cache"], inp["v_cache"], inp["block_tables"], inp["stream_lens"])
    out = torch.empty_like(inp["q"])
    fn, mode = graph_or_eager(
        lambda: paged_decode_attention(*args, inp["scale"], inp["num_kv_heads"], out=out, plan=plan)
    )
    timing = time_cuda(fn, warmup, iters, flush)
    timed_err = rel_err(out, ref)  # the timed launches computed the same thing
    nbytes = decode_bytes(
        inp["lens_list"], QWEN3_8B["group"], QWEN3_8B["head_dim"], inp["q"].element_size(),
        QWEN3_8B["block_size"], plan.num_splits,
    )  # fmt: skip
    seconds = timing["median_us"] * 1e-6
    row.update(
        ok=row["ok"] and timed_err < REL_ERR_LIMIT,
        timed_rel_err=timed_err,
        timing_mode=mode,
        num_splits=plan.num_splits,
        tokens_per_split=plan.tokens_per_split,
        live_tokens=sum(inp["lens_list"]),
        bytes=nbytes,
        kv_GBps=nbytes["kv"] / seconds / 1e9,
        total_GBps=nbytes["total"] / seconds / 1e9,
        **timing,
    )
    return row, ref


def sweep_variants(base_plan) -> list:
    """Tile / pipeline / warp / split variants around the planned launch (for --sweep)."""
    variants = []
    for block_n in (32, 64, 128):
        for num_stages in (2, 3, 4):
            for num_warps in (4, 8):
                tps = max(block_n, -(-base_plan.tokens_per_split // block_n) * block_n)
                variants.append(
                    dataclasses.replace(
                        base_plan,
                        block_n=block_n,
                        num_stages=num_stages,
                        num_warps=num_warps,
                        tokens_per_split=tps,
                    )
                )
    return variants


def run_gpu(args: argparse.Namespace) -> dict:
    import triton

    from plugins.dms_attention.decode import plan_decode_launch

    props = torch.cuda.get_device_properties(0)
    capability = props.major * 10 + props.minor
    result = {
        "status": "ran",
        "device": props.name,
        "capability": capability,
        "sm_count": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "rel_err_limit": REL_ERR_LIMIT,
    }
    try:
        result["compile"] = compile_report(capability)
    except Exception as exc:  # the report is informational; the launches below still check the kernel
        result["compile"] = {"error": repr(exc)}
    result["copy"] = copy_bandwidth(args.copy_mib, args.warmup, max(10, args.iters // 2))
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # > L2 (50 MiB on H100)
    cfg = QWEN3_8B
    result["sizes"] = []
    # (mode, live_fraction, plan the splits from the live bound instead of the block-table width)
    num_sms = props.multi_processor_count
    modes = [("full", 1.0, False), ("dms8x", 0.25, False), ("dms8x+hint", 0.25, True)]
    for i, (batch, context) in enumerate(args.size_list):
        for mode, live_fraction, use_hint in modes:
            inp = make_inputs(batch, context, args.seed + i, torch.bfloat16, "cuda", live_fraction)
            bound = max(inp["lens_list"]) if use_hint else inp["block_tables"].shape[1] * cfg["block_size"]
            plan = plan_decode_launch(
                batch * cfg["num_kv_heads"], cfg["group"], cfg["head_dim"], bound, 2, num_sms
            )  # fmt: skip
            row, ref = check_and_time(inp, plan, args.warmup, args.iters, flush)
            row.update(
                batch=batch, context=context, mode=mode, frac_of_copy=row["kv_GBps"] / result["copy"]["GBps"]
            )
            result["sizes"].append(row)
            print(f"  {batch}x{context} {mode}: rel_err {row['rel_err']:.2e}  {row['median_us']:.1f} us  "
                  f"{row['kv_GBps']:.0f} GB/s", flush=True)  # fmt: skip
            if args.sweep and mode == "full" and i == len(args.size_list) - 1:
                result["sweep"] = {"batch": batch, "context": context, "variants": []}
                for variant in sweep_variants(plan):
                    try:
                        vrow, _ = check_and_time(inp, variant, args.warmup, args.iters, flush, ref=ref)
                    except Exception as exc:  # a variant that does not compile is a result, not a crash
                        vrow = {"error": repr(exc)[:300], "ok": True}
                    result["sweep"]["variants"].append({"plan": dataclasses.asdict(variant), **vrow})
            del inp, ref
            torch.cuda.empty_cache()
    result["ok"] = all(r["ok"] for r in result["sizes"]) and all(
        v["ok"] for v in result.get("sweep", {}).get("variants", [])
    )
    return result


def format_table(result: dict) -> str:
    lines = [
        f"device {result['device']} (sm_{result['capability']}, {result['sm_count']} SMs), "
        f"torch {result['torch']}, triton {result['triton']}",
        f"device copy bandwidth: {result['copy']['GBps']:.0f} GB/s "
        f"(read + write, {result['copy']['bytes'] >> 20} MiB)",
    ]
    comp = result.get("compile", {})
    for name in ("split", "reduce"):
        if name in comp:
            c = comp[name]
            lines.append(
                f"{name} kernel: regs {c.get('registers', '?')}, stack {c.get('stack_bytes', '?')} B, "
                f"smem {c['shared_memory_bytes']} B, spill instrs {c.get('spill_instructions', '?')}, "
                f"128-bit loads {c.get('global_loads_128bit', '?')}, mma {c.get('mma_instructions', '?')}"
            )
    row_format = "{:>5} {:>7} {:>10} {:>6} {:>10} {:>9} {:>9} {:>8} {:>6}  {}"
    header = row_format.format(
        "batch", "context", "mode", "splits", "live tok", "rel err", "us", "KV GB/s", "%copy", "ok"
    )
    lines += [header, "-" * len(header)]
    for r in result["sizes"]:
        lines.append(
            row_format.format(
                r["batch"], r["context"], r["mode"], r["num_splits"], r["live_tokens"], f"{r['rel_err']:.2e}",
                f"{r['median_us']:.1f}", f"{r['kv_GBps']:.0f}", f"{100 * r['frac_of_copy']:.0f}%",
                "yes" if r["ok"] else "NO",
            )
        )  # fmt: skip
    sweep = result.get("sweep")
    if sweep:
        lines.append(f"sweep at {sweep['batch']}x{sweep['context']}: block_n stages warps -> us, KV GB/s")
        ranked = sorted((v for v in sweep["variants"] if "median_us" in v), key=lambda v: v["median_us"])
        for v in ranked:
            p = v["plan"]
            lines.append(
                f"  {p['block_n']:>4} {p['num_stages']:>2} {p['num_warps']:>2} -> {v['median_us']:8.1f} us "
                f"{v['kv_GBps']:6.0f} GB/s  err {v['rel_err']:.1e}{'' if v['ok'] else '  WRONG'}"
            )
        for v in sweep["variants"]:
            if "error" in v:
                p = v["plan"]
                lines.append(f"  {p['block_n']} {p['num_stages']} {p['num_warps']}: {v['error']}")
    lines.append("ALL CHECKS PASSED" if result["ok"] else "SOME CHECKS FAILED")
    return "\n".join(lines)


def write_json(path: Path | None, result: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        print(f"wrote {path}")


def engine_shape_bench(shape: str, timeout_s: int) -> dict:
    """The engine's decode step at a real model shape (bench.json's `shape` section), run by the
    project's own bench in a subprocess. Needs the pipeline package's imports (torch, safetensors,
    pyyaml, tqdm) in this Python. NEVER RUN: no GPU was lent while this was written."""
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "pipeline", "bench", "--sections", "shape", "--shape", shape,
               "--real-widths", "--out", out, "--markdown", str(Path(out) / "RESULTS.md")]
        try:
            done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "command": cmd, "timeout_s": timeout_s}
        bench = Path(out) / "bench.json"
        if done.returncode != 0 or not bench.is_file():
            return {"status": "failed", "command": cmd, "returncode": done.returncode,
                    "stderr_tail": done.stderr[-4000:]}
        return {"status": "ok", "command": cmd, **json.loads(bench.read_text())["shape"]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compile_only:
        capability = args.arch or 90
        report = compile_report(capability)
        print(json.dumps(report, indent=2))
        write_json(args.out, {"status": "compile-only", "capability": capability, "compile": report})
        return 0
    if not torch.cuda.is_available():
        print(NO_GPU_MESSAGE)
        write_json(args.out, {"status": "skipped", "reason": NO_GPU_MESSAGE})
        return 2 if args.require_gpu else 0
    result = run_gpu(args)
    if args.engine_shape != "none":
        result["engine_shape"] = engine_shape_bench(args.engine_shape, args.engine_timeout)
        result["ok"] = result["ok"] and result["engine_shape"].get("status") == "ok"
    write_json(args.out, result)
    print(format_table(result))
    shape = result.get("engine_shape")
    if shape is not None:
        if shape["status"] == "ok":
            for m in ("dms", "vanilla"):
                cells = ", ".join(f"batch {b}: {ms:.2f} ms (host {shape['host_fraction'][m][b]:.0%})"
                                  for b, ms in shape["step_ms"][m].items())
                print(f"engine decode step at {shape['name']} ({shape['dtype']}), {m}: {cells}")
        else:
            print(f"engine decode step benchmark: {shape['status']} {shape.get('stderr_tail', '')}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
