"""The teacher: batched KV-cache greedy decoding equals naive decoding, prepare_embedded's directory and
report, and the committed teacher meets its accuracy target."""

import dataclasses
import random

import pytest
import torch
from transformers import AutoTokenizer, Qwen3ForCausalLM

from pipeline.card import EvalSpec, PretrainSpec, load_card
from pipeline.data.tasks import EVAL_TASKS, TASKS, Item, make_item
from pipeline.data.teacher import ASSETS_DIR, exact_match, greedy_answers, prepare_embedded

TINY = PretrainSpec(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                    intermediate_size=128, vocab_size=512, steps=3, batch_size=2, seq_len=128, seed=0)


@torch.no_grad()
def naive_greedy(model, tok, prompt: str, max_new: int) -> str:
    """One item, no padding, no cache: argmax of a full forward per new token, stop at <eos>."""
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    new: list[int] = []
    for _ in range(max_new):
        nxt = model(input_ids=ids).logits[0, -1].argmax().view(1, 1)
        if nxt.item() == tok.eos_token_id:
            break
        new.append(nxt.item())
        ids = torch.cat([ids, nxt], dim=1)
    return tok.decode(new).strip()


def test_batched_cached_greedy_equals_naive_and_scores_exactly():
    # The committed teacher: its logits are decisive, so float noise between batched/padded and
    # single-item decoding cannot flip an argmax the way it can for a random model's near-ties.
    tok = AutoTokenizer.from_pretrained(str(ASSETS_DIR))
    model = Qwen3ForCausalLM.from_pretrained(str(ASSETS_DIR)).eval()
    rng = random.Random(0)
    # Mixed lengths in one batch exercise left padding.
    items = [make_item(TASKS[i % 3], 64 + 17 * i, rng) for i in range(6)]
    got = greedy_answers(model, tok, items, batch_size=6)
    max_new = max(len(it.answer.split()) for it in items) + 1  # what greedy_answers allows a batch
    for it, answer in zip(items, got, strict=True):
        assert answer == naive_greedy(model, tok, it.prompt, max_new)
    expected = sum(a == it.answer for a, it in zip(got, items, strict=True)) / len(items)
    assert exact_match(model, tok, items, batch_size=6) == expected
    wrong = [Item(it.prompt, it.answer + " 0", it.task, it.length) for it in items]
    assert exact_match(model, tok, wrong, batch_size=6) == 0.0


def test_prepare_embedded_from_scratch_writes_plain_hf_dir(tmp_path):
    card = dataclasses.replace(load_card("tiny-qwen3"), pretrain=TINY,
                               eval=EvalSpec(items_per_task=2, lengths=(64,)))
    report = prepare_embedded(card, tmp_path / "model", from_scratch=True)
    assert report["from_scratch"] is True and report["train_seconds"] >= 0
    assert set(report["accuracy"]) == set(EVAL_TASKS)  # the trace task is measured too
    assert set(report["accuracy_by_length"]["needle"]) == {64, 128}
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "model"))
    model = Qwen3ForCausalLM.from_pretrained(str(tmp_path / "model"))
    assert report["params"] == sum(p.numel() for p in model.parameters())
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert tok.eos_token_id == model.config.eos_token_id == 2


@pytest.mark.slow
def test_committed_teacher_reaches_target_at_1024(tmp_path):
    """The committed teacher: >= 90% exact match per task on held-out items at 1024 tokens (the 50
    items of eval.json: 98% / 94% / 92% when it was committed)."""
    assert (ASSETS_DIR / "model.safetensors").stat().st_size <= 20 * 2**20
    card = load_card("tiny-qwen3")
    card = dataclasses.replace(card, eval=EvalSpec(items_per_task=50, lengths=(1024,)))
    report = prepare_embedded(card, tmp_path / "model", from_scratch=False)
    config = Qwen3ForCausalLM.from_pretrained(str(tmp_path / "model")).config
    assert config.num_attention_heads // config.num_key_value_heads >= 2 and config.head_dim >= 32
    for task in TASKS:
        assert report["accuracy"][task] >= 0.9, report["accuracy_by_length"]


@pytest.mark.parametrize(
    "prompt, answer",
    [  # the README's and the serve banner's examples: they must stay right
        ("k5 31 . the grass is green . k9 77 . ? k9", "77"),
        ("k5 31 . the grass is green . k9 77 . ? k5", "31"),
        ("v3 7 . v10 v3 . ? v10", "v3 7"),
    ],
)
def test_committed_teacher_answers_the_documented_examples(prompt, answer):
    tok = AutoTokenizer.from_pretrained(str(ASSETS_DIR))
    model = Qwen3ForCausalLM.from_pretrained(str(ASSETS_DIR)).eval()
    assert naive_greedy(model, tok, prompt, max_new=6) == answer


def test_trace_token_accuracy_scores_each_role():
    """Per-role teacher-forced accuracy on trace answers: an oracle that predicts the reference gets 1.0
    everywhere; the committed teacher, never trained on traces, finds no next label."""
    from types import SimpleNamespace

    import torch

    from pipeline.data.tasks import eval_items
    from pipeline.data.teacher import TRACE_ROLES, trace_token_accuracy

    tok = AutoTokenizer.from_pretrained(str(ASSETS_DIR))
    items = eval_items("trace", 256, 2, seed=1)
    full = {it.prompt: tok(f"{it.prompt} {it.answer}")["input_ids"] for it in items}

    class Oracle(torch.nn.Module):
        def forward(self, input_ids):
            ids = input_ids[0].tolist()
            ref = next(r for r in full.values() if r[: len(ids)] == ids)
            nxt = torch.tensor(ref[1 : len(ids)] + [0])
            return SimpleNamespace(logits=torch.nn.functional.one_hot(nxt, len(tok)).float()[None])

    assert trace_token_accuracy(Oracle(), tok, items) == {r: 1.0 for r in (*TRACE_ROLES, "halt value")}
    teacher = Qwen3ForCausalLM.from_pretrained(str(ASSETS_DIR)).eval()
    assert trace_token_accuracy(teacher, tok, items)["label"] == 0.0
