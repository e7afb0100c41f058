"""Agreement with the vanilla model on held-out prompts (how independent DMS ports report real models).

Vanilla decodes greedily; the compressed method is then teacher-forced along vanilla's tokens with its
eviction active, so both distributions are compared at the same prefix. Two figures per method:
- mean per-token KL(vanilla || method) in nats over the generated positions;
- greedy token-match rate: the fraction of positions where the method's argmax is vanilla's token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_token_kl(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> torch.Tensor:
    """KL(ref || test) per position in nats. logits: [T, V] (any float dtype). Returns [T] float32."""
    if ref_logits.shape != test_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(ref_logits.shape)} vs {tuple(test_logits.shape)}")
    ref = F.log_softmax(ref_logits.float(), dim=-1)
    test = F.log_softmax(test_logits.float(), dim=-1)
    # Clamp: tiny negative values from rounding when the two distributions are identical.
    return (ref.exp() * (ref - test)).sum(-1).clamp_min(0.0)


def token_match_rate(ref_tokens: torch.Tensor, test_logits: torch.Tensor) -> float:
    """Fraction of positions where argmax(test_logits) equals the reference token. [T], [T, V]."""
    if ref_tokens.numel() == 0:
        raise ValueError("token_match_rate: no generated tokens to compare")
    return float((test_logits.argmax(-1) == ref_tokens).float().mean())


def agreement(ref_logits: torch.Tensor, ref_tokens: torch.Tensor, test_logits: torch.Tensor) -> dict:
    """{kl, token_match} for one prompt. ref_logits/test_logits: [T, V] at the same prefixes."""
    return {
        "kl": float(per_token_kl(ref_logits, test_logits).mean()),
        "token_match": token_match_rate(ref_tokens, test_logits),
    }
