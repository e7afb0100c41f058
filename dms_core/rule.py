"""The DMS rule (docs/dms.md sections 1 to 6), once, for training, the engine, the kernels' tests
and the TensorRT host.

Shapes: B = batch, Hq / Hkv = query / KV heads, T = tokens, D = head dim, R = streams (one stream is one
(sequence, layer, KV head)). Positions are explicit wherever a caller may hold a compacted stream (the
engine and the TensorRT host keep only live tokens), so the same functions serve a dense training batch
and a paged stream.

- Decision logits per (token, KV head), from a borrowed query channel or from an adapter; the hard
  decision is `logit > 0`.
- Shift by one: the decision computed at position t decides the fate of key t-1; the last key is kept.
- Delayed eviction: key k stays visible to query q while q - k <= window (window + 1 keys always
  visible); beyond that its score gets log(1 - alpha_k) (training, soft) or it is gone if evicted
  (inference).
- At decode, each stream keeps a ring of its last window + 1 tokens' slots; the token leaving the ring
  gives its slot to the new token in place if it was evicted, otherwise the stream grows by one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# A finite stand-in for "never evict" logits: logsigmoid(-KEEP_LOGIT) == 0 to float precision, with no
# inf arithmetic in the backward pass.
KEEP_LOGIT = -1.0e4


# -- section 1: the decision -----------------------------------------------------------------------
def scaled_logit(raw, scale: float, offset: float):
    """The decision logit from its raw value (a borrowed channel or the adapter's output). Plain
    arithmetic, so the TensorRT-LLM model class applies it to its own tensor type too."""
    return raw * scale - offset


def evicts(logit):
    """The hard decision at inference (no noise): True evicts the PREVIOUS token (shift by one)."""
    return logit > 0


def borrowed_logits(
    q: torch.Tensor, num_kv_heads: int, alpha_per: str, scale: float, offset: float
) -> torch.Tensor:
    """Decision logits read from the last channel of the first query head of each GQA group.

    q: [B, Hq, T, D] after q_norm, before RoPE. Returns [B, Hkv, T] (per layer: one logit repeated).
    """
    gqa = q.shape[1] // num_kv_heads
    if alpha_per == "layer":
        raw = q[:, :1, :, -1].expand(-1, num_kv_heads, -1)
    else:
        raw = q[:, ::gqa, :, -1]
    return scaled_logit(raw, scale, offset)


def borrowed_channel_mask(num_heads: int, num_kv_heads: int, head_dim: int, alpha_per: str) -> torch.Tensor:
    """bool [Hq, D]: True at the borrowed channel (the last channel of each GQA group's first query head,
    or of head 0 alone for alpha_per="layer")."""
    heads = torch.zeros(num_heads, dtype=torch.bool)
    if alpha_per == "layer":
        heads[0] = True
    else:
        heads[:: num_heads // num_kv_heads] = True
    channel = torch.zeros(head_dim, dtype=torch.bool)
    channel[-1] = True
    return heads[:, None] & channel[None, :]


def zero_borrowed_channel(q: torch.Tensor, num_kv_heads: int, alpha_per: str) -> torch.Tensor:
    """q with the borrowed channel set to zero so it no longer contributes to QK^T. q: [B, Hq, T, D].
    Applied before RoPE and again after it (RoPE mixes the channel back in)."""
    drop = borrowed_channel_mask(q.shape[1], num_kv_heads, q.shape[-1], alpha_per).to(q.device)
    return q.masked_fill(drop[:, None, :], 0.0)


def adapter_logits(projected: torch.Tensor, alpha_per: str, scale: float, offset: float) -> torch.Tensor:
    """Decision logits from the adapter's output. projected: [B, T, Hkv] =
    dms_proj_alpha(dms_proj_alpha_norm(x)) where x is the decoder layer's RESIDUAL-stream input (before
    input_layernorm). Returns [B, Hkv, T]."""
    logit = scaled_logit(projected.transpose(1, 2), scale, offset)
    if alpha_per == "layer":
        logit = logit[:, :1].expand(-1, projected.shape[-1], -1)
    return logit


# -- section 3: training ---------------------------------------------------------------------------
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


# -- section 2: shift by one -----------------------------------------------------------------------
def shift_by_one(x: torch.Tensor, fill: float | bool) -> torch.Tensor:
    """out[..., t] = x[..., t + 1]; the last position gets `fill` (no decision yet: kept). x: [..., T]."""
    return torch.cat([x[..., 1:], x.new_full((*x.shape[:-1], 1), fill)], dim=-1)


# -- sections 3 and 5: visibility ------------------------------------------------------------------
def causal(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """[..., Tq, Tk] True where key k is not after query q. q_pos [Tq]; k_pos [..., Tk]."""
    return k_pos[..., None, :] <= q_pos[:, None]


def beyond_window(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """[..., Tq, Tk] True where key k is out of query q's window (q - k > window)."""
    return (q_pos[:, None] - k_pos[..., None, :]) > window


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


def hard_visibility(
    key_evicted: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, window: int
) -> torch.Tensor:
    """Inference visibility: causal, and not (evicted and beyond the window).

    key_evicted: [..., Tk] bool, already shifted by one; q_pos [Tq]; k_pos [Tk] or [..., Tk] (explicit
    positions: a compacted stream's stored tokens then a chunk). Returns [..., Tq, Tk].
    """
    gone = beyond_window(q_pos, k_pos, window) & key_evicted[..., None, :]
    return causal(q_pos, k_pos) & ~gone


def survivors(pos: torch.Tensor, evicted: torch.Tensor, num_tokens: int, window: int) -> torch.Tensor:
    """Which tokens are still stored after a stream has seen `num_tokens` tokens: those in the ring of
    the last window + 1 positions, and those not evicted. pos [..., N] explicit positions, evicted
    [..., N] bool (shifted by one). Returns bool [..., N]."""
    return (pos >= num_tokens - 1 - window) | ~evicted


def stored_evicted(ring_flag: torch.Tensor, pos: torch.Tensor, seen: torch.Tensor | int) -> torch.Tensor:
    """Eviction flags of a stream's stored tokens at positions pos [..., N] once it has seen `seen`
    tokens: a stored token outside the ring of the last window + 1 positions was kept (never flagged);
    one inside reads the ring's flag. ring_flag [..., W+1] (the stream's ring; leading dims as pos's);
    seen an int or [..., 1]. Returns bool [..., N]."""
    ring = ring_flag.shape[-1]
    in_ring = pos >= seen - ring
    return in_ring & ring_flag.gather(-1, pos % ring)


def visible_until(pos: torch.Tensor, evicted: torch.Tensor, window: int, never: int) -> torch.Tensor:
    """The first query position that no longer sees each key (`hard_visibility` as one number per key, for
    kernels that read a stored stream): pos + window + 1 for an evicted key, `never` for a kept one."""
    return torch.where(evicted, pos + window + 1, torch.full_like(pos, never))


# -- section 5: the decode-step ring ---------------------------------------------------------------
# A stream's ring holds where its last window + 1 tokens are stored and whether each is evicted, indexed
# by position modulo window + 1: ring_row[r, p % (W+1)] is the pool row of token p, ring_flag[r, p %
# (W+1)] its flag. The token entering at position t and the one leaving (t - W - 1) share an index.
@dataclass(frozen=True)
class RingStep:
    """One decode step's ring indices, shared by every layer: flat indices into a [N, W+1] ring."""

    rows: torch.Tensor  # int64 [R] the streams stepping (distinct)
    new: torch.Tensor  # int64 [R] the new token's entry (also the leaving token's)
    prev: torch.Tensor  # int64 [R] the previous token's entry
    has_prev: torch.Tensor  # bool [R]
    full: torch.Tensor  # bool [R] the ring is full: a token leaves it

    @classmethod
    def at(cls, rows: torch.Tensor, pos: torch.Tensor, ring: int) -> RingStep:
        """Streams `rows` receiving the token at pos [R] (int64), in rings of `ring` entries."""
        base = rows * ring
        return cls(rows, base + pos % ring, base + (pos - 1) % ring, pos >= 1, pos >= ring)


def ring_record_(ring_flag: torch.Tensor, step: RingStep, evict_prev: torch.Tensor) -> None:
    """The new token's decision marks the PREVIOUS token of each stream (shift by one), in place.
    ring_flag bool [N, W+1]; evict_prev bool [R]."""
    flags = ring_flag.view(-1)
    flags[step.prev] = torch.where(step.has_prev, evict_prev, flags[step.prev])


def ring_appends(ring_flag: torch.Tensor, step: RingStep) -> torch.Tensor:
    """bool [R]: whether each stream's token of `step` takes a new slot (the token leaving the ring was
    kept). Known before the step: the leaving token's flag was decided window steps earlier.
    ring_flag: [N, W+1] (one layer) or [L, N, W+1] (every layer at once: returns [L, R])."""
    flags = ring_flag.flatten(-2)
    return ~(flags[..., step.new] & step.full)


def ring_place_(
    ring_row: torch.Tensor,
    ring_flag: torch.Tensor,
    lens: torch.Tensor,
    step: RingStep,
    append_rows: torch.Tensor,
    evict_prev: torch.Tensor | None,
) -> torch.Tensor:
    """One decode step of DMS bookkeeping for the streams of `step`, in place, without a host sync.

    ring_row int64 [N, W+1], ring_flag bool [N, W+1], lens int32 [N]: every stream's ring and live
    length (one layer); append_rows int64 [R]: the pool row of each stream's next free slot;
    evict_prev bool [R]: the new token's decision, which marks the previous token (None: not known yet;
    a caller that learns it after the step, like the TensorRT host, calls `ring_record_` then: the two
    touch different entries). Returns the pool row int64 [R] the new token is written to: the leaving
    token's if that one was evicted (its slot reused in place), else the next free slot (the stream
    grows by one).
    """
    if evict_prev is not None:
        ring_record_(ring_flag, step, evict_prev)
    rows, flags = ring_row.view(-1), ring_flag.view(-1)
    appends = ~(flags[step.new] & step.full)
    row = torch.where(appends, append_rows, rows[step.new])
    lens.index_add_(0, step.rows, appends.to(lens.dtype))
    rows[step.new] = row
    flags[step.new] = False
    return row


def ring_load_(
    ring_row: torch.Tensor,
    ring_flag: torch.Tensor,
    streams: torch.Tensor | int,
    pos: torch.Tensor,
    evicted: torch.Tensor,
    rows: torch.Tensor,
    num_tokens: int,
) -> None:
    """Set streams' rings after a prefill stored their survivors: survivor i is the token at pos[i] of
    stream streams[i] (an int: all of one stream), flag evicted[i], in pool row rows[i]. Every stream has
    seen `num_tokens`; its ring positions num_tokens - W - 1 .. num_tokens - 1 are all survivors."""
    ring = ring_row.shape[1]
    in_ring = pos >= num_tokens - ring
    streams = torch.as_tensor(streams, device=pos.device).expand_as(pos)[in_ring]
    ring_row[streams, pos[in_ring] % ring] = rows[in_ring]
    ring_flag[streams, pos[in_ring] % ring] = evicted[in_ring]


# -- section 5: the compression ratio --------------------------------------------------------------
def compression_ratio(kept_tokens: torch.Tensor, seq_tokens: torch.Tensor, dim: int | None = None):
    """CR = 1 / mean(kept / length) over every (layer, head, sequence) stream given: a float, or with
    `dim` a float64 tensor of one CR per index of the other dimensions (the mean taken over `dim`)."""
    frac = kept_tokens.double() / seq_tokens.double()
    if dim is None:
        return float(1.0 / frac.mean())
    return 1.0 / frac.mean(dim)


def target_fraction(cr: float) -> float:
    """Eviction fraction that a compression ratio asks for: 1 - 1/CR."""
    return 1.0 - 1.0 / cr
