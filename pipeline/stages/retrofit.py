"""retrofit: train DMS eviction into the prepared base model; one run, one checkpoint per requested CR.

Reads `<prepare>/model`, writes `<out>/checkpoints/cr<N>/` (HF DMS directories with tokenizer, the
dms_* config keys of NVIDIA's format) and `<out>/distill/` (the held-out rows used for measuring).
Checks everything that can be wrong with the card or the model before the first training step.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from pipeline.card import Card, CardError, card_section, validate_card
from pipeline.runner import Options, StageContext

NAME = "retrofit"
DEPENDS: tuple[str, ...] = ("prepare",)
VERSION = 1

# teacher-answers: how many generated prompts and how long the teacher's answers are.
TEACHER_PROMPTS = 32
TEACHER_ANSWER_TOKENS = 160
HELDOUT_ROWS = 4


def settings(card: Card, options: Options) -> dict[str, Any]:
    return card_section(card, "family", "dms", "retrofit", "eval")


def cr_label(cr: float) -> str:
    """2.0 -> "2", 2.5 -> "2.5" (docs/CONTRACTS.md)."""
    return f"{float(cr):g}"


def check_card(card: Card) -> None:
    """The card's retrofit settings, checked before any work."""
    validate_card(card)
    where = card.path or card.name
    if card.dms.target_cr not in card.retrofit.checkpoint_crs:
        raise CardError(
            f"{where}: retrofit.checkpoint_crs must include dms.target_cr ({card.dms.target_cr:g})"
        )
    if max(card.retrofit.checkpoint_crs) > card.retrofit.schedule_cr:
        raise CardError(
            f"{where}: retrofit.schedule_cr ({card.retrofit.schedule_cr:g}) is below the largest "
            f"checkpoint CR "
            f"({max(card.retrofit.checkpoint_crs):g}); the schedule would never ask for it"
        )
    if card.retrofit.steps < 1 or card.retrofit.lr <= 0:
        raise CardError(f"{where}: retrofit.steps must be >= 1 and retrofit.lr > 0")
    if not 0 <= card.retrofit.ramp_steps <= card.retrofit.steps:
        raise CardError(f"{where}: retrofit.ramp_steps must be between 0 (all steps) and retrofit.steps")


def _data(card: Card, model, tokenizer, out_dir: Path, state_dir: Path):
    """(next_batch(step) -> [B, T], heldout [N, T]) for the card's retrofit.data."""
    from pipeline.dms import distill_data as dd

    r = card.retrofit
    if r.data == "synthetic":
        length = max(r.seq_len, *card.eval.lengths)
        return (
            dd.synthetic_batches(tokenizer, r.batch_size, r.seq_len, r.seed),
            dd.synthetic_heldout(tokenizer, 8, length, seed=r.seed),
        )
    if r.data == "teacher-answers":
        cached = state_dir / "teacher_answers.jsonl"
        if cached.is_file():  # an interrupted run already made them (greedy: the same answers)
            records = dd.read_records(cached)
        else:
            prompts = dd.generated_prompts(TEACHER_PROMPTS, seed=r.seed)
            records = dd.teacher_answers(model, tokenizer, prompts, TEACHER_ANSWER_TOKENS, batch_size=32)
            state_dir.mkdir(parents=True, exist_ok=True)
            with open(cached, "w") as fh:
                for rec in records:
                    fh.write(json.dumps({"messages": rec}) + "\n")
        (out_dir / "distill").mkdir(parents=True, exist_ok=True)
        shutil.copy2(cached, out_dir / "distill" / "teacher_answers.jsonl")
    else:
        path = Path(r.data).expanduser()
        if not path.exists():
            raise CardError(
                f"{card.path}: retrofit.data {r.data!r} is not 'synthetic', 'teacher-answers' "
                "or an existing JSONL file / datasets directory"
            )
        records = dd.read_records(path)
    rows = dd.pack_records(tokenizer, records, r.seq_len)
    held = min(HELDOUT_ROWS, max(1, len(rows) // 5))
    return dd.row_batches(rows[:-held], r.batch_size, r.seed), rows[-held:]


def resume_dir(ctx: StageContext) -> Path:
    """Where an interrupted run's state lives: next to the output, keyed like it (the runner gives each
    attempt a fresh temporary output directory, so the state cannot live inside it)."""
    key = ctx.out_dir.name.lstrip(".").split(".tmp-")[0]
    return ctx.out_dir.parent / f".{key}.resume"


def run(ctx: StageContext) -> dict[str, Any]:
    import transformers

    from pipeline.dms.checkpoint import load_config, save_dms_model
    from pipeline.dms.patch import DmsSettings, check_architecture, patch_model
    from pipeline.dms.train import TrainConfig, train_dms

    card = ctx.card
    check_card(card)
    model_dir = ctx.inputs["prepare"] / "model"
    config = load_config(model_dir)
    check_architecture(config)  # before loading weights or building data
    torch.manual_seed(card.retrofit.seed)
    model = getattr(transformers, config.architectures[0]).from_pretrained(
        model_dir, config=config, dtype=torch.float32
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    state_dir = resume_dir(ctx)
    next_batch, heldout = _data(card, model, tokenizer, ctx.out_dir, state_dir)

    d = card.dms
    patch_model(
        model,
        DmsSettings(
            window=d.window,
            separate_alpha=d.decision == "adapter",
            alpha_per=d.alpha_per,
            alpha_scale=d.alpha_scale,
            initial_alpha_offset=d.initial_alpha_offset,
            tau=d.tau,
        ),
    )
    model.config.dms_paged_attention_block_size = card.build.kv_block_size

    def save(cr: float, m) -> None:
        # Into the resume directory first: an interrupted run keeps the checkpoints it already made.
        save_dms_model(m, state_dir / "checkpoints" / f"cr{cr_label(cr)}", tokenizer, target_cr=cr)

    r = card.retrofit
    cfg = TrainConfig(
        steps=r.steps,
        schedule_cr=r.schedule_cr,
        target_cr=d.target_cr,
        checkpoint_crs=tuple(sorted(r.checkpoint_crs)),
        lr=r.lr,
        ramp_steps=r.ramp_steps,
        grad_clip=r.grad_clip,
        seed=r.seed,
    )
    real = card.source.kind != "embedded"
    result = train_dms(
        model, next_batch, heldout, cfg, save, state_dir=state_dir / "train_state", measure_kl=real
    )
    saved = result["saved"]
    checkpoints = {cr_label(c): f"checkpoints/cr{cr_label(c)}" for c in sorted(saved)}
    shutil.move(state_dir / "checkpoints", ctx.out_dir / "checkpoints")
    shutil.rmtree(state_dir)
    target = saved[float(d.target_cr)]
    report = {
        "target_cr": d.target_cr,
        "measured_cr": target["measured_cr"],
        "steps": result["steps"],
        "seconds": result["seconds"],
        "final_loss": result["final_loss"],
        "checkpoints": checkpoints,
        "measured_cr_by_checkpoint": {cr_label(c): v["measured_cr"] for c, v in sorted(saved.items())},
        "checkpoint_step": {cr_label(c): v["step"] for c, v in sorted(saved.items())},
        "heldout": {"sequences": int(heldout.shape[0]), "tokens": int(heldout.shape[1])},
        "decision": d.decision,
    }
    if real:
        report["mean_kl"] = target["mean_kl"]
        report["mean_kl_by_checkpoint"] = {cr_label(c): v["mean_kl"] for c, v in sorted(saved.items())}
    return report
