"""The DMS rule, in one place (docs: dms-spec.md sections 1, 2, 3 and 5).

Imported by training, the inference runtime, the kernel reference and the tests. Shapes use
B = batch, Hq / Hkv = query / KV heads, T = tokens, D = head dim.

- A decision logit per (token, KV head): from a borrowed query channel or from an adapter.
- Shift by one: the decision computed at position t decides the fate of key t-1; the last key is kept.
- Delayed eviction: key k stays visible to query q while q - k <= window (window + 1 keys always
  visible); beyond that its score gets log(1 - alpha_k) (training, soft) or -inf if evicted (inference).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# A finite stand-in for "never evict" logits: logsigmoid(-KEEP_LOGIT) == 0 to float precision, with no
# inf arithmetic in the backward pass.
KEEP_LOGIT = -1.0e4


def borrowed_logits(
    q: torch.Tensor, num_kv_heads: int, alpha_per: str, scale: float, offset: float
) -> torch.Tensor:
    """Decision logits read from the last channel of the first query head of each GQA group.

    q: [B, Hq, T, D] after q_norm, before RoPE. Returns [B, Hkv, T] (per layer: one logit repeated).
    """
    gqa = q.shape[1] // num_kv_heads
    if alpha_per == "layer":
        logit = q[:, :1, :, -1].expand(-1, num_kv_heads, -1)
    else:
        logit = q[:, ::gqa, :, -1]
    return logit * scale - offset


def zero_borrowed_channel(q: torch.Tensor, num_kv_heads: int, alpha_per: str) -> torch.Tensor:
    """q with the borrowed channel set to zero so it no longer contributes to QK^T. q: [B, Hq, T, D]."""
    gqa = q.shape[1] // num_kv_heads
    heads = torch.zeros(q.shape[1], dtype=torch.bool, device=q.device)
    if alpha_per == "layer":
        heads[0] = True
    else:
        heads[::gqa] = True
    channel = torch.zeros(q.shape[-1], dtype=torch.bool, device=q.device)
    channel[-1] = True
    drop = heads[:, None, None] & channel[None, None, :]  # [Hq, 1, D]
    return q.masked_fill(drop, 0.0)


def gumbel_sigmoid(
    logits: torch.Tensor,
    tau: float,
    generator: torch.Generator | None = None,
    clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy relaxed decisions for training.

    Returns (noisy_logit, hard): noisy_logit = (logit + G1 - G2) / tau, so the soft probability is
    sigmoid(noisy_logit) and log(1 - p) = logsigmoid(-noisy_logit) stays stable; hard is the 0/1
    decision with a straight-through gradient (forward: p > 0.5, backward: dp).

    clip: the noise is added to logit clamped to [-clip, clip], with the clamp's gradient passed
    straight through. Without it, a logit far past 0 (|logit| >> tau) has dp = 0 for every noise
    sample, so neither loss can ever move that decision again (a "dead" head); with it, the noise
    still flips a decision with probability sigmoid(-clip) and those samples carry gradient.
    Inference is unchanged (it reads the sign of the raw logit).
    """
    if clip is not None:
        logits = logits + (logits.clamp(-clip, clip) - logits).detach()
    u = torch.rand((2, *logits.shape), generator=generator, device=logits.device, dtype=torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    # Parenthesised: `-log(u).clamp_min(tiny)` would clamp the negative log(u) itself (NaN noise).
    gumbel = -torch.log((-torch.log(u.clamp_min(tiny))).clamp_min(tiny))
    noise = (gumbel[0] - gumbel[1]).to(logits.dtype)
    noisy_logit = (logits + noise) / tau
    p = torch.sigmoid(noisy_logit)
    hard = (p > 0.5).to(p.dtype) - p.detach() + p
    return noisy_logit, hard


def shift_by_one(x: torch.Tensor, fill: float) -> torch.Tensor:
    """out[..., t] = x[..., t + 1]; the last position gets `fill` (no decision yet: kept). x: [..., T]."""
    return torch.cat([x[..., 1:], x.new_full((*x.shape[:-1], 1), fill)], dim=-1)


def beyond_window(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """[Tq, Tk] True where key k is causal but out of query q's window (q - k > window)."""
    return (q_pos[:, None] - k_pos[None, :]) > window


def causal(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    return k_pos[None, :] <= q_pos[:, None]


def soft_eviction_bias(
    key_logit: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, window: int
) -> torch.Tensor:
    """Additive attention bias for training: log(1 - alpha_k) beyond the window, -inf if non-causal.

    key_logit: [B, H, Tk] the (noisy, tau-scaled) logit deciding key k's fate, already shifted by one.
    Returns [B, H, Tq, Tk].
    """
    log_keep = F.logsigmoid(-key_logit)[:, :, None, :]  # log(1 - sigmoid(l)) = logsigmoid(-l)
    far = beyond_window(q_pos, k_pos, window)
    bias = torch.where(far, log_keep, torch.zeros((), dtype=log_keep.dtype, device=log_keep.device))
    return bias.masked_fill(~causal(q_pos, k_pos), -math.inf)


def hard_eviction_mask(
    key_evicted: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, window: int
) -> torch.Tensor:
    """Boolean visibility for inference. key_evicted: [B, H, Tk] (already shifted). Returns [B,H,Tq,Tk]."""
    far = beyond_window(q_pos, k_pos, window)[None, None]
    gone = far & key_evicted[:, :, None, :]
    return causal(q_pos, k_pos)[None, None] & ~gone


def live_after_prefill(key_evicted: torch.Tensor, seq_len: int, window: int) -> torch.Tensor:
    """Which keys are still stored after `seq_len` tokens: inside the ring of the last window + 1
    tokens, or not evicted. key_evicted: [..., T] (already shifted). Returns bool [..., T]."""
    pos = torch.arange(key_evicted.shape[-1], device=key_evicted.device)
    in_ring = pos >= seq_len - 1 - window
    return in_ring | ~key_evicted


def compression_ratio(kept_tokens: torch.Tensor, seq_tokens: torch.Tensor) -> float:
    """CR = 1 / mean(kept / length) over every (layer, head, sequence) stream given."""
    frac = kept_tokens.double() / seq_tokens.double()
    return float(1.0 / frac.mean())


def target_fraction(cr: float) -> float:
    """Eviction fraction that a compression ratio asks for: 1 - 1/CR."""
    return 1.0 - 1.0 / cr
