"""Request handling without a server: text codec, stop words, incremental detokenizing, engine adapter."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from serve_engine_fixture import make_engine_dir, make_tokenizer  # noqa: E402

from pipeline.serve.engine_adapter import (  # noqa: E402
    load_engine,
    parse_request,
    stop_match,
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


def test_stop_match_finds_the_first_complete_sequence():
    assert stop_match([5, 1, 2, 3, 1, 2], [[1, 2], [9]]) == 3
    assert stop_match([5, 1], [[1, 2]]) is None
    assert stop_match([9], [[1, 2], [9]]) == 1


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
