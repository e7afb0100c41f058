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


# ---- trace: the generation-heavy task ----

LABEL_ORDER = [f"k{i}" for i in range(64)] + [f"v{i}" for i in range(64)]


def run_program(prompt: str) -> str:
    """An independent interpreter: reads the program from the prompt and writes the expected trace."""
    body, start = prompt.split(" ? ")
    value = {n: int(v) for n, v in re.findall(r"\b([kv]\d+) (\d+) \.", body)}
    source = dict(re.findall(r"\b([kv]\d+) ([kv]\d+) \.", body))
    halt = dict(re.findall(r"\b([kv]\d+) = ([kv]\d+) \.", body))
    out, label = [], start
    while label not in halt:
        value[label] = (value[source[label]] + 1) % 100
        out.append(f"{label} {source[label]} {value[source[label]]} {label} {value[label]} .")
        label = LABEL_ORDER[LABEL_ORDER.index(label) + 1]
    out.append(f"{label} = {halt[label]} {value[halt[label]]}")
    return " ".join(out)


@pytest.mark.parametrize("length", [64, 256, 1024])
def test_trace_answer_is_the_program_run(length):
    rng = random.Random(3)
    for _ in range(20):
        item = make_item("trace", length, rng)
        assert item.length == length == len(item.prompt.split()) + len(item.answer.split())
        assert run_program(item.prompt) == item.answer
    for i in range(20):  # training items too, any number of steps
        item = train_item(length, random.Random(i), "trace")
        assert run_program(item.prompt) == item.answer


def test_trace_is_long_at_the_longest_setting():
    items = eval_items("trace", 1024, 10)
    assert min(len(it.answer.split()) for it in items) >= 500  # 88 steps of 6 tokens, and the halt
    assert {len(it.answer.split()) for it in eval_items("trace", 256, 10)} == {118}


def test_trace_values_lie_beyond_a_window():
    """Every value a step reads, and the one the final answer reads, was last written more than 32 tokens
    (the DMS window) before the token that needs it: a sliding window alone cannot run the trace. The
    final answer reads a value the model itself wrote (an early step's), not a prompt fact."""
    window = 32
    for item in eval_items("trace", 1024, 10) + eval_items("trace", 256, 10):
        words = item.prompt.split() + item.answer.split()
        first = len(item.prompt.split())
        # Values read by name: a line's `source value` and the halt's value (a line's `label value` is
        # computed from the value two tokens before it).
        needs = [p for p in range(first, len(words)) if words[p].isdigit() and words[p - 1] != words[p - 4]]
        assert needs[-1] == len(words) - 1
        for p in needs:
            name = words[p - 1]
            before = [q for q in range(p - 1) if words[q] == name and words[q + 1].isdigit()]
            assert before, (name, p)
            assert p - before[-1] > window, (name, p - before[-1])
        halt_name, halt_pos = words[-2], len(words) - 1
        written = [q for q in range(first, halt_pos - 1) if words[q] == halt_name and words[q + 1].isdigit()]
        assert written and halt_pos - written[0] > 200 or len(item.answer.split()) < 200


def test_trace_items_are_held_out_and_steps_are_checked():
    a = eval_items("trace", 256, 5, seed=3)
    assert a == eval_items("trace", 256, 5, seed=3) and a != eval_items("trace", 256, 5, seed=4)
    train = {train_item(256, random.Random(i), "trace").prompt for i in range(50)}
    assert not train & {it.prompt for it in a}
    with pytest.raises(ValueError, match="n_facts=20 is outside trace's range 1..19"):
        make_item("trace", 256, random.Random(0), n_facts=20)
