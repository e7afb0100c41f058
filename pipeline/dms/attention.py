"""Training-time DMS attention: delayed eviction as an additive soft mask (dms-spec.md section 3).

Two implementations of the same function:
- `reference_attention`: plain matmul + float bias from `rule.soft_eviction_bias` (any device; the
  reference every other path is tested against);
- `flex_attention_dms`: `torch.nn.attention.flex_attention` with a `score_mod` that adds
  log(1 - alpha_k) beyond the window (no [T, T] bias materialised; the fast path on GPU).

Shapes: q [B, Hq, T, D], k/v [B, Hkv, T, D], key_logit [B, Hkv, T] (noisy, tau-scaled, shifted by one;
`rule.KEEP_LOGIT` for "never evict"). Returns [B, Hq, T, D].
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from pipeline.dms import rule


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_logit: torch.Tensor | None,
    window: int,
    scaling: float,
) -> torch.Tensor:
    """Causal GQA attention with the DMS soft-eviction bias (None: plain causal attention)."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    pos = torch.arange(t, device=q.device)
    if key_logit is None:
        bias = torch.zeros(t, t, dtype=torch.float32, device=q.device)
        bias = bias.masked_fill(~rule.causal(pos, pos), float("-inf"))[None, None, None]
    else:
        # [B, Hkv, 1, T, T]: one bias per KV head, shared by the G query heads of its group.
        bias = rule.soft_eviction_bias(key_logit.float(), pos, pos, window)[:, :, None]
    qg = q.reshape(b, hkv, g, t, d)
    scores = torch.matmul(qg.float(), k[:, :, None].float().transpose(-1, -2)) * scaling + bias
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v[:, :, None].float()).to(q.dtype)
    return out.reshape(b, hq, t, d)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attention_dms(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_logit: torch.Tensor | None,
    window: int,
    scaling: float,
    compile: bool = True,
) -> torch.Tensor:
    """The same function as `reference_attention` through flex_attention (needs torch.compile to be
    fast; `compile=False` runs PyTorch's eager fallback, for tests)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    b, hq, t, _ = q.shape
    g = hq // k.shape[1]

    def causal_mask(b_idx, h_idx, q_idx, kv_idx):
        return kv_idx <= q_idx

    if key_logit is None:
        score_mod = None
    else:
        log_keep = F.logsigmoid(-key_logit.float())  # [B, Hkv, T]

        def score_mod(score, b_idx, h_idx, q_idx, kv_idx):
            far = (q_idx - kv_idx) > window
            return score + torch.where(far, log_keep[b_idx, h_idx // g, kv_idx], 0.0)

    block_mask = create_block_mask(causal_mask, None, None, t, t, device=q.device)
    fn = _compiled_flex() if compile else flex_attention
    return fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scaling, enable_gqa=True)
