"""Per-item results -> the report's tables: accuracy, measured CR, KV bytes, generated length.

Accuracy is in points (0-100). A set of requests' compression ratio follows docs/dms.md section 6:
CR = 1 / mean(kept / length), so per-request CRs combine as a harmonic mean, never an arithmetic one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

AVERAGE = "average"


@dataclass(frozen=True)
class ItemResult:
    """One evaluated item under one method at one compression setting."""

    task: str
    length: int  # the prompt length bucket (tokens) the item was made for
    method: str  # vanilla | dms | window | h2o | tova
    cr_label: str  # "1" for vanilla, else the DMS checkpoint's CR label it is matched to
    correct: bool
    measured_cr: float  # this request's own CR: 1 / mean(kept / length) over (layer, KV head)
    peak_kv_bytes: int  # this request's largest live KV footprint
    generated_tokens: int


def combine_cr(crs: Iterable[float]) -> float:
    """CR of several requests: 1 / mean(1 / cr_i) (each request's kept fraction weighs equally)."""
    crs = list(crs)
    if not crs:
        raise ValueError("combine_cr: no compression ratios given")
    return len(crs) / sum(1.0 / c for c in crs)


def summarize(results: Iterable[ItemResult]) -> dict[str, Any]:
    """Aggregate items into {accuracy, measured_cr, peak_kv_bytes, generated_tokens, by_length}.

    Each of the first four is {method: {cr_label: {task: value}}} with an extra task "average" (mean over
    tasks of the per-task figure, so every task weighs the same whatever its item count).
    by_length is {method: {cr_label: {task: {length: {accuracy, measured_cr, n}}}}}.
    """
    groups: dict[tuple[str, str, str], list[ItemResult]] = defaultdict(list)
    for r in results:
        groups[(r.method, r.cr_label, r.task)].append(r)
    if not groups:
        raise ValueError("summarize: no results")
    out: dict[str, Any] = {k: {} for k in ("accuracy", "measured_cr", "peak_kv_bytes", "generated_tokens")}
    by_length: dict[str, Any] = {}
    for (method, label, task), items in sorted(groups.items()):
        figures = {
            "accuracy": 100.0 * sum(r.correct for r in items) / len(items),
            "measured_cr": combine_cr(r.measured_cr for r in items),
            "peak_kv_bytes": max(r.peak_kv_bytes for r in items),
            "generated_tokens": sum(r.generated_tokens for r in items) / len(items),
        }
        for key, value in figures.items():
            out[key].setdefault(method, {}).setdefault(label, {})[task] = round(value, 4)
        per_len: dict[int, list[ItemResult]] = defaultdict(list)
        for r in items:
            per_len[r.length].append(r)
        by_length.setdefault(method, {}).setdefault(label, {})[task] = {
            str(length): {
                "accuracy": round(100.0 * sum(r.correct for r in rs) / len(rs), 4),
                "measured_cr": round(combine_cr(r.measured_cr for r in rs), 4),
                "n": len(rs),
            }
            for length, rs in sorted(per_len.items())
        }
    for key in ("accuracy", "generated_tokens"):
        for per_cr in out[key].values():
            for per_task in per_cr.values():
                per_task[AVERAGE] = round(sum(per_task.values()) / len(per_task), 4)
    for per_cr in out["measured_cr"].values():
        for per_task in per_cr.values():
            per_task[AVERAGE] = round(combine_cr(per_task.values()), 4)
    for per_cr in out["peak_kv_bytes"].values():
        for per_task in per_cr.values():
            per_task[AVERAGE] = max(per_task.values())
    out["by_length"] = by_length
    return out


def markdown_table(summary: dict[str, Any], method_order: Iterable[str]) -> str:
    """One row per (task, method, CR): accuracy, measured CR, peak KV bytes, mean generated length."""
    lines = [
        "| task | method | CR (target) | accuracy (%) | measured CR | peak KV (KiB) | generated tokens |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    acc = summary["accuracy"]
    tasks = sorted({t for per_cr in acc.values() for accs in per_cr.values() for t in accs if t != AVERAGE})
    methods = [m for m in method_order if m in acc] + [m for m in acc if m not in method_order]
    for task in [*tasks, AVERAGE]:
        for method in methods:
            for label in sorted(acc[method], key=float):
                if task not in acc[method][label]:
                    continue
                lines.append(
                    f"| {task} | {method} | {label} | {acc[method][label][task]:.1f} "
                    f"| {summary['measured_cr'][method][label][task]:.2f} "
                    f"| {summary['peak_kv_bytes'][method][label][task] / 1024:.1f} "
                    f"| {summary['generated_tokens'][method][label][task]:.1f} |"
                )
    return "\n".join(lines) + "\n"


def quality_summary(summary: dict[str, Any], agreement: dict[str, dict[str, dict[str, float]]]) -> dict:
    """A real model's figures per (method, CR) in one place: {method: {cr_label: {passkey (%),
    passkey_cr, peak_kv_bytes, kl, token_match, agreement_cr}}} (passkey from the item summary,
    the rest of agreement with vanilla over generated tokens)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for method, per_cr in summary["accuracy"].items():
        for label, accs in per_cr.items():
            a = agreement.get(method, {}).get(label, {})
            out.setdefault(method, {})[label] = {
                "passkey": accs[AVERAGE],
                "passkey_cr": summary["measured_cr"][method][label][AVERAGE],
                "peak_kv_bytes": summary["peak_kv_bytes"][method][label][AVERAGE],
                "kl": a.get("kl"),
                "token_match": a.get("token_match"),
                "agreement_cr": a.get("measured_cr"),
            }
    return out


def quality_table(quality: dict[str, dict[str, dict[str, float]]], method_order: Iterable[str]) -> str:
    """quality_summary as Markdown: one row per (method, CR)."""
    lines = [
        "| method | CR (target) | passkey (%) | measured CR (passkey) | peak KV (KiB) "
        "| KL(vanilla \\|\\| method) | token match | measured CR (generation) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    methods = [m for m in method_order if m in quality] + [m for m in quality if m not in method_order]
    num = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for method in methods:
        for label in sorted(quality[method], key=float):
            q = quality[method][label]
            lines.append(
                f"| {method} | {label} | {q['passkey']:.1f} | {q['passkey_cr']:.2f} "
                f"| {q['peak_kv_bytes'] / 1024:.1f} | {num(q['kl'], '.4f')} | {num(q['token_match'], '.3f')} "
                f"| {num(q['agreement_cr'], '.2f')} |"
            )
    return "\n".join(lines) + "\n"
