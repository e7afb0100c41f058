"""The TensorRT plugin and TensorRT-LLM pieces that run without TensorRT: kernels under Triton's interpreter,
ahead-of-time PTX, pool sizing, the build driver's commands. TensorRT parts skip where it is absent."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plugins.dms_attention.prefill import dms_prefill_attention, reference_prefill_attention
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
    trt_pool_write(k_pool, v_pool, k_new, v_new, rows)
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
    plan = plan_pool(_trt_config(True, tp=1), block_size=256, pool_tokens=370_000, dtype="bfloat16")
    # 36 layers x 8 KV heads x 128 x 2 (K, V) x 2 bytes = 144 KiB per token slot (stack-notes' anchor)
    assert plan.pool_bytes == 36 * 8 * 128 * 2 * 2 * plan.blocks_per_layer // 8 * 256
    check_fits(plan, device_bytes=80 * 2**30, weights_bytes=16 * 2**30)
    with pytest.raises(ValueError, match="kv_pool_tokens <="):
        check_fits(plan_pool(_trt_config(True, tp=1), 256, 3_000_000, "bfloat16"), 80 * 2**30, 16 * 2**30)
    with pytest.raises(ValueError, match="smaller than dms_window_size"):
        plan_pool(_trt_config(True), 512, 1000, "bfloat16")


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
    assert env["DMS_TRTLLM_PHASE"] == "generation" and env["DMS_TRTLLM_POOL_BLOCKS"] == str(64 * 4)
    stock = build_commands(args, _trt_config(False))
    assert list(stock) == ["engine"] and "--model_cls_file" not in stock["engine"][0]


def _host_streams(num_layers: int, num_kv_heads: int, num_blocks: int, block: int, window: int):
    """The host bookkeeping a TensorRT driver keeps: dms_core's StreamTable with a DMS ring."""
    from dms_core.streams import BlockPool, StreamTable

    return StreamTable(num_layers, num_kv_heads, 1, 32, BlockPool(num_blocks, block), ring=window + 1)


def _admit(st, layer: int, row: int, evicted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """After the context engine: keep a stream's survivors (rule.survivors) in slots 0..n-1 and load its
    ring. Returns (positions kept, pool rows to copy their K/V to)."""
    from dms_core import rule

    t = evicted.shape[0]
    pos = torch.arange(t)
    kept = pos[rule.survivors(pos, evicted, t, st.ring_size - 1)]
    st.resize(layer, row, len(kept))
    rows = st.pool_rows(layer, row, len(kept))
    st.slot_pos[rows] = kept
    rule.ring_load_(st.ring_row[layer], st.ring_flag[layer], row, kept, evicted[kept], rows, t)
    return kept, rows


def _plan_step(st, layer: int, n: int, t: int) -> torch.Tensor:
    """Before a generation call: where each stream's new token (position t) goes (the row the
    pool_write plugin writes), from dms_core's ring step with the decision still unknown."""
    from dms_core import rule

    pos = torch.full((n,), t)
    step = rule.RingStep.at(st.row_index[:n], pos, st.ring_size)
    append = st.append_rows(n)[layer]
    rows = rule.ring_place_(st.ring_row[layer], st.ring_flag[layer], st.lens[layer], step, append, None)
    st.slot_pos[rows] = t
    return rows


def _record(st, layer: int, n: int, t: int, logit: torch.Tensor) -> None:
    """After the call: dms_logit_L decides the previous token's fate (shift by one)."""
    from dms_core import rule

    step = rule.RingStep.at(st.row_index[:n], torch.full((n,), t), st.ring_size)
    rule.ring_record_(st.ring_flag[layer], step, rule.evicts(logit))


def _before_step(st, n: int, t: int) -> None:
    """Blocks for the streams about to grow (known a step ahead: rule.ring_appends)."""
    from dms_core import rule

    step = rule.RingStep.at(st.row_index[:n], torch.full((n,), t), st.ring_size)
    grows = rule.ring_appends(st.ring_flag, step)
    st.refresh(n, st.lens[:, :n].clone(), grows)
    st.reserve(n)


@pytest.mark.parametrize("window,block", [(4, 2), (8, 4)])
def test_host_streams_follow_the_dms_rule(window, block):
    """Prefill then decode with random decisions: the live set is always the DMS rule's, slots stay
    dense, an evicted token's slot is reused in place, and released blocks return to the pool."""
    g = torch.Generator().manual_seed(0)
    st = _host_streams(1, 1, 64, block, window)
    st.open()
    prompt, steps = 11, 40
    decision = torch.rand(prompt + steps, generator=g) > 0.4  # decision made AT position p (about p - 1)
    evicted = torch.zeros(prompt, dtype=torch.bool)
    evicted[:-1] = decision[1:prompt]
    _, rows = _admit(st, 0, 0, evicted)
    assert len(set(rows.tolist())) == len(rows)
    for t in range(prompt, prompt + steps):
        before = dict(zip(st.positions(0, 0), range(10**6), strict=False))
        _before_step(st, 1, t)
        (row,) = _plan_step(st, 0, 1, t).tolist()
        st.lens_host[0, 0] = int(st.lens[0, 0])
        live = dict(zip(st.positions(0, 0), range(10**6), strict=False))  # position -> slot
        want = {p for p in range(t + 1) if t - p <= window or not decision[p + 1]}
        assert set(live) == want, t
        if len(live) == len(before):  # reuse: the new token took the slot of the one that left
            gone = set(before) - set(live)
            assert len(gone) == 1 and live[t] == before[gone.pop()]
        assert row == st.tables_host[0, 0, live[t] // block] * block + live[t] % block
        _record(st, 0, 1, t, torch.tensor([1.0 if decision[t] else -1.0]))
    used = st.pool.num_used_blocks
    st.close(0)
    assert used > 0 and st.pool.num_used_blocks == 0


def test_engine_data_flow_emulated_matches_hf_dms(tmp_path):
    """The TensorRT engines' data flow on CPU: the prefill kernel, survivors into the pool, then per
    decode step the host's row plan -> pool_write kernel -> paged decode -> decisions recorded (shift by
    one), all bookkeeping from dms_core. Logits must equal the HF DMS model's (hard decisions)."""
    from dms_core import rule
    from pipeline.dms.checkpoint import load_dms_model
    from pipeline.dms.patch import dms_mode
    from plugins.dms_attention.reference import reference_paged_decode_attention
    from tests.tiny_models import make_hf

    torch.set_num_threads(1)
    model = load_dms_model(make_hf(tmp_path / "hf", "qwen3", "borrowed", window=8))
    cfg = model.config
    window, block, d = cfg.dms_window_size, 4, cfg.head_dim
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    scale = d**-0.5
    ids = torch.randint(0, cfg.vocab_size, (1, 30), generator=torch.Generator().manual_seed(1))
    prompt = 12
    with torch.inference_mode(), dms_mode(model, "hard"):
        want = model(ids).logits[0]

    def rot(x, cos, sin):
        x1, x2 = x.chunk(2, -1)
        return x * cos + torch.cat([-x2, x1], -1) * sin

    keep = (~rule.borrowed_channel_mask(hq, hkv, d, "head")).float()  # as DmsAttention.channel_keep

    def project(layer, x, pos):  # what DmsAttention.project computes in the engine
        a, t = layer.self_attn, x.shape[0]
        h = layer.input_layernorm(x)
        q = a.q_norm(a.q_proj(h).view(t, hq, d))
        k, v = a.k_norm(a.k_proj(h).view(t, hkv, d)), a.v_proj(h).view(t, hkv, d)
        logit = rule.borrowed_logits(q.transpose(0, 1)[None], hkv, "head", cfg.dms_alpha_scale,
                                     cfg.dms_initial_alpha_offset)[0].T  # [t, Hkv]
        cos, sin = (c[0][:, None] for c in model.model.rotary_emb(x[None], pos[None]))
        return rot(q * keep, cos, sin) * keep, rot(k, cos, sin), v, logit

    def finish(layer, x, out):
        x = x + layer.self_attn.o_proj(out.reshape(x.shape[0], -1))
        return x + layer.mlp(layer.post_attention_layernorm(x))

    layers = model.model.layers
    st = _host_streams(len(layers), hkv, 64 * len(layers), block, window)
    st.open()
    k_pool, v_pool = torch.zeros(2, st.pool.num_blocks + 1, block, d)  # one pool for every layer
    got = []
    with torch.inference_mode():
        x, pos = model.model.embed_tokens(ids[0, :prompt]), torch.arange(prompt)
        for li, layer in enumerate(layers):  # context engine
            q, k, v, logit = project(layer, x, pos)
            evicted = rule.shift_by_one(rule.evicts(logit.T), False).T  # [prompt, Hkv]; the last is kept
            cu = torch.tensor([0, prompt], dtype=torch.int32)
            out = dms_prefill_attention(q.contiguous(), k.contiguous(), v.contiguous(),
                                        evicted.int().contiguous(), cu, window, scale, block_m=16, block_n=16)
            for h in range(hkv):  # host: survivors into the pool
                kept, rows = _admit(st, li, h, evicted[:, h])
                k_pool.view(-1, d)[rows] = k[kept, h]
                v_pool.view(-1, d)[rows] = v[kept, h]
            x = finish(layer, x, out)
        got.append(model.lm_head(model.model.norm(x))[-1])
        for t in range(prompt, ids.shape[1]):  # generation engine, one token per step
            x, pos = model.model.embed_tokens(ids[0, t : t + 1]), torch.tensor([t])
            _before_step(st, hkv, t)
            width = st.width(hkv)
            for li, layer in enumerate(layers):
                q, k, v, logit = project(layer, x, pos)
                rows = _plan_step(st, li, hkv, t)
                trt_pool_write(k_pool, v_pool, k, v, rows.int())
                table, lens = st.tables[li, :hkv, :width].contiguous(), st.lens[li, :hkv]
                out = reference_paged_decode_attention(q, k_pool, v_pool, table, lens, scale, hkv)
                _record(st, li, hkv, t, logit[0])
                x = finish(layer, x, out)
            got.append(model.lm_head(model.model.norm(x))[-1])
    assert (torch.stack(got) - want[prompt - 1 :]).abs().max() < 1e-5
    with torch.inference_mode(), dms_mode(model, "teacher"):
        base = model(ids).logits[0]
    assert (base - want).abs().max() > 1e-2  # evictions (and the zeroed channel) matter here
    st.close(0)
    assert st.pool.num_used_blocks == 0


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
