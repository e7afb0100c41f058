"""The accuracy gate: DMS at the card's target CR may lose at most eval.max_accuracy_drop points.

The drop is measured on the task average (vanilla minus DMS, in points); the message names the task
that lost most so a user knows where to look. Real models (`check_quality_gate`) add what makes the
passkey figure mean something: DMS must beat every training-free baseline at the same CR, and its
agreement with vanilla over generated tokens (mean KL, greedy token match) must meet the card's limits.
"""

from __future__ import annotations

from typing import Any

from pipeline.eval.summary import AVERAGE


def check_gate(
    accuracy: dict[str, dict[str, dict[str, float]]], target_label: str, limit: float,
    gated_tasks: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Compare DMS at `target_label` with vanilla. accuracy: {method: {cr_label: {task: points}}}.

    The average may drop at most `limit` points, and so may each task of `gated_tasks` present (the
    generation-heavy ones, which one task among several could otherwise hide in the average).
    Returns the report's eval.gate: {passed, drop, limit, target_cr, vanilla, dms, worst_task,
    worst_task_drop, task_drops, gated_tasks, failed_tasks}, and `message` when it failed.
    """
    if "vanilla" not in accuracy or "1" not in accuracy["vanilla"]:
        raise ValueError("gate: no vanilla (CR 1) accuracy to compare against")
    dms = accuracy.get("dms", {})
    if target_label not in dms:
        raise ValueError(
            f"gate: no DMS checkpoint at the target CR {target_label} (have {sorted(dms, key=float)}); "
            "add dms.target_cr to retrofit.checkpoint_crs in the card"
        )
    base, ours = accuracy["vanilla"]["1"], dms[target_label]
    task_drops = {t: round(base[t] - ours[t], 4) for t in base if t != AVERAGE and t in ours}
    worst_task = max(task_drops, key=task_drops.get)
    drop = round(base[AVERAGE] - ours[AVERAGE], 4)
    gated = [t for t in gated_tasks if t in task_drops]
    failed_tasks = [t for t in gated if task_drops[t] > limit]
    verdict = {
        "passed": drop <= limit and not failed_tasks,
        "drop": drop,
        "limit": limit,
        "target_cr": target_label,
        "vanilla": base[AVERAGE],
        "dms": ours[AVERAGE],
        "worst_task": worst_task,
        "worst_task_drop": task_drops[worst_task],
        "task_drops": task_drops,
        "gated_tasks": gated,
        "failed_tasks": failed_tasks,
    }
    if not verdict["passed"]:
        verdict["message"] = gate_message(verdict)
    return verdict


def gate_message(gate: dict[str, Any]) -> str:
    own = "".join(
        f"; task '{t}' alone drops {gate['task_drops'][t]:.1f} points (held to the limit on its own)"
        for t in gate.get("failed_tasks", ())
    )
    return (
        f"accuracy gate failed: DMS at CR {gate['target_cr']} averages {gate['dms']:.1f}% against "
        f"vanilla {gate['vanilla']:.1f}% (drop {gate['drop']:.1f} points, limit {gate['limit']:.1f}){own}; "
        f"the largest loss is on task '{gate['worst_task']}' ({gate['worst_task_drop']:.1f} points). "
        "Retrofit longer or at a lower CR, or rerun with --no-gate to build anyway (recorded in the report)"
    )


def check_quality_gate(
    report: dict[str, Any],
    target_label: str,
    limit: float,
    baselines: tuple[str, ...],
    max_kl: float | None = None,
    min_token_match: float | None = None,
) -> dict[str, Any]:
    """The real-model gate on evaluate's report (its `accuracy` is passkey retrieval, `agreement` the
    KL / token match over generated tokens). Returns check_gate's verdict plus `baselines` (each one's
    passkey at the target CR and whether DMS beat it), `kl`, `token_match`, their limits and `failed`
    (which of passkey_drop / baselines / kl / token_match failed)."""
    verdict = check_gate(report["accuracy"], target_label, limit)
    accuracy, agreement = report["accuracy"], report["agreement"]
    missing = [m for m in baselines if target_label not in accuracy.get(m, {})]
    if missing:
        raise ValueError(f"gate: no passkey figures of {', '.join(missing)} at CR {target_label}")
    others = {m: accuracy[m][target_label][AVERAGE] for m in baselines}
    ours = agreement["dms"][target_label]
    failed = [] if verdict["passed"] else ["passkey_drop"]
    if not all(verdict["dms"] > v for v in others.values()):
        failed.append("baselines")
    if max_kl is not None and not ours["kl"] <= max_kl:
        failed.append("kl")
    if min_token_match is not None and not ours["token_match"] >= min_token_match:
        failed.append("token_match")
    verdict.pop("message", None)
    verdict.update(
        passed=not failed,
        failed=failed,
        baselines={m: {"passkey": v, "beaten": verdict["dms"] > v} for m, v in others.items()},
        kl=ours["kl"],
        max_kl=max_kl,
        token_match=ours["token_match"],
        min_token_match=min_token_match,
    )
    if failed:
        verdict["message"] = quality_gate_message(verdict)
    return verdict


def quality_gate_message(gate: dict[str, Any]) -> str:
    parts = []
    if "passkey_drop" in gate["failed"]:
        parts.append(f"passkey {gate['dms']:.1f}% against vanilla {gate['vanilla']:.1f}% (drop "
                     f"{gate['drop']:.1f} points, limit {gate['limit']:.1f})")
    if "baselines" in gate["failed"]:
        lost = [f"{m} {b['passkey']:.1f}%" for m, b in gate["baselines"].items() if not b["beaten"]]
        parts.append(f"passkey {gate['dms']:.1f}% does not beat {', '.join(lost)} at the same CR")
    if "kl" in gate["failed"]:
        parts.append(f"mean KL to vanilla {gate['kl']:.4f} above the limit {gate['max_kl']:.4f}")
    if "token_match" in gate["failed"]:
        parts.append(f"greedy token match {gate['token_match']:.3f} below the limit "
                     f"{gate['min_token_match']:.3f}")
    return (
        f"quality gate failed: DMS at CR {gate['target_cr']}: {'; '.join(parts)}. Retrofit longer or at a "
        "lower CR, or rerun with --no-gate to build anyway (recorded in the report)"
    )
