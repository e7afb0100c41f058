"""DMS paged decode kernel vs its torch reference (CPU: Triton interpreter), reference vs dense attention.

The kernel runs on CPU tensors through Triton's interpreter whether or not TRITON_INTERPRET was set
before triton was imported (decode.py builds the interpreter twin itself); one test also runs it in a
subprocess with TRITON_INTERPRET=1, the mode in which every @triton.jit object is interpreted.
Shapes stay tiny: the interpreter executes each program in numpy.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plugins.dms_attention import decode
from plugins.dms_attention.decode import paged_decode_attention, plan_decode_launch
from plugins.dms_attention.reference import (
    check_stream_bounds,
    dense_attention_reference,
    reference_paged_decode_attention,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def make_pool(
    lens: list[int],
    num_kv_heads: int,
    group: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    spare_blocks: int = 3,
    unused_id: int = -1,
):
    """Random inputs (never zeros) with shuffled block ids; block-table entries past a stream's live
    blocks hold `unused_id` so any read of them would be caught."""
    gen = torch.Generator().manual_seed(seed)
    num_streams = len(lens)
    assert num_streams % num_kv_heads == 0
    num_seqs = num_streams // num_kv_heads
    max_blocks = max(1, max(-(-n // block_size) for n in lens))
    needed = sum(-(-n // block_size) for n in lens)
    num_blocks = needed + spare_blocks
    k_cache = torch.randn(num_blocks, block_size, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, head_dim, generator=gen).to(dtype)
    q = torch.randn(num_seqs, num_kv_heads * group, head_dim, generator=gen).to(dtype)
    ids = torch.randperm(num_blocks, generator=gen).tolist()  # non-contiguous, shuffled block ids
    block_tables = torch.full((num_streams, max_blocks), unused_id, dtype=torch.int32)
    for s, n in enumerate(lens):
        for b in range(-(-n // block_size)):
            block_tables[s, b] = ids.pop()
    stream_lens = torch.tensor(lens, dtype=torch.int32)
    return q, k_cache, v_cache, block_tables, stream_lens


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize(
    ("num_kv_heads", "group", "lens", "num_splits"),
    [
        (1, 1, [5], None),  # MHA-like group of one
        (2, 4, [0, 1, 8, 9, 16, 3], None),  # GQA 4: empty, one token, exactly one/two blocks, +1
        (2, 3, [17, 0, 8, 24], 3),  # odd group; forced split-K with an empty and a full stream
        (1, 8, [31, 7], 2),
        (3, 2, [1, 2, 70, 64, 0, 65], 4),  # splits longer than one tile; 64 = tile boundary
        (1, 2, [1300, 5], 21),  # more splits than the merge pass takes per step (16)
    ],
)
def test_kernel_matches_reference_fp32(num_kv_heads, group, lens, num_splits):
    q, kc, vc, bt, sl = make_pool(lens, num_kv_heads, group, head_dim=32, block_size=8, seed=len(lens))
    check_stream_bounds(bt, sl, kc.shape[0], kc.shape[1])
    scale = 0.2
    out = paged_decode_attention(q, kc, vc, bt, sl, scale, num_kv_heads, num_splits=num_splits)
    ref = reference_paged_decode_attention(q, kc, vc, bt, sl, scale, num_kv_heads)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # Streams of length 0 give exact zeros for all their query heads.
    for stream, n in enumerate(lens):
        if n == 0:
            seq, kv_head = divmod(stream, num_kv_heads)
            assert torch.equal(out[seq, kv_head * group : (kv_head + 1) * group], torch.zeros(group, 32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_half_precision(dtype):
    lens = [9, 0, 23, 1]
    q, kc, vc, bt, sl = make_pool(lens, 2, 2, head_dim=16, block_size=4, dtype=dtype, seed=7)
    for num_splits in (1, 3):
        out = paged_decode_attention(q, kc, vc, bt, sl, 0.25, 2, num_splits=num_splits)
        ref = reference_paged_decode_attention(
            q, kc, vc, bt, sl, 0.25, 2, compute_dtype=torch.float64, out_dtype=torch.float64
        )
        assert out.dtype == dtype
        assert not out.isnan().any()
        assert rel_err(out, ref) < 1e-2


def test_poisoned_output_fully_written_and_strided_inputs():
    """Every element of a NaN-filled `out` is written; q may be a strided view (a slice of a qkv tensor)."""
    lens = [12, 0, 4, 30]
    num_kv_heads, group, head_dim = 2, 2, 16
    _, kc, vc, bt, sl = make_pool(lens, num_kv_heads, group, head_dim, block_size=4, seed=3)
    qkv = torch.randn(2, num_kv_heads * group + 2 * num_kv_heads, head_dim)
    q = qkv[:, : num_kv_heads * group]  # non-contiguous in dim 0
    assert not q.is_contiguous()
    ref = reference_paged_decode_attention(q, kc, vc, bt, sl, 0.3, num_kv_heads)
    for num_splits in (1, 2):
        out = torch.full_like(q, float("nan"))
        got = paged_decode_attention(q, kc, vc, bt, sl, 0.3, num_kv_heads, num_splits=num_splits, out=out)
        assert got is out
        assert not out.isnan().any(), "kernel left elements of out unwritten"
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_non_power_of_two_head_dim_and_block_size():
    lens = [7, 13, 0, 6]
    q, kc, vc, bt, sl = make_pool(lens, 1, 3, head_dim=24, block_size=5, seed=11)
    for num_splits in (None, 2):
        out = paged_decode_attention(q, kc, vc, bt, sl, 0.2, 1, num_splits=num_splits)
        ref = reference_paged_decode_attention(q, kc, vc, bt, sl, 0.2, 1)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_plans_shorter_than_the_streams_stay_correct():
    """A plan sized from a length bound that is too small (or a hand-made tuning plan) still covers
    every live token: the last split runs to each stream's end."""
    lens = [70, 5, 0, 33]
    q, kc, vc, bt, sl = make_pool(lens, 2, 2, head_dim=32, block_size=8, seed=13)
    ref = reference_paged_decode_attention(q, kc, vc, bt, sl, 0.2, 2)
    short = decode.DecodeLaunchPlan(
        block_h=16, block_n=16, block_d=32, num_head_blocks=1, num_splits=2, tokens_per_split=16
    )
    out = paged_decode_attention(q, kc, vc, bt, sl, 0.2, 2, plan=short)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out = paged_decode_attention(q, kc, vc, bt, sl, 0.2, 2, max_stream_len=10, num_splits=3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_fallback_combine_functions(monkeypatch):
    """The module's own combine functions (used if Triton renames its private ones) give the same result."""
    monkeypatch.setattr(decode, "_max_combine", decode._max_combine_fallback)
    monkeypatch.setattr(decode, "_sum_combine", decode._sum_combine_fallback)
    q, kc, vc, bt, sl = make_pool([3, 0], 1, 1, head_dim=16, block_size=4, seed=5)
    out = paged_decode_attention(q, kc, vc, bt, sl, 0.3, 1, num_splits=1)
    ref = reference_paged_decode_attention(q, kc, vc, bt, sl, 0.3, 1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_reference_matches_dense_attention():
    """Gather by block table + masked softmax == plain softmax attention over each sequence's dense keys."""
    gen = torch.Generator().manual_seed(1)
    num_kv_heads, group, head_dim, block_size = 2, 3, 8, 4
    lens = [[5, 0], [1, 12]]  # per sequence, per KV head: DMS gives each head its own length
    dense_k = [[torch.randn(n, head_dim, generator=gen) for n in row] for row in lens]
    dense_v = [[torch.randn(n, head_dim, generator=gen) for n in row] for row in lens]
    num_blocks = 12
    k_cache = torch.randn(num_blocks, block_size, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, head_dim, generator=gen)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables = torch.full((4, 3), -1, dtype=torch.int32)
    for seq, row in enumerate(lens):
        for kv_head, n in enumerate(row):
            stream = seq * num_kv_heads + kv_head
            for b in range(-(-n // block_size)):
                block = free.pop()
                block_tables[stream, b] = block
                chunk = slice(b * block_size, min(n, (b + 1) * block_size))
                width = chunk.stop - chunk.start
                k_cache[block, :width] = dense_k[seq][kv_head][chunk]
                v_cache[block, :width] = dense_v[seq][kv_head][chunk]
    stream_lens = torch.tensor([n for row in lens for n in row], dtype=torch.int32)
    q = torch.randn(2, num_kv_heads * group, head_dim, generator=gen)
    ref = reference_paged_decode_attention(q, k_cache, v_cache, block_tables, stream_lens, 0.35, num_kv_heads)
    for seq, row in enumerate(lens):
        for kv_head in range(len(row)):
            heads = slice(kv_head * group, (kv_head + 1) * group)
            k = dense_k[seq][kv_head][None]
            v = dense_v[seq][kv_head][None]
            want = dense_attention_reference(q[seq, heads], k, v, 0.35)
            torch.testing.assert_close(ref[seq, heads].double(), want, rtol=1e-5, atol=1e-6)


def test_input_validation_names_the_problem():
    q, kc, vc, bt, sl = make_pool([4, 2], 2, 2, head_dim=16, block_size=4)
    with pytest.raises(ValueError, match="block_tables must be int32"):
        paged_decode_attention(q, kc, vc, bt.long(), sl, 0.3, 2)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_decode_attention(q, kc, vc, bt, sl, 0.3, 3)
    with pytest.raises(ValueError, match="dtype mismatch"):
        paged_decode_attention(q.half(), kc, vc, bt, sl, 0.3, 2)
    with pytest.raises(ValueError, match="stream_lens must be int32"):
        paged_decode_attention(q, kc, vc, bt, sl[:1], 0.3, 2)
    with pytest.raises(ValueError, match="unit stride"):
        paged_decode_attention(q, kc.transpose(1, 2).contiguous().transpose(1, 2), vc, bt, sl, 0.3, 2)
    with pytest.raises(ValueError, match="widen the block table"):
        reference_paged_decode_attention(q, kc, vc, bt, sl + 8, 0.3, 2)
    bad = bt.clone()
    bad[0, 0] = kc.shape[0]
    with pytest.raises(ValueError, match="block ids outside"):
        check_stream_bounds(bad, sl, kc.shape[0], kc.shape[1])


def test_launch_plan_covers_capacity_and_fills_the_gpu():
    for capacity in (1, 63, 64, 1000, 32768):
        for num_streams in (1, 8, 512):
            plan = plan_decode_launch(num_streams, 4, 128, capacity, 2, num_sms=132)
            assert plan.tokens_per_split % plan.block_n == 0
            assert plan.num_splits * plan.tokens_per_split >= capacity
            assert (plan.num_splits - 1) * plan.tokens_per_split < max(capacity, 1)
            assert plan.block_h >= 16 and plan.block_d == 128
    single_long = plan_decode_launch(8, 4, 128, 32768, 2, num_sms=132)
    assert single_long.num_splits * 8 >= 132, "one long sequence must be split across the SMs"
    big_batch = plan_decode_launch(512, 4, 128, 32768, 2, num_sms=132)
    assert big_batch.num_splits < single_long.num_splits
    forced = plan_decode_launch(4, 4, 128, 100, 2, num_sms=132, num_splits=3)
    assert forced.num_splits >= 1 and forced.num_splits * forced.tokens_per_split >= 100


def test_runs_with_triton_interpret_env(tmp_path):
    """With TRITON_INTERPRET=1 set before import, the module-level kernels are interpreter objects."""
    script = (
        "import torch\n"
        "from triton.runtime.interpreter import InterpretedFunction\n"
        "from plugins.dms_attention import decode\n"
        "from plugins.dms_attention.reference import reference_paged_decode_attention as ref\n"
        "assert isinstance(decode.dms_decode_split_kernel, InterpretedFunction)\n"
        "g = torch.Generator().manual_seed(2)\n"
        "q = torch.randn(1, 4, 16, generator=g); k = torch.randn(6, 4, 16, generator=g)\n"
        "v = torch.randn(6, 4, 16, generator=g)\n"
        "bt = torch.tensor([[4, 1, 3], [0, 5, 2]], dtype=torch.int32)\n"
        "sl = torch.tensor([9, 12], dtype=torch.int32)\n"
        "for n in (1, 2):\n"
        "    out = decode.paged_decode_attention(q, k, v, bt, sl, 0.25, 2, num_splits=n)\n"
        "    torch.testing.assert_close(out, ref(q, k, v, bt, sl, 0.25, 2), rtol=1e-5, atol=1e-5)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


# ---------------------------------------------------------------- GPU (compiled kernel, real sizes)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(("num_seqs", "max_len"), [(1, 32768), (16, 4096), (64, 1024)])
def test_gpu_qwen3_8b_sizes_bf16(num_seqs, max_len):
    """Qwen3-8B attention shape (head_dim 128, 8 KV heads, GQA 4), bf16, 256-token pages, varied lengths."""
    torch.manual_seed(num_seqs)
    num_kv_heads, group, head_dim, block_size = 8, 4, 128, 256
    num_streams = num_seqs * num_kv_heads
    lens = torch.randint(0, max_len + 1, (num_streams,), dtype=torch.int32)
    lens[0], lens[-1] = max_len, 0
    max_blocks = -(-max_len // block_size)
    num_blocks = num_streams * max_blocks + 7
    dev = "cuda"
    k_cache = torch.randn(num_blocks, block_size, head_dim, device=dev, dtype=torch.bfloat16)
    v_cache = torch.randn(num_blocks, block_size, head_dim, device=dev, dtype=torch.bfloat16)
    perm = torch.randperm(num_blocks, device=dev)[: num_streams * max_blocks]
    block_tables = perm.view(num_streams, max_blocks).to(torch.int32).contiguous()
    q = torch.randn(num_seqs, num_kv_heads * group, head_dim, device=dev, dtype=torch.bfloat16)
    lens = lens.to(dev)
    out = torch.full_like(q, float("nan"))
    paged_decode_attention(q, k_cache, v_cache, block_tables, lens, head_dim**-0.5, num_kv_heads, out=out)
    torch.cuda.synchronize()
    ref = torch.cat(
        [
            reference_paged_decode_attention(
                q[s : s + 1], k_cache, v_cache, block_tables[s * num_kv_heads : (s + 1) * num_kv_heads],
                lens[s * num_kv_heads : (s + 1) * num_kv_heads], head_dim**-0.5, num_kv_heads,
                compute_dtype=torch.float64, out_dtype=torch.float64,
            )
            for s in range(num_seqs)
        ]
    )  # fmt: skip
    assert not out.isnan().any()
    assert rel_err(out, ref) < 1e-2


# ---------------------------------------------------------------- ci/gpu_check.py: CPU-checkable parts


@pytest.fixture(scope="module")
def gpu_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "ci" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_arguments(gpu_check):
    assert gpu_check.parse_args([]).size_list == gpu_check.FULL_SIZES
    assert gpu_check.parse_args(["--quick"]).size_list == gpu_check.QUICK_SIZES
    args = gpu_check.parse_args(["--sizes", "1x32768, 64x4096", "--quick", "--iters", "7"])
    assert args.size_list == [(1, 32768), (64, 4096)] and args.iters == 7
    with pytest.raises(Exception, match="BATCHxCONTEXT"):
        gpu_check.parse_args(["--sizes", "64by4096"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--iters", "0"])


def test_gpu_check_without_gpu(gpu_check, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # same answer on a GPU machine
    out = tmp_path / "r.json"
    assert gpu_check.main(["--out", str(out)]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    import json

    assert json.loads(out.read_text())["status"] == "skipped"
    assert gpu_check.main(["--require-gpu"]) == 2


def test_gpu_check_byte_counts(gpu_check):
    # Streams of 256, 0 and 257 live tokens (1, 0 and 2 pages of 256), GQA 4, head_dim 128, bf16.
    one = gpu_check.decode_bytes(
        [256, 0, 257], group=4, head_dim=128, elem_bytes=2, block_size=256, num_splits=1
    )
    assert one["kv"] == 2 * 513 * 128 * 2  # K and V rows of the live tokens only
    assert one["q_out"] == 2 * 12 * 128 * 2  # 3 streams x 4 query heads, read q + write out
    assert one["meta"] == 4 * 3 + 4 * 3  # 3 live block-table entries + 3 lengths (int32)
    assert one["split_partials"] == 0
    assert one["total"] == one["kv"] + one["q_out"] + one["meta"]
    three = gpu_check.decode_bytes([256, 0, 257], 4, 128, 2, 256, num_splits=3)
    assert three["split_partials"] == 2 * 12 * 3 * (128 + 1) * 4  # fp32 partial + lse, written and read


def test_kernel_compiles_for_sm90_without_spills(gpu_check):
    """Ahead-of-time build for Hopper (Triton ships ptxas): no register spills, 16-byte async loads, MMA."""
    if gpu_check._cuobjdump() is None:
        pytest.skip("this Triton wheel ships no cuobjdump")
    report = gpu_check.compile_report(90)
    split = report["split"]
    assert split["stack_bytes"] == 0 and split["spill_instructions"] == 0, split
    assert split["global_loads_128bit"] > 0 and split["async_copies"] > 0, split
    assert split["mma_instructions"] > 0, split
    assert split["shared_memory_bytes"] <= 227 * 1024
    assert report["reduce"]["spill_instructions"] == 0


def test_gpu_check_inputs_and_check_on_cpu(gpu_check):
    """gpu_check's input builder (Qwen3-8B heads, -1 past live blocks) and its poisoned-output check,
    run through the interpreter at a tiny context, with the split-K path the GPU plan would pick."""
    inp = gpu_check.make_inputs(1, 300, seed=4, dtype=torch.bfloat16, device="cpu")
    assert inp["lens_list"][:3] == [300, 0, 1] and (inp["block_tables"] == -1).any()
    check_stream_bounds(inp["block_tables"], inp["stream_lens"], inp["k_cache"].shape[0], 256)
    plan = plan_decode_launch(8, 4, 128, inp["block_tables"].shape[1] * 256, 2, num_sms=132)
    assert plan.num_splits > 1
    row, ref = gpu_check.check_once(inp, plan)
    assert row["ok"] and not row["nan"] and row["rel_err"] < 1e-2, row
    assert ref.dtype == torch.float64 and ref.shape == inp["q"].shape


def test_gpu_check_table_and_json(gpu_check, tmp_path):
    """The report formatting and JSON writing that run after a GPU pass, fed with a result of the
    same structure (correctness fields from a real interpreted check; timing fields stated by hand)."""
    inp = gpu_check.make_inputs(1, 256, seed=1, dtype=torch.float32, device="cpu", live_fraction=0.25)
    assert max(inp["lens_list"]) == 64 and inp["block_tables"].shape[1] == 1
    plan = plan_decode_launch(8, 4, 128, 256, 4, num_sms=1)
    row, _ = gpu_check.check_once(inp, plan)
    nbytes = gpu_check.decode_bytes(inp["lens_list"], 4, 128, 4, 256, plan.num_splits)
    row.update(
        batch=1, context=256, mode="dms8x", num_splits=plan.num_splits, live_tokens=sum(inp["lens_list"]),
        median_us=10.0, kv_GBps=nbytes["kv"] / 10e-6 / 1e9, frac_of_copy=0.5, bytes=nbytes,
    )  # fmt: skip
    result = {
        "device": "test", "capability": 90, "sm_count": 132, "torch": "t", "triton": "t",
        "copy": {"GBps": 3000.0, "bytes": 2 * 2**30}, "sizes": [row], "ok": row["ok"],
        "compile": {"split": {"shared_memory_bytes": 1, "registers": 2}},
    }  # fmt: skip
    table = gpu_check.format_table(result)
    assert "dms8x" in table and "ALL CHECKS PASSED" in table and "regs 2" in table
    gpu_check.write_json(tmp_path / "r.json", result)
    assert (tmp_path / "r.json").read_text().count('"dms8x"') == 1
