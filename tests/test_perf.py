"""perf_analyzer CSV parsing, gates, plot, workload prompts (no server; the served run is in test_serve)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from serve_engine_fixture import make_tokenizer  # noqa: E402

from pipeline.serve import perf  # noqa: E402

# The header perf_analyzer 2.51 writes with -f (latencies in microseconds)
CSV = """Concurrency,Inferences/Second,Response Throughput,Client Send,Network+Server Send/Recv,Server Queue,\
Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,\
p95 latency,p99 latency
1,18.4227,18.4227,0,51092,2,123,1934,550,0,53048,56009,56775,60541
4,37.1871,37.1871,0,51066,3,117,2140,425,0,83292,95869,96788,107480
"""


def rows(dms4: float = 40.0, van4: float = 20.0, p99: float = 900.0) -> list[perf.PerfRow]:
    return [
        perf.PerfRow("dms", 1, 10.0, 100.0, 150.0, 200.0),
        perf.PerfRow("vanilla", 1, 9.0, 110.0, 160.0, 210.0),
        perf.PerfRow("dms", 4, dms4, 300.0, 500.0, p99),
        perf.PerfRow("vanilla", 4, van4, 400.0, 600.0, 1000.0),
    ]


def test_parse_csv_converts_microseconds(tmp_path):
    path = tmp_path / "dms_c1.csv"
    path.write_text(CSV)
    got = perf.parse_csv(path, "dms")
    assert [r.concurrency for r in got] == [1, 4]
    assert got[0].inferences_per_s == pytest.approx(18.4227)
    assert got[1].p50_ms == pytest.approx(83.292) and got[1].p99_ms == pytest.approx(107.48)


def test_parse_csv_rejects_other_files(tmp_path):
    (tmp_path / "a.csv").write_text("Concurrency,Throughput\n1,2\n")
    with pytest.raises(perf.PerfError, match="unexpected perf_analyzer CSV"):
        perf.parse_csv(tmp_path / "a.csv", "dms")
    (tmp_path / "b.csv").write_text(CSV.splitlines()[0] + "\n")
    with pytest.raises(perf.PerfError, match="no measurement rows"):
        perf.parse_csv(tmp_path / "b.csv", "dms")


def test_gates_at_the_highest_concurrency():
    gates = perf.check_gates(
        rows(), min_inferences_per_s=30, max_p99_latency_ms=1000, min_dms_over_vanilla=1.5
    )
    assert gates["passed"] and perf.dms_over_vanilla(rows()) == pytest.approx(2.0)
    by_name = {c["name"]: c for c in gates["checks"]}
    assert (
        by_name["min_inferences_per_s"]["measured"] == 40.0 and by_name["min_inferences_per_s"]["limit"] == 30
    )
    assert by_name["max_p99_latency_ms"]["measured"] == 900.0  # the worst DMS p99 over all concurrencies
    assert by_name["min_dms_over_vanilla"]["at_concurrency"] == 4


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (
            dict(min_inferences_per_s=50, max_p99_latency_ms=1000, min_dms_over_vanilla=1.0),
            "min_inferences_per_s",
        ),
        (
            dict(min_inferences_per_s=1, max_p99_latency_ms=500, min_dms_over_vanilla=1.0),
            "max_p99_latency_ms",
        ),
        (
            dict(min_inferences_per_s=1, max_p99_latency_ms=1000, min_dms_over_vanilla=2.5),
            "min_dms_over_vanilla",
        ),
    ],
)
def test_missed_gate_names_gate_and_numbers(kwargs, name):
    gates = perf.check_gates(rows(), **kwargs)
    assert not gates["passed"]
    failed = [c for c in gates["checks"] if not c["passed"]]
    assert [c["name"] for c in failed] == [name]
    message = gates["message"]
    assert name in message and str(failed[0]["measured"]) in message and str(failed[0]["limit"]) in message


def test_gates_without_vanilla_skip_the_ratio():
    dms_only = [r for r in rows() if r.method == "dms"]
    gates = perf.check_gates(dms_only, 1, 1000, 9.0)
    assert gates["passed"] and perf.dms_over_vanilla(dms_only) is None


def test_prompts_have_the_requested_token_count(tmp_path):
    from pipeline.serve.text import load_tokenizer

    tok = load_tokenizer(make_tokenizer(tmp_path / "tok"))
    for n in (1, 17, 128):
        text = perf.prompt_of_tokens(tok, n, random.Random(n))
        assert len(tok.encode(text, add_special_tokens=False)) == n
    data = perf.input_data(tok, 32, 7, num_prompts=3)
    assert len(data["data"]) == 3 and data["data"][0]["max_tokens"] == {"content": [7], "shape": [1]}
    assert data["data"][0]["end_id"] == {"content": [-1], "shape": [1]}  # exactly output_tokens each


def test_prompts_use_words_the_embedded_tokenizer_knows():
    from pipeline.serve.text import load_tokenizer

    tok = load_tokenizer(Path(perf.__file__).parents[1] / "assets" / "tiny-qwen3")
    ids = tok.encode(perf.prompt_of_tokens(tok, 64, random.Random(0)), add_special_tokens=False)
    assert len(ids) == 64 and tok.unk_token_id not in ids


def test_plot_writes_a_png(tmp_path):
    perf.plot(rows(), tmp_path / "perf.png", title="t")
    assert (tmp_path / "perf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_perf_analyzer_binary_is_installed():
    assert perf.perf_analyzer_binary().is_file()
