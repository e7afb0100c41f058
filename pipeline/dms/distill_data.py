"""Distillation data for the retrofit, packed to the training length.

- synthetic (tiny model): the project's task corpus (`pipeline.data.corpus`) in its retrieval-dense
  form (more facts per item, all of them asked: `tasks.RETROFIT_FACT_RANGE`), one seeded batch per step
  (so a resumed run sees the same data); held-out rows from the eval split of `pipeline.data.tasks`.
  With retrofit.teacher_traces, rows of the teacher's own generated traces join them.
- teacher-answers (real models, offline): generated prompts answered by the base model itself, chat
  formatted; the distillation target is then exactly the teacher's own distribution.
- a path: a local JSONL (`{"messages": [...]}` chat records, or `{"text": ...}`) or a `datasets`
  directory saved with `save_to_disk`, e.g. reasoning traces like NVIDIA's OpenR1-Math recipe.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

# ---- synthetic corpus (tiny model) ----

RETROFIT_EXTRA_ROOM = 100  # tokens of each row left for the extra questions (every fact is asked)


def synthetic_batches(
    tokenizer: Any, batch_size: int, seq_len: int, seed: int, teacher_rows: torch.Tensor | None = None
) -> Callable[[int], torch.Tensor]:
    """next_batch(step) -> [B, seq_len], the same batch for the same (seed, step). With teacher_rows
    ([N, seq_len]), every odd step's first row is the next of them in turn."""
    from pipeline.data.corpus import sample_batch_with_weights
    from pipeline.data.tasks import RETROFIT_FACT_RANGE

    def next_batch(step: int) -> torch.Tensor:
        rng = random.Random(seed * 1_000_003 + step)
        rows, _ = sample_batch_with_weights(
            tokenizer, batch_size, seq_len, rng,
            fact_range=RETROFIT_FACT_RANGE, extra_room=RETROFIT_EXTRA_ROOM,
        )
        if teacher_rows is not None and step % 2 == 1:
            rows[0] = teacher_rows[(step // 2) % len(teacher_rows)]
        return rows

    return next_batch


def teacher_trace_rows(model: Any, tokenizer: Any, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """[n, seq_len] rows of `<bos> prompt trace <eos>` then padding: training-split `trace` prompts
    (half a row to a full one) and the teacher's own greedy trace of each (what the student must then
    reproduce through its own compressed cache, right or wrong)."""
    from pipeline.data.tasks import train_item
    from pipeline.data.teacher import greedy_answers

    rng = random.Random(f"teacher-traces/{seed}")
    items = [train_item(rng.randint(seq_len // 2, seq_len - 2), rng, "trace") for _ in range(n)]
    traces = greedy_answers(model, tokenizer, items, batch_size=16)
    rows = torch.full((n, seq_len), tokenizer.pad_token_id, dtype=torch.long)
    for i, (item, trace) in enumerate(zip(items, traces, strict=True)):
        words = f"{item.prompt} {trace}".split()
        ids = [tokenizer.bos_token_id, *tokenizer.convert_tokens_to_ids(words), tokenizer.eos_token_id]
        rows[i, : min(seq_len, len(ids))] = torch.tensor(ids[:seq_len])
    return rows


def synthetic_heldout(tokenizer: Any, n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """[n, seq_len] rows of held-out (eval split) task items, packed back to back without padding."""
    from pipeline.data.tasks import TASKS, eval_items

    rows = []
    for i in range(n):
        ids: list[int] = []
        j = 0
        while len(ids) < seq_len:
            item = eval_items(
                TASKS[(i + j) % len(TASKS)], max(64, seq_len // 2), 1, seed=seed + 7919 * i + j
            )[0]
            words = f"{item.prompt} {item.answer}".split()
            ids += [tokenizer.bos_token_id, *tokenizer.convert_tokens_to_ids(words), tokenizer.eos_token_id]
            j += 1
        rows.append(ids[:seq_len])
    return torch.tensor(rows, dtype=torch.long)


# ---- real models ----

_TOPICS = [
    "a train",
    "a garden",
    "a bakery",
    "a library",
    "a school trip",
    "a savings account",
    "a bicycle",
    "a recipe",
    "a football team",
    "a water tank",
]


def generated_prompts(n: int, seed: int) -> list[str]:
    """Word problems and explanation requests with random numbers (prompts for the teacher)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
        topic = rng.choice(_TOPICS)
        kind = i % 4
        if kind == 0:
            out.append(
                f"Solve step by step: {topic} has {a} items, gets {b} more, then loses {c}. "
                "How many are left?"
            )
        elif kind == 1:
            out.append(f"What is {a} times {c}? Explain your reasoning step by step.")
        elif kind == 2:
            out.append(f"Write a short story about {topic} that mentions the number {a}.")
        else:
            out.append(f"Explain in a few sentences how {topic} works, then list {c} facts about it.")
    return out


def teacher_answers(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, batch_size: int = 8
) -> list[list[dict[str, str]]]:
    """Chat records [{"role": "user", ...}, {"role": "assistant", ...}] answered greedily by `model`."""
    records = []
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    for i in tqdm(range(0, len(prompts), batch_size), desc="teacher answers"):
        chunk = prompts[i : i + batch_size]
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in chunk
        ]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        for p, row in zip(chunk, out[:, enc["input_ids"].shape[1] :], strict=True):
            answer = tokenizer.decode(row, skip_special_tokens=True).strip()
            records.append([{"role": "user", "content": p}, {"role": "assistant", "content": answer}])
    return records


def read_records(path: Path) -> list[Any]:
    """Chat records or plain texts from a JSONL file or a `datasets` directory."""
    if path.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        rows: Iterable[dict[str, Any]] = ds
    elif path.is_file():
        rows = _read_jsonl(path)
    else:
        raise FileNotFoundError(f"retrofit.data: {path} is neither a JSONL file nor a datasets directory")
    out = []
    for row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"retrofit.data {path}: each record must be a JSON object, got {row!r:.60}")
        if "messages" in row:
            out.append(row["messages"])
        elif "text" in row:
            out.append(row["text"])
        else:
            raise ValueError(
                f"retrofit.data {path}: each record needs 'messages' (chat) or 'text'; got {sorted(row)}"
            )
    if not out:
        raise ValueError(f"retrofit.data {path}: no records")
    return out


def _read_jsonl(path: Path) -> list[Any]:
    """The records of a JSONL file; an error names the file and line (a binary file, an array file)."""
    how = 'one JSON object per line ({"messages": [...]} or {"text": ...})'
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"retrofit.data {path} is not UTF-8 text; it must be JSONL: {how}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"retrofit.data {path}, line {number}: not JSON ({exc.msg}, column {exc.colno}); "
                    f"the file must be JSONL: {how}"
                ) from None
    return rows


def pack_records(tokenizer: Any, records: list[Any], seq_len: int) -> torch.Tensor:
    """Tokenise (chat template for chat records), join with EOS and cut into [N, seq_len] rows."""
    stream: list[int] = []
    for rec in records:
        if isinstance(rec, str):
            ids = tokenizer(rec, add_special_tokens=False)["input_ids"]
        else:
            text = tokenizer.apply_chat_template(rec, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        stream += [*ids, tokenizer.eos_token_id]
    n = len(stream) // seq_len
    if n < 2:
        raise ValueError(f"distillation data has {len(stream)} tokens: fewer than two rows of {seq_len}")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def row_batches(rows: torch.Tensor, batch_size: int, seed: int) -> Callable[[int], torch.Tensor]:
    """next_batch(step): a seeded pick of rows (epochs repeat in a different order)."""

    def next_batch(step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        return rows[torch.randint(len(rows), (batch_size,), generator=g)]

    return next_batch
