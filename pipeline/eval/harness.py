"""Run items through the inference engine and score them: the one place eval talks to the runtime.

Every method (vanilla, DMS, the training-free baselines) runs on the same engine, batched, greedy, and
reports the engine's own per-request statistics (measured CR, peak live KV bytes, generated length).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.eval.scoring import exact_match, max_answer_tokens
from pipeline.eval.summary import ItemResult


@dataclass(frozen=True)
class Generation:
    """What eval needs back from one engine request."""

    token_ids: list[int]  # generated tokens, end-of-sequence excluded
    measured_cr: float
    peak_kv_bytes: int


def make_engine(hf_dir: Path, policy: str, target_cr: float | None, card) -> Any:
    """The runtime engine for `hf_dir` under an eviction policy.

    policy: none | dms | window | h2o | tova. Baselines keep a fixed per-stream budget derived from
    `target_cr` (the runtime's rule: budget = length / target_cr, sinks and recent tokens included).
    """
    from pipeline.runtime.engine import Engine, EngineLimits

    limits = EngineLimits(
        max_batch_size=card.build.max_batch_size,
        max_input_len=max(card.build.max_input_len, max(card.eval.lengths) + 8),
        max_output_len=card.build.max_output_len,
        kv_block_size=card.build.kv_block_size,
        kv_pool_tokens=card.build.kv_pool_tokens,
    )
    kwargs = {} if target_cr is None else {"target_cr": target_cr}
    return Engine.from_hf(hf_dir, policy=policy, limits=limits, **kwargs)


def generate_batch(
    engine: Any, prompts: Sequence[list[int]], max_new_tokens: Sequence[int]
) -> list[Generation]:
    """Greedy generation for a batch of tokenized prompts; the engine batches them internally."""
    outs = engine.generate([list(p) for p in prompts], max_new_tokens=list(max_new_tokens), temperature=0.0)
    return [
        Generation(
            token_ids=list(o.token_ids),
            measured_cr=float(o.stats.compression_ratio),
            peak_kv_bytes=int(o.stats.peak_kv_bytes),
        )
        for o in outs
    ]


def run_items(
    engine: Any,
    tokenizer,
    items: Sequence[Any],
    method: str,
    cr_label: str,
    batch_size: int,
    desc: str = "",
    score: Callable[[str, str], bool] = exact_match,
) -> list[ItemResult]:
    """Generate an answer for every item (objects with prompt, answer, task, length) and score it."""
    results: list[ItemResult] = []
    bar = tqdm(total=len(items), desc=desc or f"{method} CR {cr_label}", unit="item", leave=False)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        prompts = [tokenizer(it.prompt)["input_ids"] for it in chunk]  # BOS added by the tokenizer
        gens = generate_batch(engine, prompts, [max_answer_tokens(it.answer) for it in chunk])
        for it, gen in zip(chunk, gens, strict=True):
            text = tokenizer.decode(gen.token_ids, skip_special_tokens=True)
            results.append(
                ItemResult(
                    task=it.task,
                    length=it.length,
                    method=method,
                    cr_label=cr_label,
                    correct=score(text, it.answer),
                    measured_cr=gen.measured_cr,
                    peak_kv_bytes=gen.peak_kv_bytes,
                    generated_tokens=len(gen.token_ids),
                )
            )
        bar.update(len(chunk))
    bar.close()
    return results
