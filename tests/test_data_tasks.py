"""Synthetic tasks and tokenizer: exact lengths, answers that follow from the prompt, sparse far facts."""

import random
import re

import pytest

from pipeline.data.tasks import (
    FACT_RANGE,
    TAIL_FILLER,
    TASKS,
    VARIABLE_HOPS,
    VOCAB_WORDS,
    eval_items,
    item_seed,
    make_item,
    train_item,
)
from pipeline.data.tokenizer import save_tokenizer, train_tokenizer
from pipeline.hf_files import load_tokenizer


def solve(prompt: str) -> str:
    """An independent reference solver: reads the facts from the prompt and answers the question."""
    words = prompt.split()
    q = len(words) - 1 - words[::-1].index("?")
    body, query = " ".join(words[:q]), words[q + 1 :]
    if query[0].startswith("k"):  # needle: `k17 42 .` ... `? k17`
        return re.search(rf"\b{query[0]} (\d+) \.", body).group(1)
    defs = dict(re.findall(r"\b(v\d+) (\w+) \.", body))  # `name value .`, the last one wins
    if len(query) == 1:  # variables: follow the chain to a number, writing each step
        steps = [defs[query[0]]]
        while not steps[-1].isdigit():
            steps.append(defs[steps[-1]])
        return " ".join(steps)
    values = [int(defs[v]) for v in query[:-1:2]]  # arithmetic: a + b + c =
    steps, total = [str(values[0])], values[0]
    for v in values[1:]:
        total += v
        steps += ["+", str(v), "=", str(total)]
    return " ".join(steps)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [64, 300, 1024])
def test_items_have_exact_length_and_solvable_answer(task, length):
    rng = random.Random(7)
    for _ in range(20):
        item = make_item(task, length, rng)
        assert item.task == task and item.length == length
        assert len(item.prompt.split()) + len(item.answer.split()) == length
        assert solve(item.prompt) == item.answer
        for query, answer in item.extra:  # extra training questions about the same facts
            assert solve(f"{item.prompt} {item.answer} {query}") == answer


@pytest.mark.parametrize("task", TASKS)
def test_facts_sit_far_back_among_filler(task):
    """At 1024 tokens no fact is within TAIL_FILLER (> a 32-token window) tokens of the question."""
    for item in eval_items(task, 1024, 10):
        words = item.prompt.split()
        q = words.index("?")
        tail = words[q - TAIL_FILLER : q]
        assert not any(re.fullmatch(r"[kv]\d+|\d+|[:=]", w) for w in tail), tail
        fact_words = sum(bool(re.fullmatch(r"[kv]\d+", w)) for w in words[:q])
        assert fact_words < 0.05 * len(words)  # sparse: almost everything is filler


def test_eval_items_are_deterministic_and_held_out():
    a, b = eval_items("needle", 256, 5, seed=3), eval_items("needle", 256, 5, seed=3)
    assert a == b and eval_items("needle", 256, 5, seed=4) != a
    rng = random.Random(0)
    assert all(item_seed("train", rng) < 2**31 <= item_seed("eval", rng) for _ in range(100))
    train = {train_item(256, random.Random(i), "needle").prompt for i in range(50)}
    assert not train & {it.prompt for it in eval_items("needle", 256, 50)}


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="unknown task"):
        make_item("sorting", 128, random.Random(0))
    with pytest.raises(ValueError, match="too short"):
        make_item("needle", 10, random.Random(0))
    with pytest.raises(ValueError, match="n_facts=17 is outside needle's range 1..16"):
        make_item("needle", 128, random.Random(0), n_facts=17)


def fact_count(item) -> int:
    return len(re.findall(r"\b[kv]\d+ \w+ \.", item.prompt))


def test_training_mixes_easy_items_and_evaluation_uses_the_full_task():
    """Training draws the number of facts from FACT_RANGE (one needle pair up to six); held-out items
    always carry the maximum, so the reported accuracy is on the hardest version."""
    for task, (low, high) in FACT_RANGE.items():
        per_group = 1 if task != "variables" else VARIABLE_HOPS + 1  # a chain is HOPS + 1 statements
        assert {fact_count(it) for it in eval_items(task, 256, 20)} == {high * per_group}
        train = {fact_count(train_item(256, random.Random(i), task)) for i in range(60)}
        assert train == {n * per_group for n in range(low, high + 1)}


def test_tokenizer_one_word_one_token_and_hf_round_trip(tmp_path):
    tok = train_tokenizer(512, seed=0)
    assert tok.convert_tokens_to_ids(list(VOCAB_WORDS)).count(tok.unk_token_id) == 0
    save_tokenizer(tok, tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 0)
    item = make_item("arithmetic", 200, random.Random(1), tokenizer=loaded)
    assert item.length == 200
    ids = loaded(item.prompt)["input_ids"]
    assert ids[0] == loaded.bos_token_id and len(ids) == 1 + len(item.prompt.split())
    assert loaded.decode(loaded(item.answer, add_special_tokens=False)["input_ids"]) == item.answer
    assert train_tokenizer(512, seed=0).get_vocab() == tok.get_vocab()  # deterministic
