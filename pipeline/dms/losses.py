"""DMS training losses (docs/dms.md section 3): L = L_distill + L_dms.

We compute the KL ourselves in vocabulary chunks rather than through `modelopt.torch.distill`: its
`LogitsDistillationLoss` materialises full-vocabulary softmaxes of both models at once and wraps a
second model instance, while DMS's teacher is the same weights run with eviction off.
"""

from __future__ import annotations

import torch


def chunked_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    vocab_chunk: int = 4096,
) -> torch.Tensor:
    """Mean per-token KL(student || teacher) = sum_v p_s (log p_s - log p_t), as NVIDIA computes it.

    student_logits, teacher_logits: [B, T, V]; mask: [B, T] bool (False = padding, ignored).
    Only one [B, T, chunk] slice of probabilities is materialised at a time in float32.
    """
    assert student_logits.shape == teacher_logits.shape, (student_logits.shape, teacher_logits.shape)
    s_lse = torch.logsumexp(student_logits.float(), dim=-1)
    t_lse = torch.logsumexp(teacher_logits.float(), dim=-1)
    token_kl = torch.zeros_like(s_lse)
    for start in range(0, student_logits.shape[-1], vocab_chunk):
        s_logp = student_logits[..., start : start + vocab_chunk].float() - s_lse[..., None]
        t_logp = teacher_logits[..., start : start + vocab_chunk].float() - t_lse[..., None]
        token_kl = token_kl + (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    if mask is None:
        return token_kl.mean()
    mask = mask.to(torch.bool)
    return token_kl.masked_fill(~mask, 0.0).sum() / mask.sum().clamp_min(1)


def eviction_fraction(hard: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean of the hard decisions over (layers, heads, positions). hard: [L, B, H, T] -> [B]."""
    return hard.float().mean(dim=(0, 2, 3))


def compression_loss(hard: torch.Tensor, target_frac: float) -> torch.Tensor:
    """One-sided L1: mean over sequences of max(target_frac - frac, 0); only too little eviction costs.
    hard: [L, B, H, T] straight-through decisions (gradients flow to the decision logits)."""
    return torch.clamp(target_frac - eviction_fraction(hard), min=0).mean()
