"""perf: serve the packaged repository and gate it with perf_analyzer.

Two workloads, each on a real Triton server, DMS (`ensemble`) and the same engine with eviction off
(`ensemble_vanilla`) in the same run:
- the latency check: the card's short prompts at a few concurrencies on the repository as packaged
  (CSVs, summary rows, perf.png);
- the equal-memory workload (`perf.equal_memory`, pipeline.serve.equal_memory): one KV budget for both
  engines, long generations, a sweep past what the vanilla pool holds (profile exports,
  `equal_memory` rows, equal_memory.png).
The gates (`gate`, judged by the runner on the kept measurement) fail the build naming the missed
limit and the numbers, unless --no-gate (then recorded).
"""

from __future__ import annotations

from typing import Any

from pipeline.card import Card, CardError, card_section
from pipeline.stages.api import Options, StageContext

NAME = "perf"
DEPENDS: tuple[str, ...] = ("package",)
VERSION = 3  # 2: the equal-memory workload; 3: its CPU time per token by part

# The limits: judged by `gate` on the cached measurement, so they are not part of the cache key.
LIMITS = ("min_inferences_per_s", "max_p99_latency_ms")
EQUAL_MEMORY_LIMITS = ("min_dms_over_vanilla_tokens_per_s", "max_dms_itl_ms_p99")
PLOT = "equal_memory.png"


def check_card(card: Card) -> None:
    if card.perf.equal_memory is None:
        raise CardError(
            f"{card.path or card.name}: perf needs a `perf.equal_memory` section (one KV budget for the DMS "
            "and the vanilla engine: kv_memory_bytes, input_tokens, output_tokens, concurrency and the "
            "gates; see pipeline/cards/tiny-qwen3.yaml)"
        )


def settings(card: Card, options: Options) -> dict[str, Any]:
    out = card_section(card, "perf")
    for name in LIMITS:
        del out["perf"][name]
    for name in EQUAL_MEMORY_LIMITS:
        del out["perf"]["equal_memory"][name]
    return out


def gate(report: dict[str, Any], card: Card) -> dict[str, Any]:
    """The runner's gate hook: the latency check's throughput and p99 latency, and the equal-memory
    workload's DMS/vanilla output tokens/s and DMS p99 inter-token latency."""
    from pipeline.serve import equal_memory, perf

    rows = [perf.PerfRow(**row) for row in report["rows"]]
    checks = perf.check_gates(rows, *(getattr(card.perf, name) for name in LIMITS))
    em = card.perf.equal_memory
    checks += equal_memory.check_gates(report["equal_memory"], *(getattr(em, n) for n in EQUAL_MEMORY_LIMITS))
    return perf.verdict(checks)


def with_verdict(report: dict[str, Any], verdict: dict[str, Any]) -> dict[str, Any]:
    """perf.equal_memory.passed: whether its own gates passed (the runner calls this after `gate`)."""
    em_checks = [c for c in verdict["checks"] if c["name"].startswith("equal_memory.")]
    passed = all(c["passed"] for c in em_checks)
    return {**report, "equal_memory": {**report["equal_memory"], "passed": passed}}


def run(ctx: StageContext) -> dict[str, Any]:
    from pipeline.serve import equal_memory, perf

    spec = ctx.card.perf
    repo = ctx.inputs["package"] / ctx.reports["package"]["model_repo"]
    equal_memory.pool_of(ctx.card, repo)  # a budget that cannot work fails before any measuring
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
    em = spec.equal_memory
    section = equal_memory.measure(ctx.card, repo, ctx.out_dir / "equal_memory")
    section["plot"] = f"equal_memory/{PLOT}"
    equal_memory.plot(
        section,
        ctx.out_dir / section["plot"],
        title=f"{ctx.card.name}: {em.kv_memory_bytes / 2**20:.1f} MiB of KV each, {em.input_tokens} in / "
        f"{em.output_tokens} out tokens",
    )
    for r in section["rows"]:
        print(
            f"[perf] equal memory {r['method']:8s} c={r['concurrency']:<3d} "
            f"{r['output_tokens_per_s']:8.1f} tok/s  running {r['running_max']}  queued {r['queued_max']}  "
            f"ttft p99 {r['ttft_ms_p99']:8.1f} ms  itl p99 {r['itl_ms_p99']:7.1f} ms  CR {r['mean_cr']}"
        )
    ratio = section["dms_over_vanilla_tokens_per_s"]
    print(f"[perf] equal memory: DMS / vanilla output tokens/s {ratio:.2f}")
    summary = {
        "dms_over_vanilla_throughput": perf.dms_over_vanilla(rows),
        "rows": perf.rows_json(rows),
        "workload": {
            "input_tokens": spec.input_tokens,
            "output_tokens": spec.output_tokens,
            "concurrency": list(spec.concurrency),
            "measurement_ms": spec.measurement_ms,
        },
        "equal_memory": section,
    }
    perf.write_summary(ctx.out_dir / "summary.json", summary)
    return summary
