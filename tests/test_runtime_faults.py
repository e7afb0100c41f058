"""Hostile input and faults at the engine: sampling values checked where they enter, one failing sequence
ends alone (its blocks freed, the batch goes on), and weights with NaN or inf are refused at load."""

from __future__ import annotations

import dataclasses
import math

import pytest
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_hf

from pipeline.runtime.engine import Engine
from pipeline.runtime.engine_dir import EngineDirError
from pipeline.runtime.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

LIMITS = dict(max_batch_size=8, max_input_len=32, max_output_len=32, kv_block_size=4, kv_pool_tokens=1024)


@pytest.fixture(scope="module")
def dms_dir(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("faults") / "m", dms="borrowed", window=8, block=4)


BAD_PARAMS = [
    (dict(temperature=math.nan), "temperature must be a finite number"),
    (dict(temperature=math.inf), "temperature must be a finite number"),
    (dict(temperature=-0.5), "temperature must be a finite number"),
    (dict(temperature=2e-38), "temperature 2e-38 is too small"),
    (dict(top_p=math.nan), "top_p must be in (0, 1]"),
    (dict(top_p=1.5), "top_p must be in (0, 1]"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(top_k=2.5), "top_k must be an integer >= 0"),
    (dict(seed=-1), "seed must be an integer between 0 and"),
    (dict(seed=2**64), "seed must be an integer between 0 and"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
    (dict(max_tokens=math.nan), "max_tokens must be an integer >= 1"),
    (dict(stop_token_ids=(-3,)), "stop_token_ids must be an integer >= 0"),
]


@pytest.mark.parametrize("kw, message", BAD_PARAMS, ids=[str(b[0]) for b in BAD_PARAMS])
def test_sampling_values_are_checked_where_they_enter(dms_dir, kw, message):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kw).validate()
    assert message in str(err.value)
    engine = Engine.from_hf(dms_dir, limits=LIMITS)
    with pytest.raises(ValueError, match="must be|too small"):
        engine.submit([1, 2, 3], SamplingParams(max_tokens=4), **kw)
    assert engine.pool_stats()["blocks_used"] == 0 and not engine.has_work()


def test_edge_values_that_sample_fine_are_accepted():
    SamplingParams(max_tokens=1, temperature=1e-3, top_k=0, top_p=1e-30, seed=2**64 - 1).validate()
    SamplingParams(temperature=1e30, top_k=10**9).validate()


def _poison_sampling(handle) -> None:
    """Sampling values that slipped past validation and make the sampler raise."""
    seq = handle.request
    seq.params = dataclasses.replace(seq.params, temperature=1.0, top_k="poison")


def _poison_postprocess(handle) -> None:
    """A sequence whose postprocessing raises (forced tokens run out: IndexError, the error reported
    against the served engine)."""
    handle.request.forced_ids = []


POISONS = [(_poison_sampling, "sampling"), (_poison_postprocess, "IndexError")]


@pytest.mark.parametrize("poison, said", POISONS, ids=["sampling", "postprocess"])
def test_a_poisoned_sequence_fails_alone_and_the_batch_finishes_right(dms_dir, poison, said):
    prompts = [[(7 * i + j) % 90 + 1 for j in range(12)] for i in range(4)]
    engine = Engine.from_hf(dms_dir, limits=LIMITS)
    expected = [engine.generate(p, max_tokens=24, ignore_eos=True)[0].token_ids for p in prompts]
    good = [engine.submit(p, max_tokens=24, ignore_eos=True) for p in prompts[:2]]
    bad = engine.submit(prompts[0], max_tokens=24, ignore_eos=True)
    good += [engine.submit(p, max_tokens=24, ignore_eos=True) for p in prompts[2:]]
    for _ in range(3):  # all five prefilled and decoding together before the poison lands
        engine.step()
    assert engine.pool_stats()["running"] == 5
    poison(bad)
    failed = bad.result()
    assert failed.finish_reason == "error" and said in failed.error
    assert [h.result().token_ids for h in good] == expected
    assert all(h.result().finish_reason == "length" for h in good)
    assert engine.pool_stats()["blocks_used"] == 0


@pytest.mark.parametrize("poison", [p[0] for p in POISONS], ids=["sampling", "postprocess"])
def test_a_poisoned_sequence_in_the_background_loop_leaves_the_loop_serving(dms_dir, poison):
    engine = Engine.from_hf(dms_dir, limits=LIMITS)
    prompt = list(range(1, 13))
    expected = engine.generate(prompt, max_tokens=16, ignore_eos=True)[0].token_ids
    bad = engine.submit(prompt, max_tokens=16, ignore_eos=True)
    poison(bad)  # poisoned before its first token: it fails at its prefill
    engine.start()
    try:
        assert bad.result(timeout=60).finish_reason == "error"
        after = engine.submit(prompt, max_tokens=16, ignore_eos=True)
        assert after.result(timeout=60).token_ids == expected
    finally:
        engine.stop()
    assert engine.pool_stats()["blocks_used"] == 0


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_weights_with_non_finite_values_are_refused_at_load(dms_dir, tmp_path, value):
    import shutil

    corrupt = tmp_path / "m"
    shutil.copytree(dms_dir, corrupt)
    weights = corrupt / "model.safetensors"
    state = load_file(str(weights))
    name = next(k for k in state if k.endswith("mlp.down_proj.weight"))
    flat = state[name].view(-1)
    flat[:1024] = value  # the corruption tried on the served engine: 1,024 weights set to NaN
    save_file(state, str(weights))
    with pytest.raises(EngineDirError) as err:
        Engine.from_hf(corrupt, limits=LIMITS)
    message = str(err.value)
    assert "1024 non-finite values" in message and name in message and "rebuild" in message
    assert Engine.from_hf(dms_dir, limits=LIMITS).generate([1, 2, 3], max_tokens=2)[0].token_ids
