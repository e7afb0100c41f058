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
from pipeline.runner import Options, run_pipeline  # noqa: E402
from pipeline.stages import load_stage  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.slow]


def _stand_in(name: str, depends: tuple[str, ...], run):
    return SimpleNamespace(NAME=name, DEPENDS=depends, VERSION=1, settings=lambda card, options: {}, run=run)


def _load(name: str):
    if name in ("prepare", "retrofit", "evaluate", "convert"):
        return _stand_in(name, (), lambda ctx: {})
    if name == "build":

        def build(ctx):
            make_engine_dir(ctx.out_dir / "engine", max_input_len=128, max_output_len=16)
            return {"backend": "torch", "engine_dir": "engine", "tokenizer_dir": "engine"}

        return _stand_in("build", ("convert",), build)
    return load_stage(name)  # package and perf: the real stages


def test_package_and_perf_stages_write_the_gated_report(tmp_path):
    card = load_card("tiny-qwen3")
    perf_spec = dataclasses.replace(
        card.perf, concurrency=(1, 2), input_tokens=24, output_tokens=8, measurement_ms=500,
        min_inferences_per_s=1e9,  # impossible: recorded because of --no-gate
    )  # fmt: skip
    card = dataclasses.replace(card, perf=perf_spec)
    logs: list[str] = []
    report = run_pipeline(card, tmp_path, options=Options(no_gate=True), log=logs.append, load=_load)
    perf = report["perf"]
    assert perf["gate"]["passed"] is False and perf["gate"]["bypassed"] is True
    assert any("perf gate missed: min_inferences_per_s" in line for line in logs)  # said, not raised
    checks = {c["name"]: c for c in perf["gate"]["checks"]}
    assert set(checks) == {"min_inferences_per_s", "max_p99_latency_ms", "min_dms_over_vanilla"}
    assert checks["min_inferences_per_s"]["limit"] == 1e9 and not checks["min_inferences_per_s"]["passed"]
    assert all({"name", "limit", "measured"} <= set(c) for c in checks.values())
    assert perf["dms_over_vanilla_throughput"] > 0
    assert {(r["method"], r["concurrency"]) for r in perf["rows"]} == {
        (m, c) for m in ("dms", "vanilla") for c in (1, 2)
    }
    assert all(r["inferences_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0 for r in perf["rows"])
    root = tmp_path / card.name
    assert (root / "model_repo" / "ensemble" / "config.pbtxt").is_file()  # the runner's link
    out = root / "perf"
    for name in ("summary.json", "perf.png", "dms_c2.csv", "vanilla_c1.csv", "input_data.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "summary.json").read_text())["rows"] == perf["rows"]
    assert report["package"]["models"] and report["package"]["backend"] == "torch"
