"""The comparison: vanilla, DMS at each retrofit checkpoint, and each training-free baseline at the SAME
measured compression as the DMS checkpoint it is compared with.

Baselines run on the vanilla weights. Their budget comes from DMS's measured CR at each prompt length
(pooled over tasks: CR = 1 / mean kept fraction), and each baseline then reports its own measured CR.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.eval.harness import make_engine, run_items
from pipeline.eval.scoring import exact_match
from pipeline.eval.summary import ItemResult, combine_cr

BASELINES: tuple[str, ...] = ("window", "h2o", "tova", "kvzip")
METHOD_ORDER: tuple[str, ...] = ("vanilla", "dms", *BASELINES)


def dms_cr_by_length(results: Sequence[ItemResult]) -> dict[int, float]:
    """DMS's measured CR per prompt length, pooled over tasks. results: one checkpoint's items."""
    per_len: dict[int, list[float]] = defaultdict(list)
    for r in results:
        per_len[r.length].append(r.measured_cr)
    return {length: combine_cr(crs) for length, crs in sorted(per_len.items())}


def compare_methods(
    card,
    tokenizer,
    base_dir: Path,
    checkpoints: dict[str, Path],
    items: Sequence[Any],
    batch_size: int,
    engine_factory: Callable[..., Any] = make_engine,
    baselines: Sequence[str] = BASELINES,
    score: Callable[[str, str], bool] = exact_match,
    log: Callable[[str], None] = print,
) -> tuple[list[ItemResult], dict[str, dict[str, float]]]:
    """Run every (method, CR) on `items`; return the item results and the CRs baselines were given.

    checkpoints: {cr_label: DMS HF dir}. items: objects with prompt, answer, task, length.
    The second value is {cr_label: {length: target CR handed to the baselines}}.
    """
    vanilla = engine_factory(base_dir, "none", None, card)
    results = run_items(vanilla, tokenizer, items, "vanilla", "1", batch_size, score=score)
    log(f"vanilla: {_acc(results):.1f}%")
    by_length: dict[int, list[Any]] = defaultdict(list)
    for it in items:
        by_length[it.length].append(it)
    budgets: dict[str, dict[str, float]] = {}
    for label, ckpt in sorted(checkpoints.items(), key=lambda kv: float(kv[0])):
        dms = run_items(engine_factory(ckpt, "dms", None, card), tokenizer, items, "dms", label, batch_size,
                        score=score)
        results += dms
        targets = dms_cr_by_length(dms)
        budgets[label] = {str(length): round(cr, 4) for length, cr in targets.items()}
        log(f"dms CR {label}: {_acc(dms):.1f}% at measured CR {combine_cr(r.measured_cr for r in dms):.2f}")
        for method in baselines:
            mine: list[ItemResult] = []
            for length, group in sorted(by_length.items()):
                engine = engine_factory(base_dir, method, targets[length], card)
                mine += run_items(engine, tokenizer, group, method, label, batch_size,
                                  f"{method} CR {label} @{length}", score=score)
            results += mine
            log(f"{method} CR {label}: {_acc(mine):.1f}% at measured CR "
                f"{combine_cr(r.measured_cr for r in mine):.2f}")
    return results, budgets


def _acc(results: Sequence[ItemResult]) -> float:
    return 100.0 * sum(r.correct for r in results) / max(1, len(results))


def compare_agreement(
    tokenizer,
    base_dir: Path,
    checkpoints: dict[str, Path],
    n_prompts: int = 8,
    new_tokens: int = 256,
    batch_size: int = 8,
    baselines: Sequence[str] = BASELINES,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, dict[str, float]]]:
    """Agreement with vanilla on held-out prompts for every (method, CR), baselines at DMS's measured CR.

    Returns {method: {cr_label: {kl, token_match, measured_cr, n_prompts, new_tokens}}}; vanilla against
    itself ("1") is the sanity row (KL 0, match 1).
    """
    from pipeline.eval.agreement import agreement_prompts, encode_prompts, measure, reference
    from pipeline.eval.harness import engine_for

    prompts = encode_prompts(tokenizer, agreement_prompts(n_prompts))
    max_len = max(len(p) for p in prompts) + new_tokens + 16

    def engine(path: Path, policy: str, cr: float | None):
        return engine_for(path, policy, cr, max_batch_size=batch_size, max_len=max_len)

    vanilla = engine(base_dir, "none", None)
    refs = reference(vanilla, prompts, new_tokens)
    out: dict[str, dict[str, dict[str, float]]] = {"vanilla": {"1": measure(vanilla, prompts, refs)}}
    for label, ckpt in sorted(checkpoints.items(), key=lambda kv: float(kv[0])):
        dms = measure(engine(ckpt, "dms", None), prompts, refs)
        out.setdefault("dms", {})[label] = dms
        log(f"agreement dms CR {label}: KL {dms['kl']:.4f}, match {dms['token_match']:.3f}, "
            f"CR {dms['measured_cr']:.2f}")
        for method in baselines:
            got = measure(engine(base_dir, method, dms["measured_cr"]), prompts, refs)
            out.setdefault(method, {})[label] = got
            log(f"agreement {method} CR {label}: KL {got['kl']:.4f}, match {got['token_match']:.3f}, "
                f"CR {got['measured_cr']:.2f}")
    return out
