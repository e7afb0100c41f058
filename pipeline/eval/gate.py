"""The accuracy gate: DMS at the card's target CR may lose at most eval.max_accuracy_drop points.

The drop is measured on the task average (vanilla minus DMS, in points); the message names the task
that lost most so a user knows where to look.
"""

from __future__ import annotations

from typing import Any

from pipeline.eval.summary import AVERAGE


def check_gate(
    accuracy: dict[str, dict[str, dict[str, float]]], target_label: str, limit: float
) -> dict[str, Any]:
    """Compare DMS at `target_label` with vanilla. accuracy: {method: {cr_label: {task: points}}}.

    Returns the report's eval.gate: {passed, drop, limit, target_cr, vanilla, dms, worst_task,
    worst_task_drop, task_drops}, and `message` when it failed.
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
    verdict = {
        "passed": drop <= limit,
        "drop": drop,
        "limit": limit,
        "target_cr": target_label,
        "vanilla": base[AVERAGE],
        "dms": ours[AVERAGE],
        "worst_task": worst_task,
        "worst_task_drop": task_drops[worst_task],
        "task_drops": task_drops,
    }
    if not verdict["passed"]:
        verdict["message"] = gate_message(verdict)
    return verdict


def gate_message(gate: dict[str, Any]) -> str:
    return (
        f"accuracy gate failed: DMS at CR {gate['target_cr']} averages {gate['dms']:.1f}% against "
        f"vanilla {gate['vanilla']:.1f}% (drop {gate['drop']:.1f} points, limit {gate['limit']:.1f}); "
        f"the largest loss is on task '{gate['worst_task']}' ({gate['worst_task_drop']:.1f} points). "
        "Retrofit longer or at a lower CR, or rerun with --no-gate to build anyway (recorded in the report)"
    )
