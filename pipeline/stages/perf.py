"""perf: serve the packaged repository and gate it with perf_analyzer.

The DMS ensemble and the same engine with eviction off (`ensemble_vanilla`) are measured in the same
run, at every concurrency of the card, with prompts of the card's length. Writes CSVs, summary.json and
perf.png. The gates (`gate`, judged by the runner on the kept measurement) fail the build naming the
missed limit and the numbers, unless --no-gate (then recorded).
"""

from __future__ import annotations

from typing import Any

from pipeline.card import Card, card_section
from pipeline.stages.api import Options, StageContext

NAME = "perf"
DEPENDS: tuple[str, ...] = ("package",)
VERSION = 1


# The limits: judged by `gate` on the cached measurement, so they are not part of the cache key.
LIMITS = ("min_inferences_per_s", "max_p99_latency_ms", "min_dms_over_vanilla")


def settings(card: Card, options: Options) -> dict[str, Any]:
    out = card_section(card, "perf")
    for name in LIMITS:
        del out["perf"][name]
    return out


def gate(report: dict[str, Any], card: Card) -> dict[str, Any]:
    """The runner's gate hook: the card's throughput, latency and DMS/vanilla limits."""
    from pipeline.serve import perf

    rows = [perf.PerfRow(**row) for row in report["rows"]]
    return perf.check_gates(rows, *(getattr(card.perf, name) for name in LIMITS))


def run(ctx: StageContext) -> dict[str, Any]:
    from pipeline.serve import perf

    spec = ctx.card.perf
    repo = ctx.inputs["package"] / ctx.reports["package"]["model_repo"]
    rows = perf.measure(
        repo, ctx.out_dir, spec.concurrency, spec.input_tokens, spec.output_tokens, spec.measurement_ms
    )
    perf.plot(
        rows,
        ctx.out_dir / "perf.png",
        title=f"{ctx.card.name}: {spec.input_tokens} in / {spec.output_tokens} out tokens",
    )
    for row in rows:
        print(
            f"[perf] {row.method:8s} c={row.concurrency:<3d} {row.inferences_per_s:8.3f} inf/s  "
            f"p50 {row.p50_ms:9.1f} ms  p99 {row.p99_ms:9.1f} ms"
        )
    summary = {
        "dms_over_vanilla_throughput": perf.dms_over_vanilla(rows),
        "rows": perf.rows_json(rows),
        "workload": {
            "input_tokens": spec.input_tokens,
            "output_tokens": spec.output_tokens,
            "concurrency": list(spec.concurrency),
            "measurement_ms": spec.measurement_ms,
        },
    }
    perf.write_summary(ctx.out_dir / "summary.json", summary)
    return summary
