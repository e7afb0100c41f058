"""Which decision mode a real model should retrofit with: borrowed (cold), borrowed with the warm start,
and adapters, trained with the same steps and CR schedule and measured the same way.

    python -m pipeline.eval.decision_modes --card smollm2-135m --steps 160 --ramp-steps 120 --schedule-cr 8

Each mode is the card with `dms.decision` / `retrofit.warm_start` and the shortened schedule swapped in,
retrofitted by the pipeline's own stages (`build/<card>-<mode>/`, cached like any build). Every checkpoint
is then measured against vanilla: mean KL and greedy token match over generated tokens (pipeline.eval.
agreement) and passkey retrieval (pipeline.eval.passkey), on one engine. No baselines: this compares the
modes, `evaluate` compares DMS with them. Writes `decision_modes.json` and `decision_modes.md`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Any

# (mode name, dms.decision, retrofit.warm_start)
MODES: tuple[tuple[str, str, bool], ...] = (
    ("borrowed-cold", "borrowed", False),
    ("borrowed-warm", "borrowed", True),
    ("adapter", "adapter", True),
)


def mode_card(card, mode: str, decision: str, warm_start: bool, schedule: dict[str, Any]):
    """`card` retrofitted in one decision mode with the comparison's schedule."""
    return dataclasses.replace(
        card,
        name=f"{card.name}-{mode}",
        dms=dataclasses.replace(card.dms, decision=decision),
        retrofit=dataclasses.replace(card.retrofit, warm_start=warm_start, **schedule),
    )


def passkey_accuracy(engine, tokenizer, items, batch_size: int) -> dict[str, float]:
    """{length: accuracy %, ..., "cr": measured CR over all items}."""
    from pipeline.eval.harness import run_items
    from pipeline.eval.passkey import passkey_correct
    from pipeline.eval.summary import combine_cr

    results = run_items(engine, tokenizer, items, "m", "1", batch_size, score=passkey_correct)
    out: dict[str, float] = {}
    for length in sorted({r.length for r in results}):
        mine = [r for r in results if r.length == length]
        out[str(length)] = round(100.0 * sum(r.correct for r in mine) / len(mine), 2)
    out["cr"] = round(combine_cr(r.measured_cr for r in results), 4)
    return out


def measure_modes(card, base_dir: Path, builds: dict[str, dict[str, Path]], lengths, items_per_length: int,
                  n_prompts: int, new_tokens: int) -> dict[str, Any]:
    """Vanilla and every (mode, checkpoint): passkey and agreement. builds: {mode: {cr_label: dir}}."""
    import torch
    from transformers import AutoTokenizer

    from pipeline.eval.agreement import agreement_prompts, encode_prompts, measure, reference
    from pipeline.eval.harness import engine_for
    from pipeline.eval.passkey import make_passkey_item

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    rng = random.Random(f"passkey/decision-modes/{card.name}")
    items = [make_passkey_item(tokenizer, n, rng) for n in lengths for _ in range(items_per_length)]
    prompts = encode_prompts(tokenizer, agreement_prompts(n_prompts))
    batch = card.build.max_batch_size
    max_len = max(max(lengths) + 64, max(len(p) for p in prompts) + new_tokens + 16)

    def engine(path: Path, policy: str):
        return engine_for(path, policy, None, max_batch_size=batch, max_len=max_len,
                          kv_block_size=card.build.kv_block_size)

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the engine's CPU path: see stages/evaluate._cpu_threads
    try:
        vanilla = engine(base_dir, "none")
        refs = reference(vanilla, prompts, new_tokens)

        def figures(e) -> dict[str, Any]:
            return {"passkey": passkey_accuracy(e, tokenizer, items, batch), **measure(e, prompts, refs)}

        out: dict[str, Any] = {"vanilla": {"1": figures(vanilla)}}
        for mode, ckpts in builds.items():
            for label, path in sorted(ckpts.items(), key=lambda kv: float(kv[0])):
                got = figures(engine(path, "dms"))
                out.setdefault(mode, {})[label] = got
                print(f"[decision-modes] {mode} CR {label}: {got}", flush=True)
    finally:
        torch.set_num_threads(before)
    return out


def markdown(results: dict[str, Any], retrofits: dict[str, Any], lengths) -> str:
    head = " | ".join(f"passkey {n} (%)" for n in lengths)
    lines = [
        f"| mode | checkpoint | step | KL to vanilla | token match | measured CR | {head} "
        "| first-step KL / CR |",
        "| --- | --- | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in lengths) + " | ---: |",
    ]
    for mode, per_label in results.items():
        for label, r in per_label.items():
            passkey = " | ".join(f"{r['passkey'][str(n)]:.1f}" for n in lengths)
            retro = retrofits.get(mode, {})
            step = retro.get("checkpoint_step", {}).get(label, "-")
            first = retro.get("first_step") or {}
            start = f"{first['kl']:.3f} / {first['train_cr']:.2f}" if first else "-"
            lines.append(f"| {mode} | {label} | {step} | {r['kl']:.4f} | {r['token_match']:.3f} "
                         f"| {r['measured_cr']:.2f} | {passkey} | {start} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from pipeline.card import load_card
    from pipeline.runner import run_pipeline
    from pipeline.stages.api import cr_label

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--card", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--ramp-steps", type=int, default=120)
    parser.add_argument("--schedule-cr", type=float, default=8.0)
    parser.add_argument("--lr", type=float, default=None, help="default: the card's retrofit.lr")
    parser.add_argument("--logit-clip", type=float, default=None, help="default: the card's")
    parser.add_argument("--all-checkpoints", action="store_true",
                        help="measure every checkpoint (default: the card's target CR only)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--items", type=int, default=16, help="passkey items per length")
    parser.add_argument("--prompts", type=int, default=8, help="agreement prompts")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--modes", nargs="+", default=[m for m, _, _ in MODES])
    parser.add_argument("--build-root", type=Path, default=Path("build"))
    parser.add_argument("--out", type=Path, default=Path("build/decision-modes"))
    args = parser.parse_args(argv)

    card = load_card(args.card)
    schedule = {"steps": args.steps, "ramp_steps": args.ramp_steps, "schedule_cr": args.schedule_cr,
                "lr": args.lr or card.retrofit.lr,
                "logit_clip": card.retrofit.logit_clip if args.logit_clip is None else args.logit_clip}
    target = cr_label(card.dms.target_cr)
    builds, retrofits = {}, {}
    for mode, decision, warm in MODES:
        if mode not in args.modes:
            continue
        one = mode_card(card, mode, decision, warm, schedule)
        t0 = time.monotonic()
        report = run_pipeline(one, args.build_root, until="retrofit")
        retro = report["retrofit"]
        keep = ("seconds", "steps", "measured_cr_by_checkpoint", "mean_kl_by_checkpoint", "checkpoint_step",
                "first_step")
        retrofits[mode] = {k: retro.get(k) for k in keep}
        root = args.build_root / one.name
        base_dir = root / "prepare" / "model"  # the same conversion for every mode
        builds[mode] = {label: root / "retrofit" / rel for label, rel in retro["checkpoints"].items()
                        if args.all_checkpoints or label == target}
        print(f"[decision-modes] {mode}: {time.monotonic() - t0:.0f} s, {retrofits[mode]}", flush=True)
    results = measure_modes(card, base_dir, builds, args.lengths, args.items, args.prompts, args.new_tokens)
    settings = {"card": card.name, **schedule, "seq_len": card.retrofit.seq_len, "data": card.retrofit.data,
                "seed": card.retrofit.seed,
                "batch_size": card.retrofit.batch_size, "window": card.dms.window,
                "checkpoint_crs": list(card.retrofit.checkpoint_crs), "passkey_lengths": args.lengths,
                "passkey_items_per_length": args.items, "agreement_prompts": args.prompts,
                "agreement_new_tokens": args.new_tokens}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decision_modes.json").write_text(
        json.dumps({"settings": settings, "retrofit": retrofits, "results": results}, indent=1))
    table = markdown(results, retrofits, args.lengths)
    (args.out / "decision_modes.md").write_text(f"settings: {json.dumps(settings)}\n\n{table}")
    print(table)


if __name__ == "__main__":
    main()
