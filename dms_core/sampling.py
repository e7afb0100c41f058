"""The sampler: greedy, temperature, top-k, top-p, per-request seeds, one token per row of a batch.

In the leaf because both engines sample with it: the torch engine (pipeline.runtime, whose
`SamplingParams` carries and checks the settings) and the TensorRT host driver (plugins/trtllm), which
cannot import `pipeline`. Any object with `temperature`, `top_k` and `top_p` will do as the settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def sample_batch(
    logits: torch.Tensor, params: Sequence[Any], generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """One token per row of logits [S, V] (float32, on the engine's device). Returns int64 [S] there.

    Greedy rows take the argmax. Sampled rows are tempered, cut to top-k and top-p (each row its own
    settings), and drawn by inverse CDF from one uniform number per row, taken from the request's own
    generator (or torch's global one): a seeded request gets the same tokens whatever it is batched with.
    """
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if p.temperature > 0.0]
    if not sampled:
        return tokens
    dev = logits.device
    rows = torch.tensor(sampled, device=dev)
    picked = [params[i] for i in sampled]
    temperature = torch.tensor([p.temperature for p in picked], device=dev)
    x = logits[rows].float() / temperature[:, None]
    order = torch.sort(x, dim=-1, descending=True)
    top_k = torch.tensor([p.top_k if p.top_k > 0 else x.shape[-1] for p in picked], device=dev)
    kth = order.values.gather(1, (top_k.clamp(max=x.shape[-1]) - 1)[:, None])
    probs = torch.softmax(x.masked_fill(x < kth, float("-inf")), dim=-1)
    top_p = torch.tensor([p.top_p for p in picked], device=dev)
    if any(p.top_p < 1.0 for p in picked):
        sorted_probs = probs.gather(1, order.indices)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= top_p[:, None], 0.0)
        probs = torch.zeros_like(probs).scatter(1, order.indices, sorted_probs)
    uniform = torch.stack([torch.rand((), generator=generators[i]) for i in sampled]).to(dev)
    cdf = torch.cumsum(probs, dim=-1)
    drawn = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True)[:, 0]
    tokens[rows] = drawn.clamp(max=x.shape[-1] - 1)
    return tokens
