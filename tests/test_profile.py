"""The parser of perf_analyzer's streaming profile export, on a real export: perf_analyzer 2.51 sent 3
streaming requests (6 tokens each, end_id -1), 2 at a time, to the `ensemble` of a tiny random DMS
engine served by Triton (tests/serve_engine_fixture.py), with --request-count 3 --profile-export-file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.serve.profile import ProfileError, figures, read_export

EXPORT = Path(__file__).parent / "fixtures" / "perf_analyzer_2.51_streaming_export.json"


def test_every_request_has_its_tokens_not_the_final_empty_response():
    timings = read_export(EXPORT)
    assert list(timings) == [2]  # concurrency -> requests
    raw = json.loads(EXPORT.read_text())["experiments"][0]["requests"]
    assert len(timings[2]) == len(raw) == 3
    for t, r in zip(timings[2], raw, strict=True):
        assert len(r["response_timestamps"]) == 7  # 6 tokens, then the engine model's final response
        assert len(t.token_ns) == r["request_inputs"]["max_tokens"] == 6
        assert t.end_ns == r["response_timestamps"][-1] and t.sent_ns == r["timestamp"]
        assert t.final_compression_ratio == pytest.approx(r["response_outputs"][-1]["kv_compression_ratio"])


def test_figures_from_the_timestamps():
    timings = read_export(EXPORT)[2]
    f = figures(timings)
    raw = json.loads(EXPORT.read_text())["experiments"][0]["requests"]
    span_s = (max(r["response_timestamps"][-1] for r in raw) - min(r["timestamp"] for r in raw)) / 1e9
    assert f.requests == 3 and f.output_tokens == 18
    assert f.output_tokens_per_s == pytest.approx(18 / span_s, rel=1e-3)
    assert f.requests_per_s == pytest.approx(3 / span_s, rel=1e-3)
    ttft = [(r["response_timestamps"][0] - r["timestamp"]) / 1e6 for r in raw]
    assert f.ttft_ms_p50 == pytest.approx(np.percentile(ttft, 50))
    gaps = np.concatenate([np.diff(r["response_timestamps"][:6]) / 1e6 for r in raw])  # tokens only
    assert len(gaps) == 15
    assert f.itl_ms_p99 == pytest.approx(np.percentile(gaps, 99)) and f.itl_ms_p50 <= f.itl_ms_p99
    assert 0 < f.ttft_ms_p50 <= f.ttft_ms_p99
    assert f.final_cr > 1.0  # the DMS engine evicted


def test_a_last_response_that_carries_text_is_a_token(tmp_path):
    """The TensorRT-LLM backend puts the last token in the final response."""
    data = json.loads(EXPORT.read_text())
    for r in data["experiments"][0]["requests"]:
        r["response_timestamps"].pop()
        r["response_outputs"].pop()
    path = tmp_path / "trtllm.json"
    path.write_text(json.dumps(data))
    assert [len(t.token_ns) for t in read_export(path)[2]] == [6, 6, 6]


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "not a perf_analyzer profile export"),
        ('{"version": "2.51.0"}', "not a perf_analyzer profile export"),
        ('{"experiments": [{"experiment": {"mode": "request_rate", "value": 2}, "requests": []}]}',
         "expected a concurrency sweep"),
    ],
)
def test_other_files_are_refused(tmp_path, content, message):
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(ProfileError, match=message):
        read_export(path)


def test_no_tokens_is_an_error():
    with pytest.raises(ProfileError, match="no request .* received a token"):
        figures([])


def test_a_response_of_several_tokens_spreads_its_gap_over_them(tmp_path):
    """stream_interval > 1: each response says how many tokens it carries (num_output_tokens)."""
    ms = 1_000_000
    request = {
        "timestamp": 0,
        "request_inputs": {},
        "response_timestamps": [5 * ms, 35 * ms, 55 * ms, 56 * ms],
        "response_outputs": [{"text_output": "a", "num_output_tokens": [1]},
                             {"text_output": "bcd", "num_output_tokens": [3]},
                             {"text_output": "ef", "num_output_tokens": [2]},
                             {"text_output": "", "num_output_tokens": [0], "kv_compression_ratio": 2.0}],
    }  # fmt: skip
    path = tmp_path / "export.json"
    path.write_text(json.dumps({"experiments": [{"experiment": {"mode": "concurrency", "value": 1},
                                                 "requests": [request]}]}))  # fmt: skip
    (timing,) = read_export(path)[1]
    assert len(timing.token_ns) == 6 and timing.final_compression_ratio == 2.0
    f = figures([timing])
    assert f.output_tokens == 6 and f.ttft_ms_p50 == pytest.approx(5.0)
    # gaps 30 ms over 3 tokens and 20 ms over 2: ITLs 10, 10, 10, 10, 10
    assert f.itl_ms_p50 == pytest.approx(10.0) and f.itl_ms_p99 == pytest.approx(10.0)
