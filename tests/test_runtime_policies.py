"""One test matrix for every eviction policy: same engine, same checks."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_hf

from pipeline.runtime.engine import Engine
from pipeline.runtime.model_runner import gathered_attention
from pipeline.runtime.policies import DMSPolicy, H2OPolicy, NoEviction, TOVAPolicy, WindowPolicy
from pipeline.runtime.sampling import SamplingParams
from pipeline.runtime.sequence import Sequence

LIMITS = dict(max_input_len=64, max_output_len=64, kv_block_size=4, kv_pool_tokens=2048)
POLICIES = {
    "none": NoEviction(),
    "dms": DMSPolicy(window=8, force_cr=4),
    "window": WindowPolicy(cr=4, sinks=2),
    "h2o": H2OPolicy(cr=4),
    "tova": TOVAPolicy(cr=4),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return make_tiny_hf(tmp_path_factory.mktemp("plain") / "m")


@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize("prompt_len", [6, 30])
def test_policy_invariants(model_dir, name, prompt_len):
    policy = POLICIES[name]
    engine = Engine.from_hf(model_dir, policy=policy, limits=LIMITS)
    runner, st = engine.runner, engine.streams
    seq = Sequence(0, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=34))
    runner.attach(seq)
    runner.prefill(seq, seq.token_ids)
    while seq.num_generated < 34:
        if seq.num_cached < len(seq.token_ids):
            (token,) = runner.finish_step(runner.decode([seq]).argmax(-1))
        else:
            token = 5
        seq.token_ids.append(token)
    runner.sync()
    total = seq.num_cached
    budget = engine.policy.max_live_tokens(seq.total_budget_tokens)
    for layer in range(2):
        for h in range(2):
            pos = st.positions(layer, seq.slot * 2 + h)
            assert len(pos) == st.seq_lens(seq.slot)[layer, h]
            assert len(set(pos)) == len(pos), "a token is stored twice"
            assert all(0 <= p < total for p in pos)
            assert total - 1 in pos, "the newest token is always kept"
            assert len(pos) <= max(budget, 1)
            if name == "none":
                assert sorted(pos) == list(range(total))
            if name == "window":
                recent = len(pos) - 2
                assert sorted(pos) == [0, 1] + list(range(total - recent, total))
            if name == "dms":  # the ring of window + 1 newest tokens is always there
                assert set(range(total - 9, total)) <= set(pos)
            if name in ("window", "h2o", "tova") and total > budget:
                assert len(pos) == budget
    runner.release(seq)
    assert engine.pool.num_used_blocks == 0


@pytest.mark.parametrize("name", list(POLICIES))
def test_policy_generates_through_engine(model_dir, name):
    engine = Engine.from_hf(model_dir, policy=POLICIES[name], limits=LIMITS)
    outs = engine.generate([[1, 2, 3], list(range(20))], max_tokens=40, ignore_eos=True)
    for out in outs:
        assert out.finish_reason == "length" and len(out.token_ids) == 40
        assert out.stats["compression_ratio"] >= 1.0
    if name != "none":
        assert outs[1].stats["compression_ratio"] > 1.5
    assert engine.pool_stats()["blocks_used"] == 0


def test_gathered_attention_matches_kernel_reference():
    from pipeline.runtime.kv_cache import KVCache
    from plugins.dms_attention.reference import reference_paged_decode_attention

    g = torch.Generator().manual_seed(0)
    cache = KVCache(num_blocks=16, block_size=4, head_dim=8, dtype=torch.float32, device=torch.device("cpu"))
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    tables = torch.randperm(16, generator=g)[:12].view(3 * 2, 2).to(torch.int32)
    lens = torch.tensor([1, 8, 5, 3, 7, 2], dtype=torch.int32)
    slot = torch.arange(8)
    live = slot[None] < lens[:, None]
    rows = torch.where(live, tables.long().repeat_interleave(4, dim=1) * 4 + slot % 4, 16 * 4)
    q = torch.randn(3, 4, 8, generator=g)
    out, probs = gathered_attention(q, cache, rows, live, 0.3, 2)
    ref = reference_paged_decode_attention(q, cache.k, cache.v, tables, lens, 0.3, 2)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(probs.sum(-1), torch.full((6,), 2.0))  # 2 query heads per group
    assert (probs[~live] == 0).all()


def test_block_gather_attention_matches_kernel_reference():
    from pipeline.runtime.model_runner import BlockGatherAttention
    from plugins.dms_attention.reference import reference_paged_decode_attention

    g = torch.Generator().manual_seed(1)
    k_cache, v_cache = torch.randn(2, 32, 4, 8, generator=g)
    tables = torch.randperm(32, generator=g)[:24].view(6, 4).to(torch.int32)
    lens = torch.tensor([0, 16, 5, 3, 13, 1], dtype=torch.int32)
    q = torch.randn(3, 8, 8, generator=g)
    attention = BlockGatherAttention()
    ref = reference_paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.4, 2)
    torch.testing.assert_close(attention(q, k_cache, v_cache, tables, lens, 0.4, 2), ref)
    # Several chunks (1 block each), every stream full, then all short.
    attention.CHUNK_BYTES = 1
    torch.testing.assert_close(attention(q, k_cache, v_cache, tables, lens, 0.4, 2), ref)
    full = torch.full_like(lens, 16)
    ref_full = reference_paged_decode_attention(q, k_cache, v_cache, tables, full, 0.4, 2)
    torch.testing.assert_close(attention(q, k_cache, v_cache, tables, full, 0.4, 2), ref_full)
    short = torch.tensor([2, 1, 3, 3, 2, 1], dtype=torch.int32)
    ref_short = reference_paged_decode_attention(q, k_cache, v_cache, tables, short, 0.4, 2)
    torch.testing.assert_close(attention(q, k_cache, v_cache, tables, short, 0.4, 2), ref_short)
