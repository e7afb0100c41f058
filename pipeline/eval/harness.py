"""Run items through the inference engine and score them: the one place eval talks to the runtime.

Every method (vanilla, DMS, the training-free baselines) runs on the same engine (`pipeline.runtime`),
batched and greedy, and reports the engine's own per-request statistics.

Protocol: the context (the prompt up to its question) is prefilled as one chunk and compressed by the
policy; the question is the next prefill chunk, read through the compressed cache; then the answer is
decoded. Without this, a fixed-budget baseline would answer a one-token question from a full-attention
prefill and its compression would describe a cache it never used (kvpress evaluates the same way).
DMS's chunked prefill is exact, so the split changes nothing for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline.eval.scoring import exact_match, max_answer_tokens
from pipeline.eval.summary import ItemResult


@dataclass(frozen=True)
class Generation:
    """What eval needs back from one engine request."""

    token_ids: list[int]  # generated tokens (the end-of-sequence token included if produced)
    measured_cr: float  # 1 / mean(kept / length) over (layer, KV head), at the end of the request
    peak_kv_bytes: int  # bytes of the KV blocks the request held at its end (streams never shrink in decode)


def engine_for(
    hf_dir: Path,
    policy: str,
    target_cr: float | None,
    max_batch_size: int = 8,
    max_len: int = 4096,
    kv_block_size: int | None = None,
    kv_pool_tokens: int | None = None,
) -> Any:
    """An engine over `hf_dir` under an eviction policy (none | dms | window | h2o | tova).

    Baselines keep a fixed per-stream budget of ceil((prompt + max new tokens) / target_cr) tokens.
    The pool holds a full batch of uncompressed requests, so eval never preempts. kv_block_size None:
    the checkpoint's dms_paged_attention_block_size (16 for plain models), kept below the DMS window.
    """
    import json

    from pipeline.runtime.engine import Engine, EngineLimits
    from pipeline.runtime.policies import make_policy

    if policy not in ("none", "dms") and target_cr is None:
        raise ValueError(f"policy {policy} needs a target compression ratio (cr=...)")
    if kv_block_size is None:
        config = json.loads((Path(hf_dir) / "config.json").read_text())
        window = int(config.get("dms_window_size", 1 << 30))
        kv_block_size = min(int(config.get("dms_paged_attention_block_size", 16)), max(1, window // 2))
    limits = EngineLimits(
        max_batch_size=max_batch_size,
        max_input_len=max_len,
        max_output_len=max_len,
        kv_block_size=kv_block_size,
        kv_pool_tokens=kv_pool_tokens or max_batch_size * (max_len + 2 * kv_block_size),
    )
    chosen = make_policy(policy, cr=target_cr) if target_cr is not None else make_policy(policy)
    return Engine.from_hf(hf_dir, policy=chosen, limits=limits)


def make_engine(hf_dir: Path, policy: str, target_cr: float | None, card) -> Any:
    """`engine_for` with the card's batch size and block size, sized for its longest eval prompt."""
    longest = max(card.eval.lengths) + 64  # prompt + answer + slack for tokenizers that split words
    return engine_for(
        hf_dir, policy, target_cr, max_batch_size=card.build.max_batch_size, max_len=longest,
        kv_block_size=card.build.kv_block_size,
    )


def generate_batch(
    engine: Any,
    prompts: Sequence[list[int]],
    max_new_tokens: Sequence[int],
    context_lens: Sequence[int] | None = None,
) -> list[Generation]:
    """Greedy generation; prompts with a context length are prefilled context first, then the rest.

    prompts: token ids (BOS included). context_lens[i]: tokens of prompts[i] before its question (the
    first prefill chunk), or None (for all, or for one) for a one-chunk prefill. All run as one batch.
    """
    handles = [
        engine.submit(list(p), max_tokens=int(n), temperature=0.0,
                      context_len=None if context_lens is None else context_lens[i])
        for i, (p, n) in enumerate(zip(prompts, max_new_tokens, strict=True))
    ]  # fmt: skip
    out = []
    for h in handles:
        c = h.result()
        if c.finish_reason == "error":
            raise RuntimeError(f"engine request failed: {c.error}")
        out.append(Generation(
            token_ids=list(c.token_ids),
            measured_cr=float(c.stats["compression_ratio"]),
            peak_kv_bytes=int(c.stats["kv_bytes"]),
        ))  # fmt: skip
    return out


def forced_logits(
    engine: Any, pairs: Sequence[tuple[list[int], list[int]]], stats: list[dict] | None = None
) -> list[torch.Tensor]:
    """Teacher-forced next-token logits with the engine's policy active.

    pairs: (prompt ids, forced ids). The prompt is prefilled (and compressed) as one chunk, then the
    forced tokens are decoded one by one through the paged cache. Returns per pair a float32 tensor
    [len(forced), V]: row j predicts forced[j]. `stats`, when given, receives each request's engine
    statistics (measured CR, KV bytes) at its end.
    """
    for _, forced in pairs:
        if not forced:
            raise ValueError("forced_logits: every pair needs at least one forced token")
    done = engine.score(pairs)
    if stats is not None:
        stats.extend(c.stats for c in done)
    return [c.logits for c in done]


def continuation_logprobs(
    engine: Any, pairs: Sequence[tuple[list[int], list[int]]]
) -> list[tuple[float, bool]]:
    """lm-eval's loglikelihood: (sum log p(continuation | context), is every token the greedy one)."""
    out = []
    for (_, cont), logits in zip(pairs, forced_logits(engine, pairs), strict=True):
        logp = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(cont)
        out.append((float(logp.gather(1, target[:, None]).sum()), bool((logits.argmax(-1) == target).all())))
    return out


def question_offset(item: Any) -> int:
    """Character offset where an item's question starts (its last `?` word, or the item's own mark)."""
    own = getattr(item, "question_offset", None)
    if own is not None:
        return int(own)
    at = item.prompt.rfind("?")
    if at < 0:
        raise ValueError(f"item of task {getattr(item, 'task', '?')} has no question mark to split at")
    return at


def encode_item(tokenizer, item: Any) -> tuple[list[int], int]:
    """(prompt ids with BOS, context length in tokens): context and question tokenized separately."""
    at = question_offset(item)
    context = tokenizer(item.prompt[:at].rstrip())["input_ids"]  # BOS added by the tokenizer
    question = tokenizer(item.prompt[at:], add_special_tokens=False)["input_ids"]
    return context + question, len(context)


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
    # Items of one (task, length) share their split, so each chunk of them is one engine batch.
    order = sorted(range(len(items)), key=lambda i: (items[i].task, items[i].length))
    for start in range(0, len(order), batch_size):
        chunk = [items[i] for i in order[start : start + batch_size]]
        encoded = [encode_item(tokenizer, it) for it in chunk]
        gens = generate_batch(
            engine, [p for p, _ in encoded],
            [getattr(it, "max_new_tokens", None) or max_answer_tokens(it.answer) for it in chunk],
            [c for _, c in encoded],
        )
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
