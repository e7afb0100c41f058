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
from pipeline.dms.distributed import SINGLE_PROCESS, Dist
from pipeline.stages.api import Options, StageContext, cr_label, fingerprint

NAME = "retrofit"
DEPENDS: tuple[str, ...] = ("prepare",)
# 2: retrieval-dense synthetic rows, padding masked out of the KL, checkpoints follow the schedule
# 3: the adapter reads the residual-stream input (before input_layernorm), as the engine does
VERSION = 3

# teacher-answers: how many generated prompts and how long the teacher's answers are.
TEACHER_PROMPTS = 32
TEACHER_ANSWER_TOKENS = 160
HELDOUT_ROWS = 4


def settings(card: Card, options: Options) -> dict[str, Any]:
    out = card_section(card, "family", "dms", "retrofit")
    if card.dms.decision == "adapter":  # the warm start is for borrowed decisions only
        del out["retrofit"]["warm_start"]
    if not card.retrofit.teacher_traces:  # cards without them keep their cached retrofit
        del out["retrofit"]["teacher_traces"]
    out["eval_lengths"] = card.eval.lengths  # the synthetic held-out rows are as long as the longest
    data = card.retrofit_data()
    out["data"] = fingerprint(data) if isinstance(data, Path) else data
    return out


def check_card(card: Card) -> None:
    """The card's retrofit settings, checked before any stage runs (and again by the stage)."""
    validate_card(card)
    card.retrofit_data()
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
    if card.retrofit.nproc_per_node < 0:
        raise CardError(f"{where}: retrofit.nproc_per_node must be >= 1 (or 0: one per visible GPU)")


def _data(
    card: Card, data: str | Path, model, tokenizer, out_dir: Path, state_dir: Path, d: Dist = SINGLE_PROCESS
):
    """(next_batch(step) -> [B, T], heldout [N, T]) for `data` (the card's resolved retrofit.data).

    With several processes each makes the same data (teacher answers: the same greedy generation);
    only rank 0 writes files."""
    from pipeline.dms import distill_data as dd

    r = card.retrofit
    if data == "synthetic":
        length = max(r.seq_len, *card.eval.lengths)
        traces = None
        if r.teacher_traces:
            traces = dd.teacher_trace_rows(model, tokenizer, r.teacher_traces, r.seq_len, r.seed)
        return (
            dd.synthetic_batches(tokenizer, r.batch_size, r.seq_len, r.seed, teacher_rows=traces),
            dd.synthetic_heldout(tokenizer, 8, length, seed=r.seed),
        )
    if data == "teacher-answers":
        cached = state_dir / "teacher_answers.jsonl"
        if cached.is_file():  # an interrupted run already made them (greedy: the same answers)
            records = dd.read_records(cached)
        else:
            prompts = dd.generated_prompts(TEACHER_PROMPTS, seed=r.seed)
            records = dd.teacher_answers(model, tokenizer, prompts, TEACHER_ANSWER_TOKENS, batch_size=32)
            if d.is_main:
                state_dir.mkdir(parents=True, exist_ok=True)
                with open(cached, "w") as fh:
                    for rec in records:
                        fh.write(json.dumps({"messages": rec}) + "\n")
        if d.is_main:
            (out_dir / "distill").mkdir(parents=True, exist_ok=True)
            shutil.copy2(cached, out_dir / "distill" / "teacher_answers.jsonl")
    else:
        records = dd.read_records(Path(data))
    rows = dd.pack_records(tokenizer, records, r.seq_len)
    held = min(HELDOUT_ROWS, max(1, len(rows) // 5))
    return dd.row_batches(rows[:-held], r.batch_size, r.seed), rows[-held:]


def resume_dir(ctx: StageContext) -> Path:
    """Where an interrupted run's state lives: next to the output, keyed like it (the runner gives each
    attempt a fresh temporary output directory, so the state cannot live inside it)."""
    key = ctx.out_dir.name.lstrip(".").split(".tmp-")[0]
    return ctx.out_dir.parent / f".{key}.resume"


def retrofit(card: Card, model_dir: Path, out_dir: Path, state_dir: Path, d: Dist = SINGLE_PROCESS) -> dict:
    """Load, patch, (shard,) train; the checkpoints land in `state_dir/checkpoints`. Runs the same in one
    process and in each process of a `torchrun` group. Returns the training figures."""
    import transformers

    from pipeline.dms.checkpoint import load_config, save_dms_model
    from pipeline.dms.distributed import full_state_dict, shard_model
    from pipeline.dms.patch import check_architecture, patch_model
    from pipeline.dms.train import TrainConfig, train_dms

    config = load_config(model_dir)
    check_architecture(config)  # before loading weights or building data
    torch.manual_seed(card.retrofit.seed)
    model = getattr(transformers, config.architectures[0]).from_pretrained(
        model_dir, config=config, dtype=torch.float32
    ).to(d.device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    data = card.retrofit_data()
    next_batch, heldout = _data(card, data, model, tokenizer, out_dir, state_dir, d)

    patch_model(model, card.dms_config())
    model = shard_model(model, d)

    def save(cr: float, m) -> None:
        # Into the resume directory first: an interrupted run keeps the checkpoints it already made.
        weights = full_state_dict(m, d)  # collective when sharded
        if d.is_main:
            save_dms_model(m, state_dir / "checkpoints" / f"cr{cr_label(cr)}", tokenizer, cr, weights)

    r = card.retrofit
    cfg = TrainConfig(
        steps=r.steps,
        schedule_cr=r.schedule_cr,
        target_cr=card.dms.target_cr,
        checkpoint_crs=tuple(sorted(r.checkpoint_crs)),
        lr=r.lr,
        ramp_steps=r.ramp_steps,
        grad_clip=r.grad_clip,
        logit_clip=r.logit_clip,
        warm_start=r.warm_start and card.dms.decision == "borrowed",
        seed=r.seed,
        rank=d.rank,
        # Synthetic rows end in padding; packed real data has none (and its pad id may be EOS).
        pad_token_id=tokenizer.pad_token_id if data == "synthetic" else None,
    )
    real = card.source.kind != "embedded"
    result = train_dms(
        model, next_batch, heldout, cfg, save, state_dir=state_dir / "train_state", measure_kl=real, d=d
    )
    result["heldout"] = {"sequences": int(heldout.shape[0]), "tokens": int(heldout.shape[1])}
    return result


def processes(card: Card) -> int:
    """How many training processes: the card's retrofit.nproc_per_node, 0 meaning one per visible GPU."""
    n = card.retrofit.nproc_per_node
    return n if n > 0 else max(1, torch.cuda.device_count())


def _torchrun(ctx: StageContext, state_dir: Path, n: int) -> dict:
    """Run `retrofit` in n processes (`torch.distributed.run --standalone`, this machine only) and read
    the figures rank 0 left behind."""
    import signal
    import subprocess
    import sys

    state_dir.mkdir(parents=True, exist_ok=True)
    result_file = state_dir / "result.json"
    result_file.unlink(missing_ok=True)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
        "-m", "pipeline.stages.retrofit",
        "--card", str(ctx.card.path), "--model-dir", str(ctx.inputs["prepare"] / "model"),
        "--out", str(ctx.out_dir), "--state-dir", str(state_dir),
    ]
    print(f"[retrofit] {n} processes: {' '.join(cmd[2:6])} ...", flush=True)
    proc = subprocess.Popen(cmd)
    try:
        returncode = proc.wait()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: torchrun stops its workers before it exits
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    if returncode != 0 or not result_file.is_file():
        raise RuntimeError(
            f"retrofit: the {n}-process torchrun exited with status {returncode} (its output is above); "
            f"set retrofit.nproc_per_node: 1 in {ctx.card.path} to train in one process"
        )
    result = json.loads(result_file.read_text())
    result["saved"] = {float(k): v for k, v in result["saved"].items()}
    return result


def run(ctx: StageContext) -> dict[str, Any]:
    card = ctx.card
    check_card(card)
    state_dir = resume_dir(ctx)
    n = processes(card)
    if n > 1:
        result = _torchrun(ctx, state_dir, n)
    else:
        result = retrofit(card, ctx.inputs["prepare"] / "model", ctx.out_dir, state_dir)
    d = card.dms
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
        "processes": n,
        "checkpoints": checkpoints,
        "measured_cr_by_checkpoint": {cr_label(c): v["measured_cr"] for c, v in sorted(saved.items())},
        "checkpoint_step": {cr_label(c): v["step"] for c, v in sorted(saved.items())},
        "heldout": result["heldout"],
        "decision": d.decision,
        **({"warm_start": card.retrofit.warm_start} if d.decision == "borrowed" else {}),
        "first_step": result.get("first_step"),
    }
    if card.source.kind != "embedded":
        report["mean_kl"] = target["mean_kl"]
        report["mean_kl_by_checkpoint"] = {cr_label(c): v["mean_kl"] for c, v in sorted(saved.items())}
    return report


def main(argv: list[str] | None = None) -> None:
    """One process of a multi-process retrofit (started by `_torchrun`, not by hand)."""
    import argparse

    from pipeline.card import load_card
    from pipeline.dms.distributed import init_from_env, shutdown

    parser = argparse.ArgumentParser(description=main.__doc__)
    for flag in ("--card", "--model-dir", "--out", "--state-dir"):
        parser.add_argument(flag, required=True)
    args = parser.parse_args(argv)
    d = init_from_env()
    try:
        result = retrofit(load_card(args.card), Path(args.model_dir), Path(args.out), Path(args.state_dir), d)
        if d.is_main:
            result["saved"] = {str(k): v for k, v in result["saved"].items()}
            (Path(args.state_dir) / "result.json").write_text(json.dumps(result, indent=1))
    finally:
        shutdown(d)


if __name__ == "__main__":
    main()
