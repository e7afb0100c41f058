"""Request handling without a server: text codec, stop words, incremental detokenizing, engine adapter."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from serve_engine_fixture import make_engine_dir, make_tokenizer  # noqa: E402

from pipeline.serve.engine_adapter import (  # noqa: E402
    ends_with_stop,
    load_engine,
    parse_request,
)
from pipeline.serve.text import RequestError, TextCodec, as_text, incremental_decoder, split_stop_words  # noqa: E402


@pytest.fixture(scope="module")
def codec(tmp_path_factory):
    return TextCodec.from_dir(
        make_tokenizer(tmp_path_factory.mktemp("tok")), max_input_len=20, max_output_len=8
    )


def test_encode_limits_and_errors(codec):
    assert codec.encode(b"hello world").dtype == np.int32
    with pytest.raises(RequestError, match="empty"):
        codec.encode(b"   ")
    with pytest.raises(RequestError, match="not valid UTF-8"):
        codec.encode(b"\xff\xfe")
    with pytest.raises(RequestError, match="at most 20"):
        codec.encode("hello world " * 20)
    with pytest.raises(RequestError, match="must be a string"):
        as_text(3)


def test_stop_words_layout_round_trips(codec):
    ids = codec.stop_words_ids([b"fox", "lazy dog", ""])
    assert ids.shape[0] == 2 and ids.dtype == np.int32
    words = split_stop_words(ids)
    assert [codec.decode(w) for w in words] == ["fox", "lazy dog"]
    assert split_stop_words(codec.stop_words_ids([])) == []


def test_a_stop_sequence_is_found_at_the_tail():
    generated, found = [5, 1, 2, 3, 1, 2], []
    for end in range(1, len(generated) + 1):  # asked after every token, as the engine model does
        found.append(ends_with_stop(generated[:end], [[1, 2], [9]]))
    assert found.index(True) == 2  # the first complete stop ends at the third token
    assert not ends_with_stop([5, 1], [[1, 2]]) and not ends_with_stop([2], [[1, 2]])
    assert ends_with_stop([9], [[1, 2], [9]])


def test_incremental_decoder_never_splits_a_character(codec):
    ids = codec.tokenizer.encode("héllo wörld ✓ done", add_special_tokens=False)
    decoder, pieces = incremental_decoder(codec), []
    for token in ids:
        pieces.append(decoder.push([token]))
    pieces.append(decoder.flush())
    assert "".join(pieces) == "héllo wörld ✓ done"
    assert all("\ufffd" not in p for p in pieces)


def test_parse_request_maps_trtllm_tensors():
    req = parse_request({
        "input_ids": np.array([[5, 6, 7, 0]], np.int32), "input_lengths": np.array([[3]], np.int32),
        "request_output_len": np.array([[4]], np.int32), "end_id": np.array([[0]], np.int32),
        "stop_words_list": np.array([[[8, 9, 3], [2, 3, -1]]], np.int32),
        "temperature": np.array([[0.5]], np.float32), "random_seed": np.array([[11]], np.uint64),
        "streaming": np.array([[True]]), "runtime_top_k": None,
    })  # fmt: skip
    assert req.input_ids == [5, 6, 7] and req.max_tokens == 4 and req.streaming and req.seed == 11
    assert req.stop_sequences == ((8, 9), (3,))
    params = req.sampling()
    assert params.stop_token_ids == (3, 0) and params.temperature == pytest.approx(0.5) and params.top_k == 0
    assert not params.ignore_eos
    no_end = parse_request({"input_ids": np.ones((1, 2), np.int32), "request_output_len": np.array([[3]]),
                            "end_id": np.array([[-1]], np.int32)}).sampling()  # fmt: skip
    assert no_end.ignore_eos and no_end.stop_token_ids == ()
    with pytest.raises(RequestError, match="batch size 1"):
        parse_request({"input_ids": np.zeros((2, 3), np.int32), "request_output_len": np.ones((2, 1))})


def test_load_engine_reads_parameters(tmp_path):
    make_engine_dir(tmp_path / "engine")
    params = {"gpt_model_path": "engine", "eviction_policy": "none", "max_tokens_in_paged_kv_cache": "512"}
    engine = load_engine(params, tmp_path)
    assert engine.policy.name == "none" and engine.limits.kv_pool_tokens == 512 and engine.tokenizer is None
    with pytest.raises(ValueError, match="guaranteed_no_evict"):
        load_engine({**params, "batch_scheduler_policy": "guaranteed_no_evict"}, tmp_path)


def _engine_tensors(**over):
    tensors = {"input_ids": np.array([[5, 6, 7, 8, 9, 10]], np.int32),
               "input_lengths": np.array([[6]], np.int32), "request_output_len": np.array([[4]], np.int32)}
    return {**tensors, **{k: np.array([[v]], dtype) for k, (v, dtype) in over.items()}}


INCONSISTENT = [
    (dict(input_lengths=(-3, np.int32)), "input_lengths is -3; it must be between 1 and 6"),
    (dict(input_lengths=(1000, np.int32)), "input_lengths is 1000; it must be between 1 and 6"),
    (dict(input_lengths=(0, np.int32)), "input_lengths is 0"),
    (dict(request_output_len=(0, np.int32)), "request_output_len (max_tokens) must be an integer >= 1"),
    (dict(temperature=(np.nan, np.float32)), "temperature must be a finite number"),
    (dict(temperature=(np.inf, np.float32)), "temperature must be a finite number"),
    (dict(temperature=(2e-38, np.float32)), "is too small to sample with"),
    (dict(runtime_top_p=(np.nan, np.float32)), "runtime_top_p (top_p) must be in (0, 1]"),
    (dict(runtime_top_k=(-2, np.int32)), "runtime_top_k (top_k) must be an integer >= 0"),
]


@pytest.mark.parametrize("over, message", INCONSISTENT, ids=[str(o[0]) for o in INCONSISTENT])
def test_parse_request_refuses_inconsistent_and_non_finite_inputs(over, message):
    with pytest.raises(RequestError) as err:
        parse_request(_engine_tensors(**over))
    assert message in str(err.value)


def test_parse_request_refuses_a_malformed_stop_words_list():
    with pytest.raises(RequestError, match=r"stop_words_list has shape \(1, 3\)"):
        parse_request({**_engine_tensors(), "stop_words_list": np.array([[1, 2, 3]], np.int32)})


def test_prompt_size_is_checked_before_tokenizing(codec):
    """A 20 MiB prompt once grew the preprocessing stub to 3.8 GiB and held a good request 22 s behind
    it: the byte bound refuses it before the tokenizer sees it."""
    import time

    calls = []
    real_encode = codec.tokenizer.encode
    codec.tokenizer.encode = lambda *a, **k: calls.append(1) or real_encode(*a, **k)
    try:
        start = time.monotonic()
        with pytest.raises(RequestError) as err:
            codec.encode(b"fox " * (5 << 20))
        assert time.monotonic() - start < 1.0 and not calls
        message = str(err.value)
        assert "text_input is 20971520 bytes" in message and "max_input_len of 20 tokens" in message
        with pytest.raises(RequestError, match="stop_words is"):
            codec.stop_words_ids([b"x" * (codec.max_prompt_bytes + 1)])
        # the bound never refuses what fits: the longest entry repeated max_input_len times
        longest = max(codec.tokenizer.get_vocab(), key=lambda t: len(t.encode()))
        text = codec.tokenizer.convert_tokens_to_string([longest] * 20)
        codec.check_size(text)
    finally:
        codec.tokenizer.encode = real_encode
