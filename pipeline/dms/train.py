"""The DMS retrofit loop (docs/dms.md section 3), readable top to bottom like nanoGPT's train.py.

Per step: teacher logits (same model, eviction off; in borrowed mode the trained attention weights'
frozen originals are copied in for that one no-grad forward, so there is never a second model),
student forward with Gumbel noise seeded from (rank, step, micro-step), L = KL(student||teacher) +
one-sided compression loss at the scheduled CR, backward, clip, Adam step. Checkpoints for each
requested CR are saved from this one run once the schedule has reached that CR and the held-out
measured CR meets it; with a ramp (`ramp_steps`), the target CR's checkpoint is replaced by the final
state when that still meets it.

The same loop runs in one process (CPU, one GPU) and in many under `torchrun` with the model sharded
by FSDP2 (`distributed.py`): each process takes its own batches (global batch = world x batch_size) and
its share of the held-out rows, and every decision that leads to a collective (measuring, saving) is
taken from figures summed over all processes, so the processes never disagree about what comes next.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from dms_core import rule
from pipeline.dms.checkpoint import load_training_state, save_training_state
from pipeline.dms.distributed import SINGLE_PROCESS, Dist, all_sum, rank_slice
from pipeline.dms.losses import chunked_kl, compression_loss
from pipeline.dms.patch import dms_mode, dms_parameter_names, warm_start_borrowed
from pipeline.dms.schedule import noise_generator, scheduled_cr


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    schedule_cr: float  # the schedule's final CR (may overshoot target_cr)
    target_cr: float
    checkpoint_crs: tuple[float, ...]
    lr: float
    ramp_steps: int = 0  # steps of the CR ramp; 0: all of them
    grad_clip: float = 1.0
    seed: int = 0
    check_every: int = 5  # steps between held-out CR measurements once a checkpoint CR is in reach
    state_every: int = 50  # steps between resumable training-state saves
    rank: int = 0
    pad_token_id: int | None = None  # rows padded with this id (synthetic data): those positions get no KL
    logit_clip: float | None = None  # noise on logits clipped to +-this (rule.gumbel_sigmoid); None: spec
    warm_start: bool = False  # borrowed decisions: zero the borrowed neuron first (patch.warm_start_borrowed)


def measure_cr(
    model: nn.Module, sequences: torch.Tensor, window: int, d: Dist = SINGLE_PROCESS, batch_size: int = 2
) -> float:
    """CR of hard (noise-free) decisions on held-out sequences [N, T]: 1/mean(kept/len) over
    (layers, heads, sequences), with kept from `rule.survivors` after the whole sequence.
    Each process measures its share of the rows; the mean is over all of them."""
    fractions, count = 0.0, 0
    with torch.no_grad():
        mine = rank_slice(sequences, d)
        for i in range(0, len(mine), batch_size):
            x = mine[i : i + batch_size]
            with dms_mode(model, "hard") as rec:
                model(x, use_cache=False)
            evicted = rec.stacked() > 0.5  # [L, B, H, T]
            live = rule.survivors(torch.arange(x.shape[1]), evicted, x.shape[1], window)
            fractions += float((live.sum(-1).double() / x.shape[1]).sum())
            count += live[..., 0].numel()
    fractions, count = all_sum([fractions, count], d)
    return count / fractions


@contextmanager
def original_weights(model: nn.Module, frozen: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """The base model's weights copied into the trained parameters for the duration (no grad).

    An in-place copy rather than `functional_call`, so it also works on FSDP-sharded parameters (each
    process swaps only its own shard)."""
    if not frozen:
        yield
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        trained = {n: params[n].detach().clone() for n in frozen}
        for n, w in frozen.items():
            params[n].detach().copy_(w)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, w in trained.items():
                params[n].detach().copy_(w)


def teacher_logits(model: nn.Module, x: torch.Tensor, frozen: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """Logits of the base model: eviction off, borrowed channel intact, original weights where trained."""
    with torch.no_grad(), dms_mode(model, "teacher"), original_weights(model, frozen):
        return model(x, use_cache=False).logits


def mean_kl_to_teacher(
    model: nn.Module,
    sequences: torch.Tensor,
    frozen: dict[str, torch.Tensor] | None,
    d: Dist = SINGLE_PROCESS,
    batch_size: int = 1,
) -> float:
    """Mean per-token KL(student with hard decisions || teacher) on held-out sequences [N, T]."""
    total, count = 0.0, 0
    with torch.no_grad():
        mine = rank_slice(sequences, d)
        for i in range(0, len(mine), batch_size):
            x = mine[i : i + batch_size]
            t = teacher_logits(model, x, frozen)
            with dms_mode(model, "hard"):
                s = model(x, use_cache=False).logits
            total, count = total + float(chunked_kl(s, t)), count + 1
    total, count = all_sum([total, count], d)
    return total / count


def _batch_cr(hard: torch.Tensor, window: int) -> float:
    """CR of this step's hard decisions [L, B, H, T] (the progress bar's `cr`)."""
    with torch.no_grad():
        t = hard.shape[-1]
        live = rule.survivors(torch.arange(t, device=hard.device), hard.detach() > 0.5, t, window)
        kept = live.sum(-1).flatten()
        return rule.compression_ratio(kept, torch.full_like(kept, hard.shape[-1]))


def _say(d: Dist, message: str) -> None:
    if d.is_main:
        tqdm.write(message)


def train_dms(
    model: nn.Module,
    next_batch: Callable[[int], torch.Tensor],
    heldout: torch.Tensor,
    cfg: TrainConfig,
    save_checkpoint: Callable[[float, nn.Module], None],
    state_dir: Path | None = None,
    measure_kl: bool = False,
    d: Dist = SINGLE_PROCESS,
) -> dict[str, Any]:
    """Retrofit `model` (already patched, and sharded when d.world > 1) in place.

    next_batch(i) -> [B, T] token ids (process `rank` of `world` takes i = step * world + rank);
    heldout [N, T]. save_checkpoint(cr, model) is called on every process once per cfg.checkpoint_crs
    (saving is collective when sharded). Returns the run's figures (the same on every process).
    """
    window = model.dms_settings.window_size
    device = next(model.parameters()).device
    heldout = heldout.to(device)
    names = dms_parameter_names(model)
    params = dict(model.named_parameters())
    for n, p in params.items():
        p.requires_grad_(n in names)
    trainable = [params[n] for n in names]
    # Borrowed mode trains base weights: keep their originals (only those) for the teacher.
    frozen = None if model.dms_settings.separate_alpha else {n: params[n].detach().clone() for n in names}
    if cfg.warm_start and frozen is not None:  # after `frozen`: the teacher stays the base model
        warm_start_borrowed(model)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)

    start_step, saved, first = 0, {}, {}
    if state_dir is not None and (state_dir / "state.json").is_file():
        meta = load_training_state(state_dir, model, optimizer, d)
        start_step, saved = meta["step"], {float(k): v for k, v in meta["saved"].items()}
    pending = sorted(c for c in cfg.checkpoint_crs if c not in saved)
    train_cr_ema = 1.0
    last: dict[str, float] = {}
    t0 = time.monotonic()
    model.train()
    bar = tqdm(range(start_step, cfg.steps), desc="retrofit", initial=start_step, total=cfg.steps,
               disable=not d.is_main)
    for step in bar:
        x = next_batch(step * d.world + d.rank).to(device)
        target = scheduled_cr(step + 1, cfg.ramp_steps or cfg.steps, cfg.schedule_cr)
        t_logits = teacher_logits(model, x, frozen)
        gen = noise_generator(cfg.seed, cfg.rank, step, 0, device=x.device)
        # flex_attention (compiled) on GPUs; on CPU inductor cannot compile its backward: the reference.
        train_mode = dms_mode(model, "train", generator=gen, use_flex=x.is_cuda, logit_clip=cfg.logit_clip)
        with train_mode as rec:
            s_logits = model(x, use_cache=False).logits
        hard = rec.stacked()  # [L, B, H, T]
        kl = chunked_kl(s_logits, t_logits, None if cfg.pad_token_id is None else x != cfg.pad_token_id)
        l_dms = compression_loss(hard, rule.target_fraction(target))
        loss = kl + l_dms
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        optimizer.step()
        # Figures every process agrees on (they decide when to measure and save, which are collective).
        loss_sum, train_cr = all_sum([loss.item(), _batch_cr(hard, window)], d)
        mean_loss, train_cr = loss_sum / d.world, train_cr / d.world
        if not math.isfinite(mean_loss):
            raise FloatingPointError(
                f"retrofit diverged at step {step} (loss {mean_loss}); lower retrofit.lr"
            )
        train_cr_ema = 0.8 * train_cr_ema + 0.2 * train_cr
        last = {"loss": mean_loss, "kl": kl.item(), "l_dms": l_dms.item(), "grad_norm": float(grad_norm),
                "train_cr": train_cr}
        first = first or last
        bar.set_postfix(
            loss=f"{mean_loss:.4f}", kl=f"{last['kl']:.4f}", cr_target=f"{target:.2f}", cr=f"{train_cr:.2f}"
        )

        at_end = step == cfg.steps - 1
        # A CR's checkpoint waits for the schedule to ask for that CR: the first steps can overshoot
        # (evicting before the decisions have learnt what to keep), and that state is no CR-2 model.
        due = pending and min(target, train_cr_ema) >= pending[0] and (step % cfg.check_every == 0)
        if due or (at_end and (pending or cfg.ramp_steps)):
            model.eval()
            held_cr = measure_cr(model, heldout, window, d)
            entry: dict[str, float] = {"step": step + 1, "measured_cr": held_cr}
            if measure_kl and (at_end or held_cr >= pending[0]):  # only for a state that is saved
                entry["mean_kl"] = mean_kl_to_teacher(model, heldout, frozen, d)
            while pending and (min(held_cr, target) >= pending[0] or at_end):
                cr = pending.pop(0)
                save_checkpoint(cr, model)
                saved[cr] = entry
                _say(d, f"[retrofit] checkpoint CR {cr:g} at step {step + 1}: held-out CR {held_cr:.2f}")
            # After a ramp, the final state has trained longest at full compression: when it still
            # meets the target CR it replaces the target checkpoint taken on the way up.
            last_saved = saved.get(cfg.target_cr, {}).get("step")
            if at_end and cfg.ramp_steps and held_cr >= cfg.target_cr and last_saved != step + 1:
                save_checkpoint(cfg.target_cr, model)
                saved[cfg.target_cr] = entry
                _say(d, f"[retrofit] checkpoint CR {cfg.target_cr:g} replaced by the final state: "
                        f"held-out CR {held_cr:.2f}")
            model.train()
        if state_dir is not None and ((step + 1) % cfg.state_every == 0 or at_end):
            meta = {"step": step + 1, "saved": {str(k): v for k, v in saved.items()}}
            save_training_state(state_dir, model, optimizer, meta, d)
    bar.close()
    model.eval()
    return {
        "steps": cfg.steps,
        "seconds": time.monotonic() - t0,
        "first_loss": first.get("loss"),
        # The first step of this run: how far from the base model training starts.
        "first_step": {k: first[k] for k in ("kl", "train_cr")} if first else None,
        "final_loss": last.get("loss"),
        "final_kl": last.get("kl"),
        "saved": saved,
    }
