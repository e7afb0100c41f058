"""The TensorRT plugin and TensorRT-LLM pieces that run without TensorRT: kernels under Triton's interpreter,
ahead-of-time PTX, pool and memory sizing, the build driver's commands. TensorRT parts skip where it is
absent. The engines' data flow (the host driver over emulated sessions) is tests/test_trt_driver.py; the
model class's math, tests/test_trt_model_class.py."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plugins.dms_attention.prefill import dms_prefill_attention, reference_prefill_attention
from plugins.dms_attention.reference import reference_pool_write
from plugins.dms_attention.trt_plugin import (
    compile_decode_aot,
    compile_pool_write_aot,
    compile_prefill_aot,
    register_plugins,
    tensorrt_available,
    trt_pool_write,
)
from plugins.trtllm.pool import check_fits, plan_pool

ROOT = Path(__file__).resolve().parents[1]
HAS_TRT, NO_TRT_REASON = tensorrt_available()
HAS_TRTLLM = importlib.util.find_spec("tensorrt_llm") is not None


def test_prefill_kernel_matches_reference_with_evictions():
    torch.manual_seed(0)
    lens = [5, 37, 20]
    n, hq, hkv, d = sum(lens), 4, 2, 16
    q, k, v = torch.randn(n, hq, d), torch.randn(n, hkv, d), torch.randn(n, hkv, d)
    evicted = (torch.rand(n, hkv) > 0.5).int()
    cu = torch.tensor([0, 5, 42, 62], dtype=torch.int32)
    got = dms_prefill_attention(q, k, v, evicted, cu, window=4, scale=0.25, block_m=16, block_n=16)
    want = reference_prefill_attention(q, k, v, evicted, cu, 4, 0.25)
    assert (got.double() - want).abs().max() < 1e-5
    plain = reference_prefill_attention(q, k, v, torch.zeros_like(evicted), cu, 4, 0.25)
    assert (plain - want).abs().max() > 1e-2  # the evictions beyond the window changed the result


def test_prefill_kernel_reads_the_past_of_a_chunk():
    """Chunked prefill: each sequence's chunk also attends to its streams' stored tokens (paged, in any
    slot order), hidden from queries at or after their expiry."""
    from plugins.dms_attention.prefill import NEVER, PrefillPast

    torch.manual_seed(0)
    lens, starts, hkv, hq, d, bs, nb = [5, 37, 20], [0, 30, 12], 2, 4, 16, 4, 40
    n = sum(lens)
    q, k, v = torch.randn(n, hq, d), torch.randn(n, hkv, d), torch.randn(n, hkv, d)
    evicted = (torch.rand(n, hkv) > 0.5).int()
    cu = torch.tensor([0, 5, 42, 62], dtype=torch.int32)
    positions = torch.cat([torch.arange(s, s + t) for s, t in zip(starts, lens, strict=True)]).int()
    stored = torch.tensor([0, 0, 9, 3, 17, 12], dtype=torch.int32)  # the first sequence has no past
    expiry = torch.full((6, 20), NEVER, dtype=torch.int32)
    expiry[2:] = torch.randint(0, 60, (4, 20)).int()
    tables = torch.randperm(nb)[:30].view(6, 5).int().contiguous()
    past = PrefillPast(positions, torch.randn(nb, bs, d), torch.randn(nb, bs, d), tables, stored, expiry)
    got = dms_prefill_attention(q, k, v, evicted, cu, window=4, scale=0.25, past=past, block_m=16, block_n=16)
    want = reference_prefill_attention(q, k, v, evicted, cu, 4, 0.25, past)
    assert (got.double() - want).abs().max() < 1e-5
    assert (reference_prefill_attention(q, k, v, evicted, cu, 4, 0.25) - want)[5:].abs().max() > 1e-1
    assert (reference_prefill_attention(q, k, v, evicted, cu, 4, 0.25) - want)[:5].abs().max() == 0


def test_decode_plugin_kernel_matches_reference():
    """The AOT plugin's kernel (the runtime kernel, single split) through the interpreter; it calls the
    runtime kernel as a function, which needs TRITON_INTERPRET=1 before import: a fresh process."""
    code = """
import torch
from plugins.dms_attention.trt_plugin import trt_paged_decode
from plugins.dms_attention.reference import reference_paged_decode_attention
torch.manual_seed(0)
S, hq, hkv, d, bs, nb, mb = 3, 8, 2, 16, 4, 40, 6
q = torch.randn(S, hq, d); k = torch.randn(nb, bs, d); v = torch.randn(nb, bs, d)
bt = torch.randperm(nb)[: S * hkv * mb].view(S * hkv, mb).int().contiguous()
lens = torch.tensor([0, 5, 24, 1, 13, 7], dtype=torch.int32)
want = reference_paged_decode_attention(q, k, v, bt, lens, 0.25, hkv)
for tactic in (1, 2):
    got = trt_paged_decode(q, k, v, bt, lens, 0.25, hkv, tactic=tactic)
    assert (got - want).abs().max() < 1e-5, (tactic, (got - want).abs().max())
print("ok")
"""
    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_pool_write_puts_each_stream_in_its_row():
    k_pool, v_pool = torch.zeros(5, 4, 16), torch.zeros(5, 4, 16)
    k_new, v_new = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    rows = torch.tensor([0, 7, 19, 3, 12, 5], dtype=torch.int32)
    k_ref, v_ref = torch.zeros(5, 4, 16), torch.zeros(5, 4, 16)
    reference_pool_write(k_ref, v_ref, k_new, v_new, rows)
    trt_pool_write(k_pool, v_pool, k_new, v_new, rows)
    assert torch.equal(k_pool, k_ref) and torch.equal(v_pool, v_ref)
    assert torch.equal(k_pool.view(-1, 16)[rows.long()], k_new.reshape(-1, 16))
    assert torch.equal(v_pool.view(-1, 16)[rows.long()], v_new.reshape(-1, 16))
    assert int(k_pool.abs().sum(-1).ne(0).sum()) == 6  # nothing else touched


def test_aot_kernels_compile_to_sm90_ptx():
    """What aot_impl hands TensorRT, compiled here without a GPU (Triton ships ptxas)."""
    for kernel in (compile_decode_aot(torch.bfloat16, 128, 4, 128**-0.5, tactic=2),
                   compile_pool_write_aot(torch.bfloat16, 128)):
        assert ".target sm_90" in kernel.asm["ptx"] and kernel.metadata.name.startswith("dms_")
        assert kernel.metadata.shared < 228 * 1024  # fits an H100 SM


@pytest.mark.slow
def test_prefill_aot_compiles_to_sm90_ptx():
    kernel = compile_prefill_aot(torch.bfloat16, 128, 128**-0.5, window=512, tactic=1)
    assert ".target sm_90" in kernel.asm["ptx"] and kernel.metadata.shared < 228 * 1024


@pytest.mark.skipif(not HAS_TRT, reason=f"TensorRT absent: {NO_TRT_REASON}")
def test_plugins_register_with_tensorrt():
    import tensorrt.plugin as trtp

    register_plugins()
    for op in ("paged_decode", "pool_write", "prefill"):
        assert hasattr(trtp.op.dms, op)


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is present: the registration test above runs instead")
def test_register_without_tensorrt_says_why():
    with pytest.raises(RuntimeError, match="tensorrt.plugin is not importable"):
        register_plugins()


@pytest.mark.skipif(not HAS_TRTLLM, reason="TensorRT-LLM 1.2.1 is not installed here (it cannot be: see "
                    "plugins/README.md); the model class is only importable inside that environment")
def test_model_class_imports():
    from plugins.trtllm import model

    assert issubclass(model.DmsQWenForCausalLM, model.QWenForCausalLM)


def _trt_config(dms: bool, tp: int = 2) -> dict:
    from pipeline.convert.config import trtllm_fields

    hf = {"model_type": "qwen3", "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
          "head_dim": 128, "num_hidden_layers": 36, "intermediate_size": 12288, "vocab_size": 151936,
          "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1e6}
    if dms:
        hf |= {"dms_window_size": 512, "dms_cr": 8}
    return trtllm_fields(hf, "bfloat16") | {
        "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 36, "hidden_size": 4096,
        "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1},
    }


def test_pool_plan_for_qwen3_8b():
    plan = plan_pool(_trt_config(True, tp=1), block_size=256, pool_tokens=240_000, dtype="bfloat16")
    # 36 layers x 8 KV heads x 128 x 2 (K, V) x 2 bytes = 144 KiB per slot of every (layer, KV head)
    assert plan.pool_bytes == 36 * 8 * 128 * 2 * 2 * plan.total_blocks // (36 * 8) * 256
    assert plan.total_blocks == plan.blocks_per_layer * 36
    with pytest.raises(ValueError, match="smaller than dms_window_size"):
        plan_pool(_trt_config(True), 512, 1000, "bfloat16")


# The GPU cards' models (their public config.json): what plugins/trtllm/pool.py needs to size them.
GPU_MODELS = {
    "qwen3-8b": dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_size=128,
                     num_hidden_layers=36, intermediate_size=12288, vocab_size=151936),
    "qwen3-1.7b": dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=8, head_size=128,
                       num_hidden_layers=28, intermediate_size=6144, vocab_size=151936,
                       tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, head_size=64,
                         num_hidden_layers=16, intermediate_size=8192, vocab_size=128256,
                         tie_word_embeddings=True),
}  # fmt: skip
H100_BYTES = 81559 * 2**20  # nvidia-smi's memory.total of an H100 80GB (SXM and PCIe)


@pytest.mark.parametrize("card_name", sorted(GPU_MODELS))
def test_gpu_cards_fit_an_h100_at_max_batch_size(card_name):
    """build.kv_pool_tokens counts slots per (layer, KV head) everywhere; each GPU card's value, with both
    engines' weights and the context engine at its token budget, fits 90 % of one H100, and the pool holds
    max_batch_size requests of the card's perf workload with eviction off (perf's vanilla baseline)."""
    from pipeline.card import load_card
    from plugins.trtllm.pool import plan_memory, weights_bytes

    card = load_card(card_name)
    b = card.build
    config = GPU_MODELS[card_name] | {"dms_window_size": card.dms.window, "mapping": {"tp_size": b.tp_size}}

    def memory(pool_tokens: int):
        plan = plan_pool(config, b.kv_block_size, pool_tokens, b.dtype)
        weights = weights_bytes(config, b.dtype)
        longest = b.max_input_len + b.max_output_len
        return plan_memory(config, plan, weights, b.max_batch_size, b.max_input_len, longest)

    check_fits(memory(b.kv_pool_tokens), H100_BYTES)
    request = card.perf.input_tokens + card.perf.output_tokens
    per_stream = (-(-request // b.kv_block_size) + 1) * b.kv_block_size  # + the block handed out a step ahead
    assert b.max_batch_size * per_stream <= b.kv_pool_tokens
    with pytest.raises(ValueError, match=r"set build.kv_pool_tokens <= \d+"):
        check_fits(memory(4 * b.kv_pool_tokens), H100_BYTES)


def test_build_driver_commands(tmp_path):
    from plugins.trtllm.build_engine import build_commands, parse_args

    args = parse_args(["--checkpoint_dir", "C", "--output_dir", str(tmp_path), "--max_batch_size", "8",
                       "--max_input_len", "1024", "--max_output_len", "512", "--tokens_per_block", "64",
                       "--kv_pool_tokens", "4096"])
    dms = build_commands(args, _trt_config(True))
    assert list(dms) == ["context", "generation"]
    cmd, env = dms["generation"]
    assert cmd[cmd.index("--model_cls_name") + 1] == "DmsQWenForCausalLM"
    assert cmd[cmd.index("--paged_kv_cache") + 1] == "disable" and cmd[cmd.index("--workers") + 1] == "2"
    assert cmd[cmd.index("--max_seq_len") + 1] == "1536"
    # one pool tensor for every layer: 4096 slots / 64 x 4 KV heads per rank x 36 layers, + the scratch block
    assert env["DMS_TRTLLM_PHASE"] == "generation" and env["DMS_TRTLLM_POOL_BLOCKS"] == str(64 * 4 * 36 + 1)
    assert cmd[cmd.index("--max_num_tokens") + 1] == "8"  # the generation engine: a token per sequence
    context = dms["context"][0]
    assert context[context.index("--max_num_tokens") + 1] == "1024"  # a chunk budget, not batch x input
    stock = build_commands(args, _trt_config(False))
    assert list(stock) == ["engine"] and "--model_cls_file" not in stock["engine"][0]


def test_code_for_the_trtllm_environment_imports_nothing_from_our_stack():
    """plugins/ and ci/gpu_check.py run inside TensorRT-LLM 1.2.1's environment (older torch and
    transformers, no `pipeline` package): an import of `pipeline` there would fail only on the GPU box."""
    import ast

    root = Path(__file__).resolve().parents[1]
    files = [*sorted((root / "plugins").rglob("*.py")), *sorted((root / "dms_core").rglob("*.py")),
             root / "ci" / "gpu_check.py"]
    assert len(files) > 12
    for file in files:
        for node in ast.walk(ast.parse(file.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            bad = [n for n in names if n == "pipeline" or n.startswith("pipeline.")]
            assert not bad, f"{file.relative_to(root)}:{node.lineno} imports {bad[0]}"


def test_engine_io_of_each_phase_from_the_build_drivers_environment(tmp_path):
    """What model.py declares at trtllm-build time: the sizes build_engine.py passes in the environment,
    one pool tensor for every layer, per-layer tables and lengths, the context's past, the generation's
    write rows."""
    from plugins.trtllm import engine_io
    from plugins.trtllm.build_engine import build_commands, parse_args

    args = parse_args(["--checkpoint_dir", "C", "--output_dir", str(tmp_path), "--max_batch_size", "8",
                       "--max_input_len", "1024", "--max_output_len", "512", "--tokens_per_block", "64",
                       "--kv_pool_tokens", "4096"])  # fmt: skip
    for phase, (_, env) in build_commands(args, _trt_config(True, tp=1)).items():
        shapes = engine_io.Shapes.from_env(env, num_layers=36, kv_heads=8, head_dim=128, max_batch=8,
                                           max_tokens=1024 if phase == "context" else 8)  # fmt: skip
        declared = engine_io.inputs(phase, shapes)
        kind, pool = declared[engine_io.K_POOL]
        assert kind == "pool" and pool["pool_blocks"] == [(1, 36 * 8 * 64 + 1, 36 * 8 * 64 + 1)]
        assert declared[engine_io.tables(35)][1]["max_blocks"][0][2] == 24  # (1024 + 512) / 64
        assert (engine_io.expiry(0) in declared) == (phase == "context")
        assert (engine_io.write_rows(0) in declared) == (phase == "generation")
    with pytest.raises(RuntimeError, match="build the DMS engines with plugins/trtllm/build_engine.py"):
        engine_io.Shapes.from_env({}, num_layers=1, kv_heads=1, head_dim=8, max_batch=1, max_tokens=1)
