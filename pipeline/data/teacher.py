"""The embedded teacher (tiny-qwen3): train it from nothing, or copy the committed one; measure it.

`prepare_embedded` is what the `prepare` stage calls. Run as a module to (re)produce the committed
teacher:  .venv/bin/python -m pipeline.data.teacher --out pipeline/assets/tiny-qwen3
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import Qwen3ForCausalLM

from pipeline.card import Card, CardError, load_card
from pipeline.data.pretrain import build_model, pretrain, train_trace_phase
from pipeline.data.tasks import EVAL_TASKS, Item, eval_items
from pipeline.data.tokenizer import save_tokenizer, train_tokenizer
from pipeline.hf_files import load_tokenizer

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny-qwen3"
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json")


@torch.no_grad()
def greedy_answers(model: Qwen3ForCausalLM, tokenizer, items: list[Item], batch_size: int = 25) -> list[str]:
    """Greedy completions (HF generate, left-padded batches, KV cache), cut at <eos>, decoded."""
    model.eval()
    tokenizer.padding_side = "left"  # generation appends on the right
    answers: list[str] = []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        enc = tokenizer([it.prompt for it in batch], return_tensors="pt", padding=True)
        max_new = max(len(tokenizer(it.answer, add_special_tokens=False)["input_ids"]) for it in batch) + 1
        out = model.generate(
            **enc, max_new_tokens=max_new, do_sample=False, use_cache=True,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers


def exact_match(model: Qwen3ForCausalLM, tokenizer, items: list[Item], batch_size: int = 25) -> float:
    """Fraction of items whose greedy completion equals the answer exactly."""
    if not items:
        raise ValueError("exact_match needs at least one item")
    answers = greedy_answers(model, tokenizer, items, batch_size)
    return sum(a == it.answer for a, it in zip(answers, items, strict=True)) / len(items)


# A trace line's tokens, by what producing each one takes (pipeline/data/tasks.py, `_trace`).
TRACE_ROLES = ("label", "source", "source value", "label again", "new value", "end of line")


@torch.no_grad()
def trace_token_accuracy(model: Qwen3ForCausalLM, tokenizer, items: list[Item]) -> dict[str, float]:
    """Teacher-forced next-token accuracy over trace answers, per TRACE_ROLES role and for the halt's
    answer: which lookup a model has not learnt yet (exact match needs every token of ~530 right)."""
    model.eval()
    hits: dict[str, list[bool]] = {r: [] for r in (*TRACE_ROLES, "halt value")}
    for item in items:
        prompt = tokenizer(item.prompt)["input_ids"]
        answer = tokenizer.convert_tokens_to_ids(item.answer.split())
        ids = torch.tensor([prompt + answer])
        pred = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].argmax(-1).tolist()
        for i, (p, want) in enumerate(zip(pred, answer, strict=True)):
            role = "halt value" if i == len(answer) - 1 else TRACE_ROLES[i % len(TRACE_ROLES)]
            if i < len(answer) - 4 or role == "halt value":  # the halt line's other tokens are format
                hits[role].append(p == want)
    return {r: sum(h) / len(h) for r, h in hits.items() if h}


def evaluate_tasks(
    model: Qwen3ForCausalLM, tokenizer, lengths: list[int], n_items: int, seed: int = 0,
    tasks: tuple[str, ...] = EVAL_TASKS,
) -> tuple[dict[str, float], dict[str, dict[int, float]]]:
    """Held-out exact match per task and length; `accuracy` is at the longest length."""
    by_length: dict[str, dict[int, float]] = {t: {} for t in tasks}
    with tqdm(total=len(tasks) * len(lengths), desc="teacher eval") as bar:
        for task in tasks:
            for length in sorted(lengths):
                items = eval_items(task, length, n_items, seed)
                by_length[task][length] = exact_match(model, tokenizer, items)
                bar.update()
    longest = max(lengths)
    return {t: by_length[t][longest] for t in tasks}, by_length


def train_teacher(card: Card, out_dir: Path, save_every: int = 0) -> dict[str, Any]:
    """Train tokenizer + model from nothing per card.pretrain and save them as a plain HF dir."""
    if card.pretrain is None:
        raise ValueError(f"card {card.name} has no `pretrain` section; the embedded source needs one")
    spec = card.pretrain
    tokenizer = train_tokenizer(spec.vocab_size, spec.seed)
    model = build_model(spec, tokenizer)

    def save(stats: dict[str, Any]) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out_dir), safe_serialization=True)
        save_tokenizer(tokenizer, out_dir)
        (out_dir / "training_log.json").write_text(json.dumps(stats, indent=1) + "\n")

    stats = pretrain(model, tokenizer, spec, save_every=save_every, save=save)
    save({**stats, "steps_done": spec.steps})
    return stats


def trace_phase(card: Card, teacher_dir: Path, out_dir: Path, steps: int, lr: float,
                probe_every: int = 100, probe_items: int = 8) -> dict[str, Any]:
    """Train the teacher in `teacher_dir` on the trace mixture (`pretrain.train_trace_phase`) and save
    it, with its curve and probes (held-out exact match at 1024 tokens), to `out_dir`."""
    if steps < 1:
        raise ValueError(f"--trace-steps {steps}: the trace phase needs at least one step")
    tokenizer = load_tokenizer(teacher_dir)
    model = Qwen3ForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32)

    def probe(step: int) -> dict[str, Any]:
        accuracy, _ = evaluate_tasks(model, tokenizer, [card.pretrain.seq_len], probe_items, seed=1)
        short = exact_match(model, tokenizer, eval_items("trace", 256, probe_items, seed=1))
        stats = {"accuracy_1024": accuracy, "trace_256": short}
        save({"partial": True, "steps_done": step, "probe": stats})
        return stats

    def save(stats: dict[str, Any]) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))
        (out_dir / "trace_log.json").write_text(json.dumps(stats, indent=1) + "\n")

    stats = train_trace_phase(model, tokenizer, card.pretrain, steps, lr, probe_every=probe_every,
                              probe=probe)
    save({**stats, "steps_done": steps, "lr": lr, "from": str(teacher_dir)})
    return stats


def _eval_lengths(card: Card) -> list[int]:
    lengths = set(card.eval.lengths)
    if card.pretrain is not None:
        lengths.add(card.pretrain.seq_len)
    return sorted(lengths)


# The card's pretrain fields and the committed teacher's config.json keys they must equal.
_SHAPE_KEYS = {
    "hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim", "intermediate_size": "intermediate_size",
    "vocab_size": "vocab_size",
}  # fmt: skip


def _check_committed_shape(card: Card) -> None:
    """The committed teacher is one model: a card that describes another shape needs --from-scratch
    (otherwise its `pretrain` section would be silently ignored)."""
    committed = json.loads((ASSETS_DIR / "config.json").read_text())
    differ = [
        f"pretrain.{field} {getattr(card.pretrain, field)} (committed: {committed.get(key)})"
        for field, key in _SHAPE_KEYS.items()
        if committed.get(key) != getattr(card.pretrain, field)
    ]
    if differ:
        raise CardError(
            f"{card.path}: {', '.join(differ)}: the card describes another model than the committed "
            "teacher; run with --from-scratch to pretrain it (about 20 minutes on 2 cores)"
        )


def prepare_embedded(card: Card, model_dir: Path, from_scratch: bool) -> dict[str, Any]:
    """Leave the teacher in model_dir (HF safetensors + tokenizer) and return its report figures."""
    report: dict[str, Any] = {"from_scratch": from_scratch}
    if from_scratch:
        stats = train_teacher(card, model_dir)
        report["train_seconds"] = round(stats["train_seconds"], 1)
    else:
        needed = ("config.json", "model.safetensors", "tokenizer.json")
        missing = [f for f in needed if not (ASSETS_DIR / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"the committed teacher in {ASSETS_DIR} lacks {', '.join(missing)}; rebuild it with "
                f"`.venv/bin/python -m pipeline.data.teacher --out {ASSETS_DIR}` or run with --from-scratch"
            )
        _check_committed_shape(card)
        model_dir.mkdir(parents=True, exist_ok=True)
        for name in _MODEL_FILES:
            if (ASSETS_DIR / name).is_file():
                shutil.copy2(ASSETS_DIR / name, model_dir / name)
    tokenizer = load_tokenizer(model_dir)
    model = Qwen3ForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    report["params"] = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    n_items = card.eval.items_per_task
    accuracy, by_length = evaluate_tasks(model, tokenizer, _eval_lengths(card), n_items)
    report["accuracy"], report["accuracy_by_length"] = accuracy, by_length
    report["eval_seconds"] = round(time.perf_counter() - start, 1)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Pretrain the embedded tiny Qwen3 teacher from nothing.")
    parser.add_argument("--out", type=Path, required=True, help="output HF directory")
    parser.add_argument("--card", default="tiny-qwen3", help="card name or YAML path (its `pretrain:`)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--eval-items", type=int, default=100, help="held-out items per task and length")
    parser.add_argument("--save-every", type=int, default=50, help="checkpoint to --out every N steps")
    parser.add_argument("--eval-only", action="store_true", help="only measure the model already in --out")
    parser.add_argument("--trace-from", type=Path, help="run only the trace phase, from this teacher")
    parser.add_argument("--trace-steps", type=int, default=0, help="steps of the trace phase (0: none)")
    parser.add_argument("--trace-lr", type=float, default=1e-3, help="peak lr of the trace phase")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    card = load_card(args.card)
    train_seconds = None
    if args.trace_from is not None:
        train_seconds = round(trace_phase(card, args.trace_from, args.out, args.trace_steps, args.trace_lr,
                                          args.save_every)["train_seconds"], 1)
    elif not args.eval_only:
        train_seconds = round(train_teacher(card, args.out, args.save_every)["train_seconds"], 1)
    tokenizer = load_tokenizer(args.out)
    model = Qwen3ForCausalLM.from_pretrained(str(args.out), dtype=torch.float32)
    lengths = sorted({64, 256, 512, *_eval_lengths(card)})
    accuracy, by_length = evaluate_tasks(model, tokenizer, lengths, args.eval_items)
    result = {"train_seconds": train_seconds, "accuracy": accuracy, "accuracy_by_length": by_length,
              "params": sum(p.numel() for p in model.parameters())}
    (args.out / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
