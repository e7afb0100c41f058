"""Packed training batches: shapes, loss weights on answers, determinism."""

import random

import pytest

from pipeline.data.corpus import PROMPT_WEIGHT, sample_batch, sample_batch_with_weights
from pipeline.data.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(512, seed=0)


def test_rows_are_whole_items_with_answer_weights(tok):
    tokens, weights = sample_batch_with_weights(tok, 3, 512, random.Random(0))
    assert tokens.shape == weights.shape == (3, 512)
    for row, w in zip(tokens.tolist(), weights.tolist(), strict=True):
        starts = [i for i, t in enumerate(row) if t == tok.bos_token_id]
        assert starts[0] == 0
        for s in starts:
            end = row.index(tok.eos_token_id, s)
            answer = [t for t, wt in zip(row[s:end], w[s:end], strict=True) if wt == 1.0]
            prompt = tok.decode(row[s + 1 : end - len(answer)])
            assert w[end] == 1.0 and w[s] == 0.0 and w[s + 1] == pytest.approx(PROMPT_WEIGHT)
            assert prompt.split()[-1] in (":", "=") and len(answer) in (1, 9)
        pads = [i for i, t in enumerate(row) if t == tok.pad_token_id]
        assert all(w[i] == 0.0 for i in pads) and pads == list(range(len(row) - len(pads), len(row)))


def test_sample_batch_is_deterministic_and_validates(tok):
    a = sample_batch(tok, 2, 256, random.Random(5))
    assert a.equal(sample_batch(tok, 2, 256, random.Random(5)))
    assert not a.equal(sample_batch(tok, 2, 256, random.Random(6)))
    with pytest.raises(ValueError, match="too short"):
        sample_batch(tok, 2, 32, random.Random(0))
    with pytest.raises(ValueError, match="split"):
        sample_batch(tok, 2, 256, random.Random(0), split="eval")
