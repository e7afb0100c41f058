"""package -> perf through the real runner, server and perf_analyzer; the earlier stages are stand-ins
that only provide a build output (a tiny DMS engine), since training is other tests' business."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from serve_engine_fixture import make_engine_dir  # noqa: E402

from pipeline.card import load_card  # noqa: E402
from pipeline.runner import Options, StageFailed, run_pipeline  # noqa: E402
from pipeline.stages import load_stage  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.slow]


def _stand_in(name: str, depends: tuple[str, ...], run):
    return SimpleNamespace(NAME=name, DEPENDS=depends, VERSION=1, settings=lambda card, options: {}, run=run)


def _load(name: str):
    if name in ("prepare", "retrofit", "evaluate", "convert"):
        return _stand_in(name, (), lambda ctx: {})
    if name == "build":

        def build(ctx):
            make_engine_dir(ctx.out_dir / "engine", max_input_len=128, max_output_len=48)
            return {"backend": "torch", "engine_dir": "engine", "tokenizer_dir": "engine"}

        return _stand_in("build", ("convert",), build)
    return load_stage(name)  # package and perf: the real stages


def test_package_and_perf_stages_write_the_gated_report(tmp_path):
    card = load_card("tiny-qwen3")
    # The short equal-memory workload: the fixture engine takes 512 bytes per token in blocks of 4, so
    # 80,000 bytes hold 156 slots per KV stream: two vanilla requests of 24 + BOS + 40 tokens (17 blocks,
    # and one a step ahead).
    em = dataclasses.replace(
        card.perf.equal_memory, kv_memory_bytes=80_000, input_tokens=24, output_tokens=40, concurrency=(1, 4),
        min_dms_over_vanilla_tokens_per_s=0.01, max_dms_itl_ms_p99=1e6,
    )  # fmt: skip
    perf_spec = dataclasses.replace(
        card.perf, concurrency=(1, 2), input_tokens=24, output_tokens=8, measurement_ms=500,
        min_inferences_per_s=1e9,  # impossible: recorded because of --no-gate
        equal_memory=em,
    )  # fmt: skip
    card = dataclasses.replace(card, perf=perf_spec)
    logs: list[str] = []
    report = run_pipeline(card, tmp_path, options=Options(no_gate=True), log=logs.append, load=_load)
    perf = report["perf"]
    assert perf["gate"]["passed"] is False and perf["gate"]["bypassed"] is True
    assert any("perf gate missed: min_inferences_per_s" in line for line in logs)  # said, not raised
    checks = {c["name"]: c for c in perf["gate"]["checks"]}
    assert set(checks) == {
        "min_inferences_per_s", "max_p99_latency_ms",
        "equal_memory.min_dms_over_vanilla_tokens_per_s", "equal_memory.max_dms_itl_ms_p99",
    }  # fmt: skip
    assert checks["min_inferences_per_s"]["limit"] == 1e9 and not checks["min_inferences_per_s"]["passed"]
    assert all({"name", "limit", "measured"} <= set(c) for c in checks.values())
    assert perf["dms_over_vanilla_throughput"] > 0
    assert {(r["method"], r["concurrency"]) for r in perf["rows"]} == {
        (m, c) for m in ("dms", "vanilla") for c in (1, 2)
    }
    assert all(r["inferences_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0 for r in perf["rows"])

    section = perf["equal_memory"]
    assert section["passed"] is True  # its own gates passed; the latency check's did not
    assert section["kv_memory_bytes"] == 80_000 and section["vanilla_requests_fit"] == 2
    assert section["dms_over_vanilla_tokens_per_s"] > 0
    rows = {(r["method"], r["concurrency"]): r for r in section["rows"]}
    assert set(rows) == {(m, c) for m in ("dms", "vanilla") for c in (1, 4)}
    keys = {"output_tokens_per_s", "requests_per_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99",
            "running_max", "queued_max", "preemptions", "mean_cr"}  # fmt: skip
    for (method, conc), r in rows.items():
        assert keys <= set(r)
        assert r["requests"] == conc and r["output_tokens"] == conc * 40  # end id off: every token came
        assert r["output_tokens_per_s"] > 0 and 0 < r["ttft_ms_p50"] <= r["ttft_ms_p99"]
        assert 0 < r["itl_ms_p50"] <= r["itl_ms_p99"]
        assert r["pool_bytes"] == 156 * 512  # the same pool for both methods, from the budget
        assert r["running_max"] <= (2 if method == "vanilla" else conc)
    assert rows[("vanilla", 4)]["preemptions"] == 0 and rows[("vanilla", 4)]["mean_cr"] == 1.0
    assert rows[("dms", 4)]["final_cr"] > 1.0  # the fixture's DMS evicts about half

    root = tmp_path / card.name
    assert (root / "model_repo" / "ensemble" / "config.pbtxt").is_file()  # the runner's link
    out = root / "perf"
    for name in ("summary.json", "perf.png", "dms_c2.csv", "vanilla_c1.csv", "input_data.json",
                 section["plot"], "equal_memory/dms_c4.json", "equal_memory/input_data.json"):  # fmt: skip
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == perf["rows"] and summary["equal_memory"]["rows"] == section["rows"]
    assert report["package"]["models"] and report["package"]["backend"] == "torch"

    # An impossible equal-memory limit: the build stops at perf naming the gate and the numbers, judged on
    # the kept measurement (nothing measured again).
    strict = dataclasses.replace(em, min_dms_over_vanilla_tokens_per_s=1e9)
    perf_spec = dataclasses.replace(perf_spec, min_inferences_per_s=0.0, equal_memory=strict)
    card = dataclasses.replace(card, perf=perf_spec)
    logs.clear()
    with pytest.raises(StageFailed) as failed:
        run_pipeline(card, tmp_path, log=logs.append, load=_load)
    message = str(failed.value)
    gate = "equal_memory.min_dms_over_vanilla_tokens_per_s"
    assert f"stage 'perf' failed: perf gate missed: {gate}: measured" in message
    assert "at concurrency 4 (DMS " in message and "the card requires at least 1000000000.0" in message
    assert "[perf] up to date" in " ".join(logs)
    report = json.loads((root / "report.json").read_text())
    assert report["perf"]["equal_memory"]["passed"] is False
