"""Training batches of task text: items packed into fixed-length rows, with a loss weight per token.

Rows hold one or more whole items (`<bos> prompt answer <eos>`), padded at the end. Items in one row
never conflict: the asked fact is always (re)defined inside its own item, so "the latest definition
wins" is always right even when attention reaches back into an earlier item of the row.
"""

from __future__ import annotations

import math
import random

import torch

from pipeline.data import tasks
from pipeline.data.tasks import FILLER_WORDS, KEYS, MIN_LENGTH, NUMBERS, TASKS, VARIABLES, train_item

# Loss weight of prompt tokens (filler and facts are mostly unpredictable noise); answers weigh 1.
PROMPT_WEIGHT = 0.05
EXTRA_ROOM = 40  # tokens kept free in a row for an item's extra questions
COPY_WORDS = NUMBERS + KEYS + VARIABLES  # every token a fact or an answer can contain
COPY_MAX_GAP = 12
COPY_HALF = 25  # words per copied segment: two segments and a gap fill a COPY_ROW-token row
COPY_ROW = 64


def _item_length(room: int, rng: random.Random) -> int:
    """Half the items nearly fill the row (long context), half are log-uniform short ones."""
    if rng.random() < 0.5:
        return rng.randint(max(MIN_LENGTH, room // 2), room)
    return max(MIN_LENGTH, min(room, round(math.exp(rng.uniform(math.log(MIN_LENGTH), math.log(room))))))


def sample_batch_with_weights(
    tokenizer, batch_size: int, seq_len: int, rng: random.Random, split: str = "train",
    tasks: tuple[str, ...] = TASKS,
    fact_range: dict[str, tasks.FactRange] = tasks.FACT_RANGE,
    extra_room: int = EXTRA_ROOM,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows and per-token loss weights (facts per item from `fact_range`; `extra_room` tokens
    of each row's remaining room are left for the item's extra questions).

    Returns (tokens [B, seq_len] long, weights [B, seq_len] float): weights[b, t] is the weight of
    predicting tokens[b, t] from the prefix (0 for <bos> and padding, 1 for answer tokens and <eos>,
    PROMPT_WEIGHT for prompt tokens).
    """
    if split != "train":
        raise ValueError("training batches come from split='train'; held-out items: tasks.eval_items")
    if seq_len < MIN_LENGTH + 2:
        raise ValueError(f"seq_len={seq_len} is too short: items need at least {MIN_LENGTH + 2} tokens")
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    tokens = torch.full((batch_size, seq_len), pad, dtype=torch.long)
    weights = torch.zeros(batch_size, seq_len)
    for b in range(batch_size):
        pos = 0
        while seq_len - pos >= MIN_LENGTH + 2:
            room = seq_len - pos - 2
            # Leave room for a few extra questions after the item.
            length = _item_length(max(MIN_LENGTH, room - extra_room), rng)
            item = train_item(length, rng, task=rng.choice(tasks), fact_range=fact_range)
            ids = [bos, *tokenizer.convert_tokens_to_ids(item.prompt.split())]
            w = [0.0] + [PROMPT_WEIGHT] * (len(ids) - 1)
            answer = tokenizer.convert_tokens_to_ids(item.answer.split())
            ids, w = ids + answer + [eos], w + [1.0] * (len(answer) + 1)
            # Extra questions about the same facts, while they fit: `? q <answer> <eos>` each.
            for query, extra_answer in item.extra:
                q = tokenizer.convert_tokens_to_ids(query.split())
                a = tokenizer.convert_tokens_to_ids(extra_answer.split())
                if pos + len(ids) + len(q) + len(a) + 1 > seq_len:
                    break
                ids, w = ids + q + a + [eos], w + [PROMPT_WEIGHT] * len(q) + [1.0] * (len(a) + 1)
            tokens[b, pos : pos + len(ids)] = torch.tensor(ids)
            weights[b, pos : pos + len(ids)] = torch.tensor(w)
            pos += len(ids)
    return tokens, weights


def sample_batch(
    tokenizer, batch_size: int, seq_len: int, rng: random.Random, split: str = "train"
) -> torch.Tensor:
    """Packed rows of task text, [B, seq_len] long (pad = tokenizer.pad_token_id)."""
    return sample_batch_with_weights(tokenizer, batch_size, seq_len, rng, split)[0]


def sample_copy_batch(
    tokenizer, batch_size: int, seq_len: int, rng: random.Random, max_gap: int = COPY_MAX_GAP
) -> tuple[torch.Tensor, torch.Tensor]:
    """Warm-up rows that teach induction ("find this token earlier, copy what followed it"), which
    every task's lookups are made of: COPY_HALF random fact words, 0..max_gap filler words, the same
    words again, segment after segment (one per COPY_ROW-token row with the default gap; long gaps
    teach the same lookup at the distances the tasks need). Weight 1 on the repeated
    words that can be predicted (all but the first), 0 elsewhere. Random words at a random distance
    cannot be predicted by position, only by matching content. Returns (tokens [B, seq_len],
    weights [B, seq_len]) like the task batches.
    """
    bos = tokenizer.bos_token_id
    tokens = torch.full((batch_size, seq_len), tokenizer.pad_token_id, dtype=torch.long)
    weights = torch.zeros(batch_size, seq_len)
    for b in range(batch_size):
        ids, w = [bos], [0.0]
        while seq_len - len(ids) >= 8:
            room = seq_len - len(ids)
            gap = rng.randint(0, max(0, min(max_gap, room - 2 * COPY_HALF)))
            half = min(COPY_HALF, (room - gap) // 2)
            if half < 2:
                break
            words = [rng.choice(COPY_WORDS) for _ in range(half)]
            filler = [rng.choice(FILLER_WORDS) for _ in range(gap)]
            ids += tokenizer.convert_tokens_to_ids(words + filler + words)
            w += [0.0] * (half + gap + 1) + [1.0] * (half - 1)
        tokens[b, : len(ids)] = torch.tensor(ids)
        weights[b, : len(w)] = torch.tensor(w)
    return tokens, weights
