"""The DMS retrofit loop (dms-spec.md section 4), readable top to bottom like nanoGPT's train.py.

Per step: teacher logits (same model, eviction off; in borrowed mode the trained attention weights'
frozen originals are swapped in with `torch.func.functional_call`, so there is never a second model),
student forward with Gumbel noise seeded from (rank, step, micro-step), L = KL(student||teacher) +
one-sided compression loss at the scheduled CR, backward, clip, Adam step. Checkpoints for each
requested CR are saved from this one run when the held-out measured CR first reaches that value; with a
ramp (`ramp_steps`), the target CR's checkpoint is replaced by the final state when that still meets it.

Single process (CPU, or one GPU). Multi-GPU (torchrun + FSDP) is not wired in yet: `cfg.rank` only
seeds the noise per process so that a sharded run stays reproducible.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from pipeline.dms import rule
from pipeline.dms.checkpoint import load_training_state, save_training_state
from pipeline.dms.losses import chunked_kl, compression_loss
from pipeline.dms.patch import dms_mode, dms_parameter_names
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


def measure_cr(model: nn.Module, sequences: torch.Tensor, window: int, batch_size: int = 2) -> float:
    """CR of hard (noise-free) decisions on held-out sequences [N, T]: 1/mean(kept/len) over
    (layers, heads, sequences), with kept from `rule.live_after_prefill` after the whole sequence."""
    kept, total = [], []
    with torch.no_grad():
        for i in range(0, len(sequences), batch_size):
            x = sequences[i : i + batch_size]
            with dms_mode(model, "hard") as rec:
                model(x, use_cache=False)
            evicted = rec.stacked() > 0.5  # [L, B, H, T]
            live = rule.live_after_prefill(evicted, x.shape[1], window)
            kept.append(live.sum(-1).flatten())
            total.append(torch.full_like(kept[-1], x.shape[1]))
    return rule.compression_ratio(torch.cat(kept), torch.cat(total))


def teacher_logits(model: nn.Module, x: torch.Tensor, frozen: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """Logits of the base model: eviction off, borrowed channel intact, original weights where trained."""
    with torch.no_grad(), dms_mode(model, "teacher"):
        if frozen:
            return torch.func.functional_call(model, frozen, (x,), {"use_cache": False}).logits
        return model(x, use_cache=False).logits


def mean_kl_to_teacher(
    model: nn.Module, sequences: torch.Tensor, frozen: dict[str, torch.Tensor] | None, batch_size: int = 1
) -> float:
    """Mean per-token KL(student with hard decisions || teacher) on held-out sequences [N, T]."""
    values = []
    with torch.no_grad():
        for i in range(0, len(sequences), batch_size):
            x = sequences[i : i + batch_size]
            t = teacher_logits(model, x, frozen)
            with dms_mode(model, "hard"):
                s = model(x, use_cache=False).logits
            values.append(float(chunked_kl(s, t)))
    return sum(values) / len(values)


def train_dms(
    model: nn.Module,
    next_batch: Callable[[int], torch.Tensor],
    heldout: torch.Tensor,
    cfg: TrainConfig,
    save_checkpoint: Callable[[float, nn.Module], None],
    state_dir: Path | None = None,
    measure_kl: bool = False,
) -> dict[str, Any]:
    """Retrofit `model` (already patched) in place. next_batch(step) -> [B, T] token ids; heldout [N, T].

    save_checkpoint(cr, model) is called once per cfg.checkpoint_crs. Returns the run's figures.
    """
    window = model.dms_settings.window
    device = next(model.parameters()).device
    heldout = heldout.to(device)
    names = dms_parameter_names(model)
    params = dict(model.named_parameters())
    for n, p in params.items():
        p.requires_grad_(n in names)
    trainable = [params[n] for n in names]
    # Borrowed mode trains base weights: keep their originals (only those) for the teacher.
    frozen = None if model.dms_settings.separate_alpha else {n: params[n].detach().clone() for n in names}
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)

    start_step, saved, first_loss = 0, {}, None
    if state_dir is not None and (state_dir / "state.json").is_file():
        meta = load_training_state(state_dir, model, optimizer)
        start_step, saved = meta["step"], {float(k): v for k, v in meta["saved"].items()}
    pending = sorted(c for c in cfg.checkpoint_crs if c not in saved)
    train_cr_ema = 1.0
    last: dict[str, float] = {}
    t0 = time.monotonic()
    model.train()
    bar = tqdm(range(start_step, cfg.steps), desc="retrofit", initial=start_step, total=cfg.steps)
    for step in bar:
        x = next_batch(step).to(device)
        target = scheduled_cr(step + 1, cfg.ramp_steps or cfg.steps, cfg.schedule_cr)
        t_logits = teacher_logits(model, x, frozen)
        gen = noise_generator(cfg.seed, cfg.rank, step, 0, device=x.device)
        # flex_attention (compiled) on GPUs; on CPU inductor cannot compile its backward: the reference.
        with dms_mode(model, "train", generator=gen, use_flex=x.is_cuda) as rec:
            s_logits = model(x, use_cache=False).logits
        hard = rec.stacked()  # [L, B, H, T]
        kl = chunked_kl(s_logits, t_logits)
        l_dms = compression_loss(hard, rule.target_fraction(target))
        loss = kl + l_dms
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        optimizer.step()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(
                f"retrofit diverged at step {step} (loss {float(loss)}); lower retrofit.lr"
            )

        with torch.no_grad():
            live = rule.live_after_prefill(hard.detach() > 0.5, x.shape[1], window)
            train_cr = rule.compression_ratio(
                live.sum(-1).flatten(), torch.full((live[..., 0].numel(),), x.shape[1])
            )
        train_cr_ema = 0.8 * train_cr_ema + 0.2 * train_cr
        first_loss = loss.item() if first_loss is None else first_loss
        last = {"loss": loss.item(), "kl": kl.item(), "l_dms": l_dms.item(), "grad_norm": float(grad_norm)}
        bar.set_postfix(
            loss=f"{float(loss):.4f}", kl=f"{float(kl):.4f}", cr_target=f"{target:.2f}", cr=f"{train_cr:.2f}"
        )

        at_end = step == cfg.steps - 1
        due = pending and train_cr_ema >= pending[0] and (step % cfg.check_every == 0)
        if due or (at_end and (pending or cfg.ramp_steps)):
            model.eval()
            held_cr = measure_cr(model, heldout, window)
            entry: dict[str, float] = {"step": step + 1, "measured_cr": held_cr}
            if measure_kl and (at_end or held_cr >= pending[0]):  # only for a state that is saved
                entry["mean_kl"] = mean_kl_to_teacher(model, heldout, frozen)
            while pending and (held_cr >= pending[0] or at_end):
                cr = pending.pop(0)
                save_checkpoint(cr, model)
                saved[cr] = entry
                tqdm.write(f"[retrofit] checkpoint CR {cr:g} at step {step + 1}: held-out CR {held_cr:.2f}")
            # After a ramp, the final state has trained longest at full compression: when it still
            # meets the target CR it replaces the target checkpoint taken on the way up.
            last_saved = saved.get(cfg.target_cr, {}).get("step")
            if at_end and cfg.ramp_steps and held_cr >= cfg.target_cr and last_saved != step + 1:
                save_checkpoint(cfg.target_cr, model)
                saved[cfg.target_cr] = entry
                tqdm.write(f"[retrofit] checkpoint CR {cfg.target_cr:g} replaced by the final state: "
                           f"held-out CR {held_cr:.2f}")
            model.train()
        if state_dir is not None and ((step + 1) % cfg.state_every == 0 or at_end):
            save_training_state(
                state_dir,
                model,
                names,
                optimizer,
                {"step": step + 1, "saved": {str(k): v for k, v in saved.items()}},
            )
    bar.close()
    model.eval()
    return {
        "steps": cfg.steps,
        "seconds": time.monotonic() - t0,
        "first_loss": first_loss,
        "final_loss": last.get("loss"),
        "final_kl": last.get("kl"),
        "saved": saved,
    }
