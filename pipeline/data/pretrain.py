"""Build the embedded Qwen3 from a card's `pretrain` section and pretrain it on the task corpus.

A nanoGPT-style loop: sample a packed batch, weighted cross-entropy (answers weigh most), AdamW,
clip, step, log. The first COPY_FRACTION of steps train on copy rows only (`corpus.sample_copy_batch`):
they grow induction heads (copy accuracy 0.99 by step 200 on the tiny card), and every task lookup is
one induction step; trained on the tasks alone, the model never learnt retrieval in 3000 steps. A
length curriculum then starts on short rows (cheap attention, many answers per token) and ends on
full-length rows, keeping the tokens per step constant.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import Qwen3Config, Qwen3ForCausalLM

from pipeline.card import PretrainSpec
from pipeline.data.corpus import COPY_MAX_GAP, COPY_ROW, sample_batch_with_weights, sample_copy_batch

# Rows are seq_len // div long with batch_size * div rows (constant tokens per step). The first
# SHORT_FRACTION of steps use only 128-token rows (cheap, many answers per token: retrieval is learnt
# there); after that the divisor cycles through MIXED_DIVS, so every later checkpoint has seen rows of
# every length up to the full one (RoPE models do not extrapolate to lengths they never saw).
COPY_FRACTION = 0.2
LONG_COPY_ROW = 256
LONG_COPY_GAP = 200
SHORT_FRACTION = 0.4
SHORT_ROW = 128
MIXED_DIVS: tuple[int, ...] = (8, 4, 2, 1)
WARMUP_STEPS = 20


def build_model(spec: PretrainSpec, tokenizer) -> Qwen3ForCausalLM:
    """A fresh Qwen3ForCausalLM with the card's shape (seeded by spec.seed)."""
    if spec.num_heads % spec.num_kv_heads:
        raise ValueError(f"pretrain.num_heads={spec.num_heads} must be a multiple of num_kv_heads")
    if len(tokenizer) > spec.vocab_size:
        raise ValueError(f"pretrain.vocab_size={spec.vocab_size} < tokenizer size {len(tokenizer)}")
    config = Qwen3Config(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=max(4096, 4 * spec.seq_len),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(spec.seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def weighted_lm_loss(
    model: Qwen3ForCausalLM, tokens: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted next-token loss and answer-token accuracy (teacher-forced).

    tokens [B, T] long, weights [B, T] float (weight of predicting tokens[:, t]).
    """
    logits = model(input_ids=tokens).logits[:, :-1].float()
    target, w = tokens[:, 1:], weights[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    loss = (ce * w.reshape(-1)).sum() / w.sum().clamp_min(1e-6)
    answer = w == 1.0
    acc = (logits.argmax(-1) == target)[answer].float().mean()
    return loss, acc


def _lr(step: int, steps: int, peak: float) -> float:
    if step < WARMUP_STEPS:
        return peak * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimizer(model: Qwen3ForCausalLM, lr: float) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95),
    )


def _step(model, opt, tokens: torch.Tensor, weights: torch.Tensor, lr: float) -> tuple[float, float]:
    """One optimizer step at `lr`; returns (loss, answer-token accuracy)."""
    for group in opt.param_groups:
        group["lr"] = lr
    loss, acc = weighted_lm_loss(model, tokens, weights)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item(), acc.item()


def pretrain(
    model: Qwen3ForCausalLM, tokenizer, spec: PretrainSpec, log_every: int = 25,
    save_every: int = 0, save: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train in place for spec.steps; returns {train_seconds, curve: [{step, seq_len, loss, answer_acc}]}.

    With `save`, it is called with the stats so far every `save_every` steps (a usable checkpoint if a
    run has to be cut short).
    """
    rng = random.Random(f"pretrain/{spec.seed}")
    torch.manual_seed(spec.seed)
    opt = _optimizer(model, spec.lr)
    model.train()
    curve: list[dict[str, float]] = []
    run_loss, run_acc, n = 0.0, 0.0, 0
    start = time.perf_counter()
    bar = tqdm(range(spec.steps), desc="pretrain", mininterval=5.0)
    for step in bar:
        short = step < SHORT_FRACTION * spec.steps
        div = spec.seq_len // SHORT_ROW if short else MIXED_DIVS[step % len(MIXED_DIVS)]
        # Rows of at least SHORT_ROW tokens (items need 66); batch rows scale so tokens per step stay put.
        seq_len = max(spec.seq_len // max(div, 1), min(spec.seq_len, SHORT_ROW))
        div = spec.seq_len // seq_len
        if step < COPY_FRACTION * spec.steps:  # induction warm-up (same tokens per step)
            # First half: the copy 25-37 tokens back (learnt in ~250 steps); second half: up to
            # LONG_COPY_GAP filler words between the copies, the distances facts sit at in the tasks.
            long = step >= COPY_FRACTION * spec.steps / 2
            seq_len = min(spec.seq_len, LONG_COPY_ROW if long else COPY_ROW)
            rows = spec.batch_size * spec.seq_len // seq_len
            gap = LONG_COPY_GAP if long else COPY_MAX_GAP
            tokens, weights = sample_copy_batch(tokenizer, rows, seq_len, rng, max_gap=gap)
        else:
            tokens, weights = sample_batch_with_weights(tokenizer, spec.batch_size * div, seq_len, rng)
        loss, acc = _step(model, opt, tokens, weights, _lr(step, spec.steps, spec.lr))
        run_loss, run_acc, n = run_loss + loss, run_acc + acc, n + 1
        if (step + 1) % log_every == 0 or step + 1 == spec.steps:
            point = {"step": step + 1, "seq_len": seq_len, "loss": run_loss / n, "answer_acc": run_acc / n,
                     "seconds": time.perf_counter() - start}
            curve.append(point)
            bar.set_postfix(loss=f"{point['loss']:.3f}", acc=f"{point['answer_acc']:.3f}", len=seq_len)
            tqdm.write(f"step {step + 1} len {seq_len} loss {point['loss']:.4f} answer_acc "
                       f"{point['answer_acc']:.3f} t {point['seconds']:.0f}s")
            run_loss, run_acc, n = 0.0, 0.0, 0
        if save is not None and save_every and (step + 1) % save_every == 0 and step + 1 < spec.steps:
            model.eval()
            save({"train_seconds": time.perf_counter() - start, "curve": curve, "steps_done": step + 1})
            model.train()
    model.eval()
    return {"train_seconds": time.perf_counter() - start, "curve": curve}


# The trace phase, after the recipe above: the tasks plus the generation-heavy `trace`, one item in
# TRACE_SHARE a trace (a trace's answer is hundreds of supervised tokens, the others' a few), on rows
# of every length in turn. It starts from a teacher that already retrieves (the induction heads a trace
# step reads its values with).
TRACE_SHARE = 0.5


def train_trace_phase(
    model: Qwen3ForCausalLM, tokenizer, spec: PretrainSpec, steps: int, lr: float, log_every: int = 25,
    probe_every: int = 0, probe: Callable[[int], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train in place for `steps` on the trace mixture; returns {train_seconds, curve, probes}.

    `probe(step)` (every `probe_every` steps and at the end) measures the model; its results are kept.
    """
    from pipeline.data.tasks import TASKS

    mix = TASKS * round(TRACE_SHARE / (1 - TRACE_SHARE)) + ("trace",) * len(TASKS)
    rng = random.Random(f"trace-phase/{spec.seed}")
    torch.manual_seed(spec.seed)
    opt = _optimizer(model, lr)
    model.train()
    curve: list[dict[str, float]] = []
    probes: list[dict[str, Any]] = []
    run_loss, run_acc, n = 0.0, 0.0, 0
    start = time.perf_counter()
    for step in tqdm(range(steps), desc="trace phase", mininterval=5.0):
        div = MIXED_DIVS[step % len(MIXED_DIVS)]
        seq_len = max(spec.seq_len // div, SHORT_ROW)
        tokens, weights = sample_batch_with_weights(
            tokenizer, spec.batch_size * spec.seq_len // seq_len, seq_len, rng, tasks=mix
        )
        loss, acc = _step(model, opt, tokens, weights, _lr(step, steps, lr))
        run_loss, run_acc, n = run_loss + loss, run_acc + acc, n + 1
        if (step + 1) % log_every == 0 or step + 1 == steps:
            point = {"step": step + 1, "seq_len": seq_len, "loss": run_loss / n, "answer_acc": run_acc / n,
                     "seconds": time.perf_counter() - start}
            curve.append(point)
            tqdm.write(f"trace step {step + 1} len {seq_len} loss {point['loss']:.4f} answer_acc "
                       f"{point['answer_acc']:.3f} t {point['seconds']:.0f}s")
            run_loss, run_acc, n = 0.0, 0.0, 0
        if probe is not None and ((probe_every and (step + 1) % probe_every == 0) or step + 1 == steps):
            model.eval()
            probes.append({"step": step + 1, "seconds": time.perf_counter() - start, **probe(step + 1)})
            tqdm.write(f"trace step {step + 1} probe {probes[-1]}")
            model.train()
    model.eval()
    return {"train_seconds": time.perf_counter() - start, "curve": curve, "probes": probes}
