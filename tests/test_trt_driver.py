"""The host driver of the DMS TensorRT engine pair (plugins/trtllm/driver.py) on CPU, over emulated
sessions: the engines' computation in torch, attention through the kernels' torch references (Qwen3
borrowed: through the prefill and pool-write kernels themselves, under Triton's interpreter), on a build
directory laid out like the pair's (tests/trt_pair.py). Only the TensorRT binding itself
(TrtllmSession) cannot run here.

Reference: the HF DMS model in hard mode over the prompt and the driver's own tokens. Tolerance: logits
within 1e-4 (float32; observed <= 2.1e-5 with logits of magnitude ~10), and every greedy token equal to
the reference's argmax.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import make_tiny_hf  # noqa: E402
from trt_pair import make_pair_dir  # noqa: E402

from dms_core import rule  # noqa: E402
from pipeline.runtime.sampling import SamplingParams  # noqa: E402
from plugins.trtllm import engine_io  # noqa: E402
from plugins.trtllm.driver import PairDriver, PairPlan, load_driver  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
CASES = [("qwen3", "borrowed"), ("qwen3", "adapter"), ("llama", "borrowed"), ("llama", "adapter")]
GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)
TOL = 1e-4


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """{(family, mode): (hf_dir, engine_dir)}; Llama with llama3 RoPE scaling (it matters at these
    lengths)."""
    out = {}
    for family, mode in CASES:
        root = tmp_path_factory.mktemp(f"{family}-{mode}")
        hf = make_tiny_hf(root / "hf", family, dms=mode, window=8, block=4, llama3_rope=family == "llama")
        out[family, mode] = hf, make_pair_dir(root, hf, max_num_tokens=8)  # 8 tokens a call: chunked prefill
    return out


def _prompts(*lengths: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (n,), generator=g).tolist() for n in lengths]


def _hf_logits(hf_dir: Path, prompt: list[int], generated: list[int], mode: str = "hard") -> torch.Tensor:
    """The HF DMS model's logits at the positions that predicted each generated token."""
    from pipeline.dms.checkpoint import load_dms_model
    from pipeline.dms.patch import dms_mode

    model = _hf_logits.models.setdefault(hf_dir, load_dms_model(hf_dir))
    ids = torch.tensor([prompt + generated])
    with torch.inference_mode(), dms_mode(model, mode):
        return model(ids).logits[0, len(prompt) - 1 : -1].float()


_hf_logits.models = {}


class _Recorder:
    """Wraps a session to record what the driver hands it (the calls themselves run unchanged)."""

    def __init__(self, session):
        self.session, self.calls = session, []

    def run(self, inputs):
        self.calls.append({k: v.clone() for k, v in inputs.items() if not k.endswith("_pool")})
        return self.session.run(inputs)


@pytest.mark.parametrize("family,mode", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_driver_matches_hf_dms_with_chunked_prefill_and_concurrent_requests(pairs, family, mode):
    hf, engine = pairs[family, mode]
    driver = load_driver(engine, session="emulated", kernels=(family, mode) == ("qwen3", "borrowed"))
    context = driver.context = _Recorder(driver.context)
    prompts = _prompts(30, 13, 22)
    handles = [driver.submit(p, GREEDY, keep_logits=True) for p in prompts]  # all in flight together
    done = [h.result() for h in handles]
    ratios = []
    for prompt, c in zip(prompts, done, strict=True):
        assert c.finish_reason == "length" and len(c.token_ids) == 10
        want = _hf_logits(hf, prompt, c.token_ids)
        assert (c.logits - want).abs().max() < TOL
        assert want.argmax(-1).tolist() == c.token_ids
        ratios.append(c.stats["compression_ratio"])
    assert max(ratios) > 1.2  # tokens were evicted
    # Chunks of at most 8 tokens a call, later chunks reading what the earlier ones stored.
    assert all(len(call["input_ids"]) <= 8 for call in context.calls)
    assert any(int(call[engine_io.lens(0)].max()) > 0 for call in context.calls)
    assert driver.pool_stats()["blocks_used"] == 0 and not driver.has_work()
    if (family, mode) == ("qwen3", "borrowed"):  # the evictions change the logits: the test can tell
        assert (_hf_logits(hf, prompts[0], done[0].token_ids, "teacher") - done[0].logits).abs().max() > 1e-2


def test_cancellation_and_preemption_leave_the_others_exact_and_the_pool_empty(pairs):
    """A pool too small for every request at once: the youngest is preempted and recomputed (prefill is
    exact, so its tokens do not change), a cancelled request stops at once, and every block comes back."""
    hf, engine = pairs["qwen3", "borrowed"]
    driver = load_driver(engine, session="emulated", pool_tokens=80)  # 80 blocks of 4 slots in all
    prompts = _prompts(24, 18, 20, seed=2)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    handles = [driver.submit(p, params, keep_logits=True) for p in prompts]
    doomed = driver.submit(_prompts(12, seed=3)[0], params)
    for _ in range(6):
        driver.step()
    doomed.cancel()
    done = [h.result() for h in handles]
    cancelled = doomed.result()
    assert cancelled.finish_reason == "cancelled" and len(cancelled.token_ids) < 24
    assert driver.num_preemptions > 0 and sum(c.stats["preemptions"] for c in done) > 0
    for prompt, c in zip(prompts, done, strict=True):
        assert c.finish_reason == "length"
        assert (c.logits - _hf_logits(hf, prompt, c.token_ids)).abs().max() < TOL
    assert driver.pool_stats()["blocks_used"] == 0


def test_background_loop_streams_events_with_kv_figures(pairs):
    _, engine = pairs["llama", "adapter"]
    driver = load_driver(engine, session="emulated")
    driver.start()
    try:
        handle = driver.submit(_prompts(26)[0], SamplingParams(max_tokens=6, ignore_eos=True))
        events = list(handle)
        done = handle.result(timeout=120)
    finally:
        driver.stop()
    assert [e.token_id for e in events] == done.token_ids and len(events) == 6
    assert all(e.live_kv_tokens > 0 and e.compression_ratio >= 1.0 for e in events)
    assert events[-1].live_kv_tokens == done.stats["live_kv_tokens"]
    assert driver.pool_stats()["blocks_used"] == 0


def test_stop_ids_eos_and_eviction_off(pairs):
    _, engine = pairs["qwen3", "adapter"]
    driver = load_driver(engine, session="emulated")
    prompt = _prompts(20)[0]
    free = driver.submit(prompt, GREEDY).result()
    stop_at = free.token_ids[3]
    stopped = driver.submit(prompt, SamplingParams(max_tokens=10, stop_token_ids=(stop_at,))).result()
    assert (
        stopped.finish_reason == "stop"
        and stopped.token_ids == free.token_ids[: free.token_ids.index(stop_at) + 1]
    )
    driver.eos_token_ids = (stop_at,)
    assert driver.submit(prompt, SamplingParams(max_tokens=10)).result().finish_reason == "stop"
    assert driver.submit(prompt, GREEDY).result().token_ids == free.token_ids  # ignore_eos: end_id -1
    vanilla = driver.submit(prompt, GREEDY, eviction=False).result()
    p = driver.plan
    assert vanilla.stats["compression_ratio"] == 1.0  # every stream holds every token it has seen
    assert vanilla.stats["live_kv_tokens"] == p.num_layers * p.num_kv_heads * (len(prompt) + 9)
    assert free.stats["compression_ratio"] > 1.0


def test_bad_requests_are_refused_with_the_reason(pairs):
    _, engine = pairs["qwen3", "borrowed"]
    driver = load_driver(engine, session="emulated", pool_tokens=16)
    for prompt, params, message in [
        ([], GREEDY, "empty prompt"),
        ([1] * 65, GREEDY, "over the engine's max_input_len 64"),
        ([1, 2], SamplingParams(max_tokens=33), "over the engine's max_output_len 32"),
        ([1, 96], GREEDY, "token id 96 outside the vocabulary"),
        ([1, 2], SamplingParams(max_tokens=0), "max_tokens must be an integer >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            driver.submit(prompt, params)
    too_big = driver.submit([1] * 40, GREEDY).result()
    assert too_big.finish_reason == "error" and "raise build.kv_pool_tokens" in too_big.error
    with pytest.raises(ValueError, match="session must be 'trtllm' or 'emulated'"):
        load_driver(engine, session="onnx")
    with pytest.raises(FileNotFoundError, match="not a DMS engine pair"):
        load_driver(engine.parent / "ckpt", session="emulated")


class _ScriptedDecisions:
    """An engine stand-in whose only output that matters is each token's decision, drawn at random per
    (position, KV head): the driver's bookkeeping is then checked against the rule for decision patterns
    a tiny model would rarely produce. Attention outputs and logits are zeros (greedy token 0)."""

    def __init__(self, plan: PairPlan, decisions: torch.Tensor):
        self.plan, self.decisions = plan, decisions  # bool [positions, Hkv]: the decision made AT p

    def run(self, inputs):
        p, pos = self.plan, inputs[engine_io.POSITIONS].long()
        logit = torch.where(self.decisions[pos], 1.0, -1.0)
        out = {"logits": torch.zeros(len(inputs["last_token_ids"]), p.vocab_size)}
        for li in range(p.num_layers):
            out[engine_io.logits(li)] = logit
            out[engine_io.keys(li)] = out[engine_io.values(li)] = torch.zeros(
                len(pos), p.num_kv_heads, p.head_dim
            )
        return out


def test_bookkeeping_follows_the_dms_rule_under_random_decisions(pairs):
    """After every step each stream stores exactly the tokens the rule keeps (those in the window of the
    last window + 1, or not evicted), densely, an evicted token's slot reused in place by a later one."""
    _, engine = pairs["qwen3", "borrowed"]
    emulated = load_driver(engine, session="emulated")
    plan, window = emulated.plan, emulated.window
    decisions = torch.rand(80, plan.num_kv_heads, generator=torch.Generator().manual_seed(0)) > 0.4
    scripted = _ScriptedDecisions(plan, decisions)
    driver = PairDriver(plan, scripted, scripted)
    prompt, steps = 21, 30
    handle = driver.submit([5] * prompt, SamplingParams(max_tokens=steps, ignore_eos=True))
    st, reused = driver.streams, 0
    while not handle.done:
        before = {
            h: dict(zip(st.positions(0, h), range(10**6), strict=False)) for h in range(plan.num_kv_heads)
        }
        driver.step()
        if handle.done:
            break
        seen = driver.running[0].num_cached
        for h in range(plan.num_kv_heads):
            live = dict(zip(st.positions(0, h), range(10**6), strict=False))  # position -> slot
            want = {p for p in range(seen) if seen - 1 - p <= window or not decisions[p + 1, h]}
            assert set(live) == want, (seen, h)
            if before[h] and len(live) == len(before[h]):  # the new token took the slot of one that left
                gone = set(before[h]) - set(live)
                assert len(gone) == 1 and live[seen - 1] == before[h][gone.pop()]
                reused += 1
    assert reused > 0 and handle.result().finish_reason == "length"
    assert driver.pool_stats()["blocks_used"] == 0
    assert rule.survivors  # the rule the expectation above restates (docs/dms.md section 5)


def test_visible_until_and_stored_evicted_restate_the_rule():
    """The two dms_core functions the driver hands the prefill kernel a stored past with."""
    g = torch.Generator().manual_seed(4)
    window, seen = 5, 30
    pos = torch.arange(seen)
    evicted = torch.rand(seen, generator=g) > 0.5  # the decision about each token (shifted by one)
    queries = torch.arange(seen, seen + 12)
    until = rule.visible_until(pos, evicted, window, never=1 << 30)
    assert torch.equal(rule.hard_visibility(evicted, queries, pos, window), queries[:, None] < until[None, :])
    ring = torch.zeros(window + 1, dtype=torch.bool)
    ring[pos[-window - 1 :] % (window + 1)] = evicted[-window - 1 :]  # the ring: the last window + 1 tokens
    stored = rule.survivors(pos, evicted, seen, window)
    want = evicted[stored] & (pos[stored] >= seen - window - 1)  # older stored tokens were kept
    assert torch.equal(rule.stored_evicted(ring, pos[stored], seen), want)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is not None, reason="TensorRT-LLM is installed")
def test_the_tensorrt_session_without_tensorrt_llm_says_where_to_serve(pairs):
    _, engine = pairs["qwen3", "borrowed"]
    with pytest.raises(RuntimeError, match="needs TensorRT-LLM 1.2.1 in this Python .* 'emulated'"):
        load_driver(engine, session="trtllm")


@pytest.mark.parametrize("family,mode", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_one_rule_three_paths_hf_patch_torch_engine_and_the_pair(pairs, family, mode):
    """The parity check of docs/dms.md: one random model, one prompt, greedy under hard DMS through the
    HF patch (training's code), the torch engine (pipeline.runtime) and the TensorRT pair's driver
    (plugins/trtllm over emulated sessions). The same tokens, logits within TOL; Llama carries llama3
    RoPE scaling, so unscaled RoPE or the wrong adapter input anywhere fails here."""
    from pipeline.runtime.engine import Engine

    hf, engine_dir = pairs[family, mode]
    prompt = _prompts(30, seed=7)[0]
    driver = load_driver(engine_dir, session="emulated")
    pair = driver.submit(prompt, GREEDY, keep_logits=True).result()
    limits = dict(max_batch_size=2, max_input_len=64, max_output_len=32, kv_block_size=4, kv_pool_tokens=1024)
    torch_engine = Engine.from_hf(hf, limits=limits)
    engine = torch_engine.submit(prompt, GREEDY, keep_logits=True).result()
    assert engine.token_ids == pair.token_ids
    want = _hf_logits(hf, prompt, engine.token_ids)
    assert (engine.logits - want).abs().max() < TOL and (pair.logits - want).abs().max() < TOL
    assert engine.stats["compression_ratio"] == pytest.approx(pair.stats["compression_ratio"])
    assert engine.stats["compression_ratio"] > 1.2  # decisions evicted tokens on every path
