"""Engine behaviour: bad input, pool exhaustion (queueing, preemption), streaming, threads, sampling,
stop tokens, engine directories."""

from __future__ import annotations

import threading

import pytest
import torch
from tiny_models import make_tiny_hf

from pipeline.runtime.engine import Engine
from pipeline.runtime.engine_dir import (
    EngineDirError,
    EngineLimits,
    read_engine_dir,
    write_engine_dir_from_hf,
)
from pipeline.runtime.sampling import SamplingParams

LIMITS = dict(max_batch_size=4, max_input_len=32, max_output_len=32, kv_block_size=4, kv_pool_tokens=1024)


@pytest.fixture(scope="module")
def dms_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return make_tiny_hf(tmp_path_factory.mktemp("dms") / "m", dms="borrowed", window=8, block=4)


def _prompts(n: int, length: int = 10) -> list[list[int]]:
    g = torch.Generator().manual_seed(n)
    return [torch.randint(0, 96, (length,), generator=g).tolist() for _ in range(n)]


def test_bad_requests_raise_clear_errors(dms_dir):
    engine = Engine.from_hf(dms_dir, limits=LIMITS)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.submit([])
    with pytest.raises(ValueError, match="max_input_len"):
        engine.submit(list(range(33)))
    with pytest.raises(ValueError, match="max_tokens"):
        engine.submit([1, 2], max_tokens=0)
    with pytest.raises(ValueError, match="max_output_len"):
        engine.submit([1, 2], max_tokens=33)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.submit([1, 500])
    with pytest.raises(ValueError, match="tokenizer"):
        engine.submit("text without a tokenizer")
    with pytest.raises(ValueError, match="top_p"):
        engine.submit([1], top_p=0.0)
    # the engine still works afterwards
    assert engine.generate([[1, 2, 3]], max_tokens=3)[0].finish_reason == "length"


def test_small_pool_queues_and_preempts_without_changing_results(dms_dir):
    prompts = _prompts(6, 12)
    big = Engine.from_hf(dms_dir, limits=LIMITS)
    expected = [c.token_ids for c in big.generate(prompts, max_tokens=30, ignore_eos=True)]
    # 2 layers x 2 heads: a prompt of 12 needs 12 blocks; 64 blocks cannot hold six sequences at once
    small = Engine.from_hf(dms_dir, limits={**LIMITS, "kv_pool_tokens": 64})
    handles = [small.submit(p, max_tokens=30, ignore_eos=True) for p in prompts]
    queued_max, steps = 0, 0
    while small.has_work():
        small.step()
        steps += 1
        queued_max = max(queued_max, small.pool_stats()["waiting"])
        if steps in (8, 20) and len(small.scheduler.running) > 1:  # an admission estimate proven wrong
            small.scheduler.preempt(max(small.scheduler.running, key=lambda s: s.request_id))
    outs = [h.result() for h in handles]
    assert [c.token_ids for c in outs] == expected
    assert all(c.finish_reason == "length" for c in outs)
    assert queued_max > 0, "the small pool should have queued requests"
    assert sum(c.stats["preemptions"] for c in outs) == 2
    assert small.pool_stats()["blocks_used"] == 0


def test_vanilla_is_admitted_as_far_as_it_fits_and_never_preempted(dms_dir):
    """Admission by what a sequence will hold: vanilla keeps every token, so only as many run as their
    whole requests fit; nothing is preempted, nothing lost, and the pool drains."""
    engine = Engine.from_hf(dms_dir, policy="none", limits={**LIMITS, "kv_pool_tokens": 64})
    prompts = _prompts(6, 12)
    handles = [engine.submit(p, max_tokens=20, ignore_eos=True) for p in prompts]
    running_max = 0
    while engine.has_work():
        engine.step()
        running_max = max(running_max, engine.pool_stats()["running"])
    outs = [h.result() for h in handles]
    assert all(c.finish_reason == "length" and len(c.token_ids) == 20 for c in outs)
    assert sum(c.stats["preemptions"] for c in outs) == 0
    # 4 streams x (32 tokens / 4 per block + 1 ahead) = 36 blocks a request: one fits in 64 at a time
    assert running_max == 1
    assert engine.pool_stats()["blocks_used"] == 0


def test_request_that_never_fits_fails_alone(dms_dir):
    engine = Engine.from_hf(dms_dir, limits={**LIMITS, "kv_pool_tokens": 8})  # 8 blocks in all
    ok, too_big = engine.submit([1, 2], max_tokens=4), engine.submit(list(range(30)), max_tokens=4)
    assert too_big.result().finish_reason == "error" and "kv_pool_tokens" in too_big.result().error
    assert ok.result().finish_reason == "length" and len(ok.result().token_ids) == 4
    assert engine.pool_stats()["blocks_used"] == 0


def test_streaming_stop_tokens_and_seeded_sampling(dms_dir):
    engine = Engine.from_hf(dms_dir, limits=LIMITS)
    prompt = _prompts(1)[0]
    greedy = engine.generate(prompt, max_tokens=12)[0].token_ids
    events = list(engine.stream(prompt, max_tokens=12))
    assert [ev.token_id for ev in events] == greedy
    final = engine.generate(prompt, max_tokens=12)[0].stats
    # each event carries the request's KV figures after its token; the last one is the final state
    assert events[-1].live_kv_tokens == final["live_kv_tokens"]
    assert events[-1].compression_ratio == pytest.approx(final["compression_ratio"])
    assert all(a.live_kv_tokens <= b.live_kv_tokens for a, b in zip(events, events[1:], strict=False))
    stop = greedy[5]
    cut = engine.generate(prompt, max_tokens=12, stop_token_ids=(stop,))[0]
    assert cut.finish_reason == "stop" and cut.token_ids == greedy[: greedy.index(stop) + 1]
    params = SamplingParams(max_tokens=12, temperature=1.5, top_k=20, top_p=0.9, seed=7)
    a = engine.generate([prompt, prompt], params)
    b = engine.generate(prompt, params)[0]
    assert a[0].token_ids == a[1].token_ids == b.token_ids  # same seed, same tokens, batched or not
    c = engine.generate(prompt, SamplingParams(max_tokens=12, temperature=1.5, seed=8))[0]
    assert c.token_ids != a[0].token_ids


def test_background_loop_serves_threads_and_cancel(dms_dir):
    engine = Engine.from_hf(dms_dir, limits=LIMITS)
    prompts = _prompts(6)
    expected = [c.token_ids for c in engine.generate(prompts, max_tokens=10, ignore_eos=True)]
    engine.start()
    try:
        results: dict[int, list[int]] = {}

        def client(i: int) -> None:
            handle = engine.submit(prompts[i], max_tokens=10, ignore_eos=True)
            results[i] = [ev.token_id for ev in handle]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [results[i] for i in range(6)] == expected
        handle = engine.submit(prompts[0], max_tokens=32, ignore_eos=True)
        handle.cancel()
        out = handle.result(timeout=60)
        assert out.finish_reason in ("cancelled", "length")
    finally:
        engine.stop()
    assert engine.pool_stats()["blocks_used"] == 0


def test_one_outbox_carries_every_requests_tokens_then_its_end(dms_dir):
    from dms_core.serving import Completion, Outbox, TokenEvent

    engine = Engine.from_hf(dms_dir, limits=LIMITS)
    prompts = _prompts(6)
    expected = [c.token_ids for c in engine.generate(prompts, max_tokens=10, ignore_eos=True)]
    outbox = Outbox()
    engine.start()
    try:
        handles = [engine.submit(p, max_tokens=10, ignore_eos=True, outbox=outbox) for p in prompts]
        tokens: dict[int, list[int]] = {h.request_id: [] for h in handles}
        ended: dict[int, Completion] = {}
        while len(ended) < len(handles):  # one reader for all of them, as the Triton model's dispatcher
            handle, item = outbox.get(timeout=60)
            assert handle.request_id not in ended  # nothing comes after a request's end
            if isinstance(item, TokenEvent):
                tokens[handle.request_id].append(item.token_id)
            else:
                ended[handle.request_id] = item
        assert [tokens[h.request_id] for h in handles] == expected
        assert [ended[h.request_id].token_ids for h in handles] == expected
        with pytest.raises(TypeError, match="outbox"):
            next(iter(handles[0]))
    finally:
        engine.stop()
    assert engine.pool_stats()["blocks_used"] == 0


def test_engine_dir_roundtrip_and_missing_files(dms_dir, tmp_path):
    limits = EngineLimits(**LIMITS)
    out = write_engine_dir_from_hf(tmp_path / "engine", dms_dir, limits)
    config, _, read_limits, dtype = read_engine_dir(out)
    assert read_limits == limits and dtype == "float32" and config["dms_window_size"] == 8
    a = Engine.from_dir(out).generate(_prompts(1)[0], max_tokens=8)[0]
    b = Engine.from_hf(dms_dir, limits=limits).generate(_prompts(1)[0], max_tokens=8)[0]
    assert a.token_ids == b.token_ids and a.stats["compression_ratio"] == b.stats["compression_ratio"]
    (out / "model.safetensors").unlink()
    with pytest.raises(EngineDirError, match="model.safetensors is missing"):
        Engine.from_dir(out)
    with pytest.raises(EngineDirError, match="does not exist"):
        Engine.from_dir(tmp_path / "nowhere")
    with pytest.raises(EngineDirError, match="config.json"):
        Engine.from_hf(tmp_path)
    with pytest.raises(ValueError, match="smaller than"):
        Engine.from_hf(dms_dir, limits={**LIMITS, "kv_block_size": 8})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_engine_with_triton_kernel_matches_cpu(dms_dir):
    """On CUDA the decode attention is the Triton kernel; greedy tokens match the CPU reference path."""
    prompts = _prompts(4, 12)
    cpu = Engine.from_hf(dms_dir, limits=LIMITS, device="cpu").generate(prompts, max_tokens=24)
    gpu_engine = Engine.from_hf(dms_dir, limits=LIMITS, device="cuda")
    gpu = gpu_engine.generate(prompts, max_tokens=24)
    assert [c.token_ids for c in gpu] == [c.token_ids for c in cpu]
    assert gpu_engine.pool_stats()["blocks_used"] == 0


def test_emitting_a_token_costs_the_same_at_token_10_and_4000():
    """Incremental detokenisation: each push decodes a few tokens, never the whole output (which made
    a long reasoning trace quadratic), and the pieces add up to the full text."""
    from pathlib import Path

    from pipeline.runtime.detokenize import IncrementalDecoder
    from pipeline.serve.text import load_tokenizer

    tok = load_tokenizer(Path(__file__).resolve().parents[1] / "pipeline" / "assets" / "tiny-qwen3")
    ids = tok.encode(" ".join(f"k{i % 40} {i % 97} ." for i in range(1400)), add_special_tokens=False)[:4000]
    assert len(ids) == 4000
    decoded_lengths: list[int] = []

    def decode(chunk: list[int]) -> str:
        decoded_lengths.append(len(chunk))
        return tok.decode(chunk, skip_special_tokens=True)

    stream = IncrementalDecoder(decode)
    pieces, work = [], []
    for token in ids:
        decoded_lengths.clear()
        pieces.append(stream.push([token]))
        work.append(sum(decoded_lengths))
    pieces.append(stream.flush())
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert max(work[3990:]) <= max(work[5:15]) <= 8  # tokens decoded per push: flat, and small


def test_dms_runs_more_sequences_than_vanilla_in_the_same_pool(tmp_path):
    """The memory DMS frees is used: with one pool, DMS (decisions forced to CR 4) is admitted by what
    its streams keep and runs several sequences where vanilla runs one; every request completes and
    a wrong estimate is corrected by preemption, never by a failure."""
    from pipeline.runtime.policies import DMSPolicy

    path = make_tiny_hf(tmp_path / "plain")
    limits = {**LIMITS, "max_output_len": 64, "kv_pool_tokens": 112}
    prompts = _prompts(6, 12)
    running = {}
    for name, policy in (("vanilla", "none"), ("dms", DMSPolicy(window=8, force_cr=4))):
        engine = Engine.from_hf(path, policy=policy, limits=limits)
        handles = [engine.submit(p, max_tokens=60, ignore_eos=True) for p in prompts]
        running[name] = 0
        while engine.has_work():
            engine.step()
            running[name] = max(running[name], engine.pool_stats()["running"])
        outs = [h.result() for h in handles]
        assert all(c.finish_reason == "length" and len(c.token_ids) == 60 for c in outs), name
        assert engine.pool_stats()["blocks_used"] == 0
    assert running["dms"] >= 2 * running["vanilla"], running
