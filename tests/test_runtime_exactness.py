"""Exactness of the runtime: vanilla == HF generate; DMS decode == dense attention with the same hard
mask (the training-side patched HF model in "hard" mode); chunked prefill == one-shot prefill."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import make_tiny_hf

from pipeline.runtime.engine import Engine
from pipeline.runtime.policies import DMSPolicy

LIMITS = dict(max_input_len=64, max_output_len=64, kv_block_size=4, kv_pool_tokens=1024)
# float32 end to end; differences come only from summation order (paged vs dense, compaction).
ATOL = 1e-4


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _logits_per_step(engine: Engine, tokens: list[int], prompt_len: int):
    """Prefill tokens[:prompt_len] (in the engine's chunks), then feed the rest one decode step at a
    time (teacher forcing). Returns (logits [len(tokens) - prompt_len + 1, V]: the prediction after each
    prefix, live tokens per stream [layers, kv_heads] at the end)."""
    forced = [*tokens[prompt_len:], 0]  # the last forced token is never fed
    (c,) = engine.score([(tokens[:prompt_len], forced)])
    return c.logits, np.asarray(c.stats["live_tokens_per_stream"])


@pytest.mark.parametrize("family", ["qwen3", "llama", "llama3-rope"])
def test_vanilla_matches_hf_generate(tmp_path, family):
    from transformers import AutoModelForCausalLM

    path = make_tiny_hf(
        tmp_path / family, family[:5], tie=family == "qwen3", llama3_rope=family == "llama3-rope"
    )
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    engine = Engine.from_hf(path, limits=LIMITS)
    assert engine.policy.name == "none"
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (5, 13, 9)]
    outs = engine.generate(prompts, max_tokens=24)  # batched decode with different lengths
    for prompt, out in zip(prompts, outs, strict=True):
        ids = torch.tensor([prompt])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
        assert out.token_ids == ref[0, len(prompt) :].tolist()
        assert out.finish_reason == "length"
        # logits of every step against one HF forward over the whole sequence
        full = prompt + out.token_ids
        mine, _ = _logits_per_step(engine, full, len(prompt))
        with torch.no_grad():
            theirs = hf(torch.tensor([full])).logits[0, len(prompt) - 1 :]
        torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=0)
    assert engine.pool_stats()["blocks_used"] == 0


@pytest.mark.parametrize("mode", ["borrowed", "adapter"])
def test_dms_decode_matches_dense_hard_mask(tmp_path, mode):
    """Every decode step's logits equal one dense forward of the patched HF model in hard mode (same
    decisions, delayed-eviction mask), while the streams really shrink."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from dms_core.config import DmsConfig
    from pipeline.dms.patch import dms_mode, patch_model

    path = make_tiny_hf(tmp_path / mode, dms=mode, window=8, block=4, offset=0.0)
    engine = Engine.from_hf(path, limits=LIMITS)
    assert engine.policy.name == "dms"
    tokens = torch.randint(0, 96, (48,), generator=torch.Generator().manual_seed(2)).tolist()
    mine, lens = _logits_per_step(engine, tokens, prompt_len=12)
    ref_model = AutoModelForCausalLM.from_pretrained(path).eval()
    patch_model(ref_model, DmsConfig.from_hf_config(ref_model.config))
    adapters = {k: v for k, v in load_file(path / "model.safetensors").items() if "dms_proj_alpha" in k}
    ref_model.load_state_dict(adapters, strict=False)
    with torch.no_grad(), dms_mode(ref_model, "hard"):
        theirs = ref_model(torch.tensor([tokens])).logits[0, 11:]
    torch.testing.assert_close(mine[:-1], theirs[:-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(mine[-1], theirs[-1], atol=ATOL, rtol=0)
    assert lens.max() < len(tokens), "random decision weights should evict something"
    assert lens.min() >= 9  # the window + 1 most recent tokens always stay


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_chunked_prefill_equals_one_shot(tmp_path, chunk):
    path = make_tiny_hf(tmp_path / "dms", dms="borrowed", window=8, block=4)
    engine = Engine.from_hf(path, limits=LIMITS)
    chunking = Engine.from_hf(path, limits=LIMITS, prefill_chunk_tokens=chunk)
    tokens = torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    one, lens_one = _logits_per_step(engine, tokens, prompt_len=32)
    chunked, lens_chunked = _logits_per_step(chunking, tokens, prompt_len=32)
    torch.testing.assert_close(chunked, one, atol=ATOL, rtol=0)
    assert (lens_one == lens_chunked).all()


def test_prefill_equals_decode_token_by_token(tmp_path):
    """Prefill with the training mask and hard decisions stores exactly what decode would keep."""
    path = make_tiny_hf(tmp_path / "dms", dms="borrowed", window=8, block=4)
    engine = Engine.from_hf(path, limits=LIMITS)
    tokens = torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    a, lens_a = _logits_per_step(engine, tokens, prompt_len=40)
    b, lens_b = _logits_per_step(engine, tokens, prompt_len=1)
    torch.testing.assert_close(a[0], b[-1], atol=ATOL, rtol=0)
    assert (lens_a == lens_b).all()


def test_forced_cr_on_plain_model(tmp_path):
    path = make_tiny_hf(tmp_path / "plain")
    engine = Engine.from_hf(path, policy=DMSPolicy(window=8, force_cr=4), limits=LIMITS)
    out = engine.generate([list(range(1, 9))], max_tokens=56, ignore_eos=True)[0]
    # 63 tokens went through the model (the last sampled one is never fed): the ring of the 9 newest
    # plus one in four of the 54 older ones, in each of 2 layers x 2 KV heads
    assert out.stats["live_kv_tokens"] == 2 * 2 * (9 + 54 // 4)
    assert out.stats["compression_ratio"] == pytest.approx(63 / 22)
    assert engine.pool_stats()["blocks_used"] == 0
