"""Synthetic long-context tasks where what must be remembered is sparse.

Every item is `prompt` + short `answer` over a small closed vocabulary of whitespace-separated words
(one word == one token of the project tokenizer, see `tokenizer.py`). Most of a prompt is random filler
that can be forgotten; a few fact statements, placed far back (at least `TAIL_FILLER` tokens before the
question at long lengths), must be kept. That is exactly what learned KV eviction (DMS) exploits.

- needle:     `k17 42 .` pairs (key, then its value) among filler; `? k17` -> `42`.
- variables:  chains `v3 7 .` ... `v10 v3 .` ... `v22 v10 .` (name, then what it is assigned) among
              filler; `? v22` -> `v10 v3 7` (the chain is written out, one lookup per answer token).
- arithmetic: `v3 7 .` definitions among filler; `? v3 + v8 + v1 =` -> `7 + 5 = 12 + 2 = 14`
              (the steps are written out in the answer).
- trace:      generation-heavy: a program among filler, run by the model, which writes a long trace
              (about 6 tokens per step, hundreds of tokens) whose steps read values it wrote itself
              several windows earlier; the last step answers about an early state (`_trace` below).

A fact is a name immediately followed by its value, and a question ends with the name it asks about,
so every lookup is "find the earlier occurrence of this token, copy what followed it": the induction
pattern small transformers learn first (a `k17 : 42` layout needs a two-token match, which the tiny
model never learnt in our budget; see pipeline/assets/tiny-qwen3/README.md).

Held-out items use item seeds from a range disjoint from training's (`item_seed`) and always the full
number of facts (`FACT_RANGE`'s maximum); training items draw fewer sometimes, which gives the tiny model
an easy version of every task to start from (2 candidate values before 6).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any

TASKS: tuple[str, ...] = ("needle", "variables", "arithmetic")
# Tasks whose answer is a long generated trace (the reasoning regime: the KV cache grows with the
# model's own output). Evaluated with the others; not in TASKS, the committed teacher's training mix.
GENERATION_TASKS: tuple[str, ...] = ("trace",)
EVAL_TASKS: tuple[str, ...] = TASKS + GENERATION_TASKS

# The closed vocabulary. Keys and variables are distinct word families so the model can tell facts
# from filler at a glance; values are the numbers 0..99 (one token each).
NUMBERS: tuple[str, ...] = tuple(str(i) for i in range(100))
KEYS: tuple[str, ...] = tuple(f"k{i}" for i in range(64))
VARIABLES: tuple[str, ...] = tuple(f"v{i}" for i in range(64))
FILLER_WORDS: tuple[str, ...] = (
    "the", "a", "grass", "is", "green", "sky", "blue", "river", "flows", "slowly", "over", "stones",
    "birds", "sing", "in", "morning", "light", "wind", "moves", "through", "tall", "trees", "old",
    "house", "stands", "near", "hill", "children", "play", "by", "quiet", "lake", "clouds", "drift",
    "across", "sun", "warms", "field", "farmer", "walks", "along", "road", "cat", "sleeps", "on",
    "wall", "dog", "runs", "and", "then", "again", "soft", "rain", "falls", "night", "comes", "early",
)
SYMBOLS: tuple[str, ...] = (".", ":", "=", "+", "?")
# Every word an item can contain (the tokenizer must cover all of them).
VOCAB_WORDS: tuple[str, ...] = SYMBOLS + NUMBERS + KEYS + VARIABLES + FILLER_WORDS

# Facts never sit in the last TAIL_FILLER tokens before the question (once the item is long enough),
# so a 32-token sliding window alone cannot answer.
TAIL_FILLER = 48
NEEDLE_PAIRS = 6  # 1 asked + 5 distractor key/value pairs
VARIABLE_CHAINS = 2  # 1 asked + 1 distractor chain
VARIABLE_HOPS = 2  # `v = number`, then HOPS aliases: the answer needs HOPS+1 retrievals
ARITH_DEFS = 5  # variables defined; 3 of them are summed
ARITH_TERMS = 3
# Fact groups per item (needle pairs / variable chains / arithmetic definitions): training draws from
# the range, held-out evaluation always uses the maximum.
FactRange = tuple[int, int]
FACT_RANGE: dict[str, FactRange] = {
    "needle": (1, NEEDLE_PAIRS), "variables": (1, VARIABLE_CHAINS), "arithmetic": (ARITH_TERMS, ARITH_DEFS),
}
# Retrofit (distillation) rows: more fact groups per item, every one of them asked about. The per-token
# KL only rewards keeping a fact at the few tokens that recall it; with the held-out layout (one
# question per item) that signal is too rare and the learned eviction drops the facts (measured in
# pipeline/assets/tiny-qwen3/README.md). Items that are too short for the upper bound get fewer.
RETROFIT_FACT_RANGE: dict[str, FactRange] = {"needle": (6, 16), "variables": (2, 5), "arithmetic": (5, 12)}
_GROUP_TOKENS = {"needle": 3, "variables": 3 * (VARIABLE_HOPS + 1), "arithmetic": 3}
MIN_LENGTH = 64

# Item seeds: training draws from [0, 2**31), held-out evaluation from [2**31, 2**32).
_SPLIT_BASE = {"train": 0, "eval": 2**31}


@dataclass(frozen=True)
class Item:
    prompt: str
    answer: str
    task: str
    length: int  # tokens of prompt + answer (without BOS/EOS)
    # More (query, answer) pairs about the same facts. Training rows ask them after the answer (each
    # answer followed by <eos>) for denser supervision; evaluation asks only the first question.
    extra: tuple[tuple[str, str], ...] = ()


def item_seed(split: str, rng: random.Random) -> int:
    """A per-item seed from the split's own range (train and eval ranges never overlap)."""
    if split not in _SPLIT_BASE:
        raise ValueError(f"unknown split {split!r}: use 'train' or 'eval'")
    return _SPLIT_BASE[split] + rng.randrange(2**31)


def _filler(n: int, rng: random.Random) -> list[str]:
    """n filler tokens: random 'sentences' of 3-8 words, each ending with '.'."""
    out: list[str] = []
    while len(out) < n:
        out.extend(rng.choice(FILLER_WORDS) for _ in range(rng.randint(3, 8)))
        out.append(".")
    return out[:n]


Question = tuple[list[str], list[str]]  # (query words, answer words)


def _needle(rng: random.Random, pairs: int) -> tuple[list[list[str]], list[Question]]:
    keys = rng.sample(KEYS, pairs)
    values = [rng.choice(NUMBERS) for _ in keys]
    facts = [[k, v, "."] for k, v in zip(keys, values, strict=True)]
    rng.shuffle(facts)
    return facts, [(["?", k], [v]) for k, v in zip(keys, values, strict=True)]


def _variables(rng: random.Random, n_chains: int) -> tuple[list[list[str]], list[Question]]:
    names = rng.sample(VARIABLES, n_chains * (VARIABLE_HOPS + 1))
    chains: list[list[list[str]]] = []
    for c in range(n_chains):
        chain_names = names[c * (VARIABLE_HOPS + 1) : (c + 1) * (VARIABLE_HOPS + 1)]
        value = str(rng.randrange(100))
        stmts = [[chain_names[0], value, "."]]
        stmts += [[chain_names[i], chain_names[i - 1], "."] for i in range(1, len(chain_names))]
        chains.append(stmts)
    # Interleave the chains randomly, keeping each chain's own order (a name is defined before use).
    order = [c for c, chain in enumerate(chains) for _ in chain]
    rng.shuffle(order)
    cursor = [0] * len(chains)
    facts = []
    for c in order:
        facts.append(chains[c][cursor[c]])
        cursor[c] += 1
    # Chain ends first (the asked question is the end of chain 0), then the intermediate names. The
    # answer walks the chain back: `? v22` -> `v10 v3 7`.
    hops = [VARIABLE_HOPS] + list(range(VARIABLE_HOPS - 1, -1, -1))
    questions = []
    for h in hops:
        for chain in chains:
            questions.append((["?", chain[h][0]], [chain[hop][1] for hop in range(h, -1, -1)]))
    return facts, questions


def _arithmetic(rng: random.Random, n_defs: int) -> tuple[list[list[str]], list[Question]]:
    names = rng.sample(VARIABLES, n_defs)
    values = [rng.randrange(10) for _ in names]
    facts = [[n, str(v), "."] for n, v in zip(names, values, strict=True)]
    rng.shuffle(facts)
    questions = []
    for _ in range(3):
        terms = rng.sample(range(n_defs), ARITH_TERMS)
        query = ["?"]
        for i, t in enumerate(terms):
            query += (["+"] if i else []) + [names[t]]
        query.append("=")
        # Written-out steps: `a + b = s1 + c = s2`.
        total = values[terms[0]]
        answer = [str(total)]
        for t in terms[1:]:
            total += values[t]
            answer += ["+", str(values[t]), "=", str(total)]
        questions.append((query, answer))
    return facts, questions


# ---- trace: a program the model runs, reading what it wrote itself several windows earlier ----
# Step labels run in a fixed order through TRACE_LABELS (k0..k63, then v0..v63): the next step's label
# is the successor of the last one. The prompt holds, among filler and in random order:
#   roots         `k40 17 .`   a name and its value
#   instructions  `k5 k40 .`   step k5 reads k40: k5 := k40 + 1 (mod 100)
#   the halt      `k9 = k6 .`  at step k9, answer the value of k6 (an early step)
# and asks `? k5` (run from k5). The answer is the trace, one line per step, `label source value label
# value .`, then the halt: `k5 k40 17 k5 18 . k6 k5 ... . k9 = k6 19` (then <eos>). A name followed by
# a number is always that name's value (a root, or the two mentions in a line), and a label in an
# instruction is followed by a name or `=`: every lookup is one induction step. A step's source was last
# mentioned (its line, or a use) at least TRACE_GAP_STEPS steps earlier, so the value it needs lies
# more than TRACE_GAP_STEPS * TRACE_LINE tokens back: a 32-token window alone cannot run the trace.
TRACE_LABELS: tuple[str, ...] = KEYS + VARIABLES
TRACE_ROOTS = 8
TRACE_GAP_STEPS = 6
TRACE_LINE = 6  # tokens per step in the trace
MAX_TRACE_STEPS = len(TRACE_LABELS) - TRACE_ROOTS - 1  # every label distinct, the halt's included
TRACE_FIXED_TOKENS = 3 * TRACE_ROOTS + 4 + 2 + 4  # roots, the halt fact, `? label`, the halt line
TRACE_TOKENS_PER_STEP = 3 + TRACE_LINE  # its instruction in the prompt, its line in the trace
TRACE_FILL = 0.8  # held-out items: steps take 80% of the item, filler the rest


def trace_steps(length_tokens: int) -> int:
    """Steps of a held-out trace item of `length_tokens` tokens (prompt + trace): 88 at 1024, 19 at 256."""
    room = TRACE_FILL * (length_tokens - TRACE_FIXED_TOKENS) / TRACE_TOKENS_PER_STEP
    return max(1, min(MAX_TRACE_STEPS, int(room)))


def run_trace(facts: list[list[str]], start: str) -> list[str]:
    """Execute a trace program (its prompt facts) from step `start`: the answer's words."""
    value = {f[0]: int(f[1]) for f in facts if f[1].isdigit()}
    source = {f[0]: f[1] for f in facts if f[1] in TRACE_LABELS}
    halt = {f[0]: f[2] for f in facts if f[1] == "="}
    words, label = [], start
    while label not in halt:
        src = source[label]
        value[label] = (value[src] + 1) % 100
        words += [label, src, str(value[src]), label, str(value[label]), "."]
        label = TRACE_LABELS[TRACE_LABELS.index(label) + 1]
    return words + [label, "=", halt[label], str(value[halt[label]])]


def _trace(rng: random.Random, n_steps: int) -> tuple[list[list[str]], list[Question]]:
    first = rng.randrange(len(TRACE_LABELS) - n_steps)  # steps first..first+n-1, the halt after them
    steps = TRACE_LABELS[first : first + n_steps]
    halt = TRACE_LABELS[first + n_steps]
    roots = rng.sample(TRACE_LABELS[:first] + TRACE_LABELS[first + n_steps + 1 :], TRACE_ROOTS)
    facts = [[r, str(rng.randrange(100)), "."] for r in roots]
    last_mention = {r: -TRACE_GAP_STEPS for r in roots}  # roots are only in the prompt
    for t, label in enumerate(steps):
        ready = [name for name, at in last_mention.items() if at <= t - TRACE_GAP_STEPS]
        src = rng.choice(ready)
        facts.append([label, src, "."])
        last_mention[src] = last_mention[label] = t
    # The halt asks about an early step (its value written long before the end), else any far name.
    far = [name for name, at in last_mention.items() if at <= n_steps - TRACE_GAP_STEPS]
    early = [name for name in steps[: max(1, n_steps // 3)] if name in far]
    facts.append([halt, "=", rng.choice(early or far), "."])
    answer = run_trace(facts, steps[0])
    rng.shuffle(facts)
    return facts, [(["?", steps[0]], answer)]


_BUILDERS = {"needle": _needle, "variables": _variables, "arithmetic": _arithmetic, "trace": _trace}


def make_item(
    task: str, length_tokens: int, rng: random.Random, tokenizer: Any = None, n_facts: int | None = None
) -> Item:
    """One item of exactly `length_tokens` tokens (prompt + answer, no BOS/EOS).

    `n_facts` (fact groups, within FACT_RANGE[task]; trace: steps, up to trace_steps(length_tokens))
    defaults to the full, held-out difficulty.

    One word is one token of the project tokenizer, so the length is exact without a tokenizer; when
    one is given it is checked against it (a foreign tokenizer would make the length approximate).
    """
    if task not in _BUILDERS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(EVAL_TASKS)}")
    if length_tokens < MIN_LENGTH:
        raise ValueError(f"length_tokens={length_tokens} is too short: items need at least {MIN_LENGTH}")
    if task == "trace":  # steps scale with the length: the held-out item has the most that fit
        low, high = 1, trace_steps(length_tokens)
        n_facts = high if n_facts is None else n_facts
    else:
        low, high = FACT_RANGE[task][0], RETROFIT_FACT_RANGE[task][1]
        n_facts = FACT_RANGE[task][1] if n_facts is None else n_facts
    if not low <= n_facts <= high:
        raise ValueError(f"n_facts={n_facts} is outside {task}'s range {low}..{high}")
    facts, questions = _BUILDERS[task](rng, n_facts)
    (query, answer), extra = questions[0], questions[1:]
    fact_tokens = sum(len(f) for f in facts)
    n_filler = length_tokens - fact_tokens - len(query) - len(answer)
    # Facts go in the front part; the tail before the question is filler only.
    # (A trace's first steps read prompt facts: its tail gets all the filler it can, up to TAIL_FILLER.)
    tail = min(TAIL_FILLER, n_filler if task == "trace" else n_filler // 4)
    front = n_filler - tail
    filler = _filler(n_filler, rng)
    cuts = sorted(rng.randint(0, front) for _ in facts)
    words: list[str] = []
    prev = 0
    for cut, fact in zip(cuts, facts, strict=True):
        words += filler[prev:cut] + fact
        prev = cut
    words += filler[prev:] + query
    item = Item(prompt=" ".join(words), answer=" ".join(answer), task=task, length=len(words) + len(answer),
                extra=tuple((" ".join(q), " ".join(a)) for q, a in extra))
    assert item.length == length_tokens, (item.length, length_tokens)
    if tokenizer is not None:
        n = len(tokenizer(item.prompt + " " + item.answer, add_special_tokens=False)["input_ids"])
        if n != length_tokens:
            item = dataclasses.replace(item, length=n)
    return item


def eval_items(task: str, length: int, n: int, seed: int = 0) -> list[Item]:
    """n held-out items of one task and length (seeds from the eval range; deterministic in seed)."""
    rng = random.Random(f"eval/{task}/{length}/{seed}")
    return [make_item(task, length, random.Random(item_seed("eval", rng))) for _ in range(n)]


def train_item(
    length: int, rng: random.Random, task: str | None = None, fact_range: dict[str, FactRange] = FACT_RANGE
) -> Item:
    """One training item from the training seed range: task (unless given) and number of facts drawn
    uniformly from `fact_range` (pretraining's FACT_RANGE keeps easy items, one needle pair or one
    chain, in the mix); facts take at most half of the item."""
    task = task or rng.choice(TASKS)
    if task == "trace":  # from one step up to a held-out item's number at this length
        low, high = 1, trace_steps(length)
    else:
        low, high = fact_range[task]
        high = min(high, max(low, length // (2 * _GROUP_TOKENS[task])))
    n_facts = rng.randint(low, high)
    return make_item(task, length, random.Random(item_seed("train", rng)), n_facts=n_facts)
