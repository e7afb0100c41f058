"""Training-time DMS attention: delayed eviction as an additive soft mask (docs/dms.md section 3).

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

from dms_core import rule


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_logit: torch.Tensor | None,
    window: int,
    scaling: float,
    query_block: int = 256,
) -> torch.Tensor:
    """Causal GQA attention with the DMS soft-eviction bias (None: plain causal attention)."""
    b, hq, t, d = q.shape
    if key_logit is None:  # nothing to learn through the mask: the fused kernel is exact and fast
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
    hkv = k.shape[1]
    g = hq // hkv
    pos = torch.arange(t, device=q.device)
    qg = q.reshape(b, hkv, g, t, d).float()
    kf, vf = k[:, :, None].float(), v[:, :, None].float()
    outs = []
    # Query blocks see only keys up to their own end (causal), which halves the [T, T] work and memory.
    for start in range(0, t, query_block):
        end = min(start + query_block, t)
        # [B, Hkv, 1, Tq, Tk]: one bias per KV head, shared by the G query heads of its group.
        bias = rule.soft_eviction_bias(key_logit[..., :end].float(), pos[start:end], pos[:end], window)[
            :, :, None
        ]
        scores = torch.matmul(qg[:, :, :, start:end], kf[..., :end, :].transpose(-1, -2)) * scaling + bias
        outs.append(torch.matmul(torch.softmax(scores, dim=-1), vf[..., :end, :]))
    return torch.cat(outs, dim=3).to(q.dtype).reshape(b, hq, t, d)


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


def hard_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_evicted: torch.Tensor, window: int, scaling: float
) -> torch.Tensor:
    """Inference semantics (exact prefill): evicted keys beyond the window are gone. key_evicted:
    [B, Hkv, T] bool, already shifted by one. No gradient through the mask, so SDPA's kernel is used."""
    pos = torch.arange(q.shape[2], device=q.device)
    visible = rule.hard_visibility(key_evicted, pos, pos, window)  # [B, Hkv, T, T]
    visible = visible.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scaling, enable_gqa=True)
