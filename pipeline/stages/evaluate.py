"""evaluate: accuracy against compression, DMS against training-free eviction, on the same engine; gated.

Writes `results.json` (every figure plus per-item results), `results.md` (the table) and
`accuracy_vs_cr.png`. The gate (card eval.max_accuracy_drop, points) stops the build when DMS at the
target CR loses too much accuracy against vanilla, unless --no-gate (recorded in the report). The runner
judges it apart from the measurement, which is kept either way: a new limit or --no-gate re-judges the
cached results instead of evaluating again.
"""

from __future__ import annotations

import dataclasses
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.card import Card, card_section
from pipeline.stages.api import (
    Options,
    StageContext,
    cr_label,  # the checkpoints' labels
)

NAME = "evaluate"
DEPENDS: tuple[str, ...] = ("prepare", "retrofit")
# 2: the generation-heavy trace task; the gate holds it to the limit on its own
VERSION = 2

RESULTS, TABLE, PLOT = "results.json", "results.md", "accuracy_vs_cr.png"
# Real models: agreement with vanilla over this many held-out prompts and greedy tokens each.
AGREEMENT_PROMPTS, AGREEMENT_NEW_TOKENS = 8, 256


def settings(card: Card, options: Options) -> dict[str, Any]:
    out = card_section(card, "eval", "dms")
    for limit in ("max_accuracy_drop", "max_kl", "min_token_match"):  # the gate judges a cached
        del out["eval"][limit]  # measurement (`gate` below)
    # Only the engine settings eval uses: a pool or output-length change elsewhere must not rerun it.
    out["build"] = {"max_batch_size": card.build.max_batch_size, "kv_block_size": card.build.kv_block_size}
    return out


def gate(report: dict[str, Any], card: Card) -> dict[str, Any]:
    """The runner's gate hook: DMS at the target CR against vanilla, within eval.max_accuracy_drop; for
    real models also ahead of every baseline on passkey and within eval.max_kl / min_token_match."""
    from pipeline.eval.gate import check_gate, check_quality_gate

    target, e = cr_label(card.dms.target_cr), card.eval
    if card.source.kind == "embedded":
        from pipeline.data.tasks import GENERATION_TASKS

        return check_gate(report["accuracy"], target, e.max_accuracy_drop, gated_tasks=GENERATION_TASKS)
    from pipeline.eval.compare import BASELINES

    return check_quality_gate(report, target, e.max_accuracy_drop, BASELINES, e.max_kl, e.min_token_match)


def build_items(card: Card, tokenizer) -> list[Any]:
    """Held-out items: the synthetic suite for the embedded model, passkey retrieval for real models."""
    if card.source.kind == "embedded":
        from pipeline.data.tasks import EVAL_TASKS, eval_items

        return [
            it
            for task in EVAL_TASKS
            for length in card.eval.lengths
            for it in eval_items(task, length, card.eval.items_per_task)
        ]
    import random

    from pipeline.eval.passkey import make_passkey_item

    rng = random.Random(f"passkey/eval/{card.name}")
    return [
        make_passkey_item(tokenizer, length, rng)
        for length in card.eval.lengths
        for _ in range(card.eval.items_per_task)
    ]


def run(ctx: StageContext) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from pipeline.eval.passkey import passkey_correct
    from pipeline.eval.scoring import exact_match

    card = ctx.card
    base_dir = ctx.inputs["prepare"] / "model"
    retrofit = ctx.reports.get("retrofit", {})
    if not retrofit.get("checkpoints"):
        raise RuntimeError("the retrofit stage reported no checkpoints; rerun it with --force retrofit")
    checkpoints = {
        cr_label(float(k)): ctx.inputs["retrofit"] / rel for k, rel in retrofit["checkpoints"].items()
    }
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    items = build_items(card, tokenizer)
    score = exact_match if card.source.kind == "embedded" else passkey_correct

    start = time.monotonic()
    with _cpu_threads(1):
        return _evaluate(ctx, card, base_dir, checkpoints, tokenizer, items, score, start)


@contextmanager
def _cpu_threads(n: int):
    """On CPU the engine's path is many small ops: one intra-op thread is several times faster than two
    (the figures: bench/RESULTS.md, "CPU threads")."""
    import torch

    before = torch.get_num_threads()
    if not torch.cuda.is_available():
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _evaluate(ctx, card, base_dir, checkpoints, tokenizer, items, score, start) -> dict[str, Any]:
    from pipeline.eval.compare import METHOD_ORDER, compare_methods
    from pipeline.eval.plot import plot_accuracy_vs_cr
    from pipeline.eval.summary import markdown_table, summarize

    results, baseline_targets = compare_methods(
        card, tokenizer, base_dir, checkpoints, items, card.build.max_batch_size,
        score=score,
    )
    summary = summarize(results)
    real = card.source.kind != "embedded"
    quality, quality_md = ({}, "")
    if real:
        quality, quality_md = _real_model_quality(card, tokenizer, base_dir, checkpoints, summary)

    public = Path(ctx.build_root) / card.name / NAME  # the runner's link to this stage's final directory
    report: dict[str, Any] = {
        "accuracy_unit": "percent",
        "accuracy": summary["accuracy"],
        "measured_cr": summary["measured_cr"],
        "peak_kv_bytes": summary["peak_kv_bytes"],
        "generated_tokens": summary["generated_tokens"],
        "baseline_target_cr": baseline_targets,
        **quality,
        "items_per_task": card.eval.items_per_task,
        "lengths": list(card.eval.lengths),
        "seconds": round(time.monotonic() - start, 1),
        "plot": str(public / PLOT),
        "table": str(public / TABLE),
        "results": str(public / RESULTS),
    }
    plot_accuracy_vs_cr(
        summary["accuracy"], summary["measured_cr"], ctx.out_dir / PLOT,
        f"{card.name}: accuracy against KV compression (same engine, greedy)",
    )
    scored = "passkey retrieval (the first digits generated are the key)" if real else "exact match"
    (ctx.out_dir / TABLE).write_text(
        f"# {card.name}: accuracy against compression\n\n"
        f"{card.eval.items_per_task} held-out items per task and length {list(card.eval.lengths)}; "
        f"baselines run at DMS's measured CR per length. Accuracy in %, {scored}. Measured CR counts "
        "the whole request (prompt and generated tokens), peak KV is the request's largest footprint.\n\n"
        f"{quality_md}{markdown_table(summary, METHOD_ORDER)}\n![accuracy vs CR]({PLOT})\n"
    )
    full = {**report, "by_length": summary["by_length"], "items": [dataclasses.asdict(r) for r in results]}
    (ctx.out_dir / RESULTS).write_text(json.dumps(full, indent=1))
    return report


def _real_model_quality(card, tokenizer, base_dir, checkpoints, summary) -> tuple[dict[str, Any], str]:
    """Real models: every method's agreement with vanilla over generated tokens (mean KL, greedy token
    match; baselines at DMS's measured CR), and the quality table beside passkey. Returns the report's
    `agreement` and `quality` sections and the table's Markdown."""
    from pipeline.eval.compare import METHOD_ORDER, compare_agreement
    from pipeline.eval.summary import quality_summary, quality_table

    agreement = compare_agreement(
        tokenizer, base_dir, checkpoints, AGREEMENT_PROMPTS, AGREEMENT_NEW_TOKENS, card.build.max_batch_size,
    )
    quality = quality_summary(summary, agreement)
    text = (
        f"Agreement with vanilla: {AGREEMENT_PROMPTS} held-out instruction prompts, {AGREEMENT_NEW_TOKENS} "
        "greedy tokens each, every method teacher-forced along vanilla's tokens.\n\n"
        f"{quality_table(quality, METHOD_ORDER)}\n"
    )
    sections = {"agreement": agreement, "quality": quality,
                "agreement_prompts": AGREEMENT_PROMPTS, "agreement_new_tokens": AGREEMENT_NEW_TOKENS}
    return sections, text
