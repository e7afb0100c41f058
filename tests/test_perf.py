"""perf_analyzer CSV parsing, gates, plot, workload prompts (no server; the served run is in test_serve)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from serve_engine_fixture import make_tokenizer  # noqa: E402

from pipeline.serve import equal_memory, perf  # noqa: E402

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
    gates = perf.verdict(perf.check_gates(rows(), min_inferences_per_s=30, max_p99_latency_ms=1000))
    assert gates["passed"] and perf.dms_over_vanilla(rows()) == pytest.approx(2.0)
    by_name = {c["name"]: c for c in gates["checks"]}
    assert set(by_name) == {"min_inferences_per_s", "max_p99_latency_ms"}  # DMS/vanilla: equal memory
    assert (
        by_name["min_inferences_per_s"]["measured"] == 40.0 and by_name["min_inferences_per_s"]["limit"] == 30
    )
    assert by_name["max_p99_latency_ms"]["measured"] == 900.0  # the worst DMS p99 over all concurrencies


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(min_inferences_per_s=50, max_p99_latency_ms=1000), "min_inferences_per_s"),
        (dict(min_inferences_per_s=1, max_p99_latency_ms=500), "max_p99_latency_ms"),
    ],
)
def test_missed_gate_names_gate_and_numbers(kwargs, name):
    gates = perf.verdict(perf.check_gates(rows(), **kwargs))
    assert not gates["passed"]
    failed = [c for c in gates["checks"] if not c["passed"]]
    assert [c["name"] for c in failed] == [name]
    message = gates["message"]
    assert name in message and str(failed[0]["measured"]) in message and str(failed[0]["limit"]) in message


def test_without_vanilla_there_is_no_ratio():
    assert perf.dms_over_vanilla([r for r in rows() if r.method == "dms"]) is None


def em_section(dms64: float = 2000.0, van64: float = 400.0, itl99: float = 80.0) -> dict:
    def row(method, c, tps, itl):
        return dict(
            method=method, concurrency=c, output_tokens_per_s=tps, requests_per_s=tps / 1024,
            ttft_ms_p50=50.0, ttft_ms_p99=90.0, itl_ms_p50=itl / 2, itl_ms_p99=itl, running_max=min(c, 8),
            queued_max=max(0, c - 8), pool_occupancy_max=0.9, preemptions=0,
            mean_cr=8.0 if method == "dms" else 1.0,
            final_cr=9.0 if method == "dms" else 1.0, pool_bytes=1 << 20, cpu_ms_per_token={"triton": 0.1},
            requests=c, output_tokens=c * 1024,
            seconds=c * 1024 / tps,
        )  # fmt: skip

    rows_ = [row("dms", 8, 500.0, 30.0), row("vanilla", 8, 480.0, 25.0),
             row("dms", 64, dms64, itl99), row("vanilla", 64, van64, 20.0)]  # fmt: skip
    return {"rows": rows_, "vanilla_requests_fit": 8}


def test_equal_memory_gates_at_the_highest_concurrency():
    checks = {c["name"]: c for c in equal_memory.check_gates(em_section(), 4.0, 100.0)}
    ratio = checks["equal_memory.min_dms_over_vanilla_tokens_per_s"]
    assert ratio["passed"] and ratio["measured"] == 5.0 and ratio["at_concurrency"] == 64
    itl = checks["equal_memory.max_dms_itl_ms_p99"]
    assert itl["passed"] and itl["measured"] == 80.0 and itl["at_concurrency"] == 64  # the worst DMS p99


def test_an_impossible_equal_memory_limit_fails_with_the_numbers():
    gates = perf.verdict(equal_memory.check_gates(em_section(), 1e9, 100.0))
    assert not gates["passed"]
    assert gates["message"] == (
        "perf gate missed: equal_memory.min_dms_over_vanilla_tokens_per_s: measured 5.0 at concurrency 64 "
        "(DMS 2000.0 vs vanilla 400.0 output tokens/s), the card requires at least 1000000000.0 "
        "(card section `perf`; --no-gate records instead of failing)"
    )
    gates = perf.verdict(equal_memory.check_gates(em_section(itl99=300.0), 4.0, 100.0))
    expected = "max_dms_itl_ms_p99: measured 300.0 at concurrency 64, the card requires at most 100.0"
    assert expected in gates["message"]


def test_equal_memory_plot_writes_a_png(tmp_path):
    equal_memory.plot(em_section(), tmp_path / "em.png", title="t")
    assert (tmp_path / "em.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
