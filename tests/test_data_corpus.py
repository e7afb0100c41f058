"""Packed training batches: shapes, loss weights on answers, determinism."""

import random
import re

import pytest
import torch

from pipeline.data.corpus import PROMPT_WEIGHT, sample_batch, sample_batch_with_weights
from pipeline.data.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(512, seed=0)


def test_rows_are_whole_items_with_answer_weights(tok):
    tokens, weights = sample_batch_with_weights(tok, 3, 512, random.Random(0))
    assert tokens.shape == weights.shape == (3, 512)
    for row, w in zip(tokens.tolist(), weights.tolist(), strict=True):
        assert row[0] == tok.bos_token_id
        n_answers = 0
        for i, (t, wt) in enumerate(zip(row, w, strict=True)):
            if t in (tok.bos_token_id, tok.pad_token_id):
                assert wt == 0.0
            elif t == tok.eos_token_id:  # every answer (main or extra) is weighted 1 and ends with <eos>
                j = i
                while w[j - 1] == 1.0:
                    j -= 1
                # answers follow the asked name (`? k17`, `? v22`) or `=` (arithmetic); lengths: needle 1,
                # variable chains 1/2/3 (`v10 v3 7`), arithmetic 9
                before = tok.convert_ids_to_tokens(row[j - 1])
                assert (before == "=" or re.fullmatch(r"[kv]\d+", before)) and i - j in (1, 2, 3, 9)
                n_answers += 1
            elif wt != 1.0:
                assert wt == pytest.approx(PROMPT_WEIGHT)
        assert n_answers > row.count(tok.bos_token_id)  # extra questions were asked
        pads = [i for i, t in enumerate(row) if t == tok.pad_token_id]
        assert pads == list(range(len(row) - len(pads), len(row)))


def test_sample_batch_is_deterministic_and_validates(tok):
    a = sample_batch(tok, 2, 256, random.Random(5))
    assert a.equal(sample_batch(tok, 2, 256, random.Random(5)))
    assert not a.equal(sample_batch(tok, 2, 256, random.Random(6)))
    with pytest.raises(ValueError, match="too short"):
        sample_batch(tok, 2, 32, random.Random(0))
    with pytest.raises(ValueError, match="split"):
        sample_batch(tok, 2, 256, random.Random(0), split="eval")


def test_copy_rows_repeat_their_words_and_weigh_only_the_predictable_copies(tok):
    from pipeline.data.corpus import COPY_HALF, COPY_WORDS, sample_copy_batch

    tokens, weights = sample_copy_batch(tok, 4, 64, random.Random(3))
    copy_ids = set(tok.convert_tokens_to_ids(list(COPY_WORDS)))
    for row, w in zip(tokens.tolist(), weights.tolist(), strict=True):
        assert row[0] == tok.bos_token_id
        first = row[1 : 1 + COPY_HALF]  # the first segment: words, a filler gap, the same words
        gap = 1 + COPY_HALF
        while row[gap] not in copy_ids:
            gap += 1
        assert set(first) <= copy_ids and gap - 1 - COPY_HALF <= 12
        assert row[gap : gap + COPY_HALF] == first
        assert w[: gap + 1] == [0.0] * (gap + 1) and w[gap + 1 : gap + COPY_HALF] == [1.0] * (COPY_HALF - 1)
        assert set(w) <= {0.0, 1.0}


def test_retrofit_rows_ask_about_more_facts_than_pretraining_rows(tok):
    """The distillation rows are retrieval-dense: more facts per item and more answered questions per
    row than pretraining's, so the KL rewards keeping facts often enough to learn it."""
    from pipeline.data.tasks import FACT_RANGE, RETROFIT_FACT_RANGE
    from pipeline.dms.distill_data import synthetic_batches

    assert all(RETROFIT_FACT_RANGE[t][1] > FACT_RANGE[t][1] for t in FACT_RANGE)
    eos = tok.eos_token_id
    retrofit = synthetic_batches(tok, 4, 1024, seed=0)
    dense = sum(int((retrofit(step) == eos).sum()) for step in range(4))
    plain = sum(int((sample_batch(tok, 4, 1024, random.Random(step)) == eos).sum()) for step in range(4))
    assert dense > 1.5 * plain  # every answer ends with <eos>
    assert retrofit(3).equal(retrofit(3))


def test_retrofit_rows_carry_the_teachers_own_traces():
    """retrofit.teacher_traces: rows of trace prompts followed by the teacher's own greedy trace (not
    the reference), then <eos> and padding; every odd step's first row is the next of them."""
    from transformers import Qwen3ForCausalLM

    from pipeline.data.tasks import train_item
    from pipeline.data.teacher import ASSETS_DIR, greedy_answers
    from pipeline.dms.distill_data import synthetic_batches, teacher_trace_rows
    from pipeline.hf_files import load_tokenizer

    torch.set_num_threads(1)
    tok = load_tokenizer(ASSETS_DIR)
    model = Qwen3ForCausalLM.from_pretrained(str(ASSETS_DIR)).eval()
    rows = teacher_trace_rows(model, tok, 3, 160, seed=4)
    assert rows.shape == (3, 160)
    rng = random.Random("teacher-traces/4")  # the same training-split items
    items = [train_item(rng.randint(80, 158), rng, "trace") for _ in range(3)]
    for row, item, trace in zip(rows.tolist(), items, greedy_answers(model, tok, items), strict=True):
        words = f"{item.prompt} {trace}".split()
        want = [tok.bos_token_id, *tok.convert_tokens_to_ids(words), tok.eos_token_id]
        assert row[: len(want)] == want and set(row[len(want) :]) <= {tok.pad_token_id}
    batches = synthetic_batches(tok, 2, 160, seed=0, teacher_rows=rows)
    assert torch.equal(batches(1)[0], rows[0]) and torch.equal(batches(3)[0], rows[1])
    assert not any(torch.equal(batches(2)[0], r) for r in rows)
    assert torch.equal(batches(2), synthetic_batches(tok, 2, 160, seed=0)(2))
