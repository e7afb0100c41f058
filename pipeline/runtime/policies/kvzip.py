"""KVzip (Kim et al. 2025, arXiv 2505.23416): query-agnostic context compression by reconstruction.

Once a request's context is prefilled (its first prefill chunk under the context/question protocol, else
the whole prompt), the model reads the context once more, teacher-forced after it (`repeat_ids`, then the
context tokens: "repeat what you just read"). The importance of a context token in a stream is the
largest attention any reconstruction query of that stream's GQA group pays to it; each stream keeps its
top tokens within a fixed budget (the request's budget at the target CR, less the tokens that will
follow the context), the rest of its blocks go back to the pool. The reconstruction's own KV is never
stored. Later tokens (the question, the generation) are appended: KVzip compresses the context, not
the generation.

The model runner runs the reconstruction (`ModelRunner._reconstruct`) because it needs a forward pass
through every layer; the policy decides what stays.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.runtime.policies.base import fixed_budget
from pipeline.runtime.policies.none import NoEviction


@dataclass
class KVzipPolicy(NoEviction):
    """Keeps every token as it comes (prefill and decode place like `none`); the context is compressed
    once, after its reconstruction pass."""

    cr: float = 8.0
    repeat_ids: tuple[int, ...] = ()  # tokens asking to repeat the context (none: the context again)
    name: str = "kvzip"
    reconstructs: bool = True

    def budget(self, total_tokens: int) -> int:
        return fixed_budget(total_tokens, self.cr, 2)

    def context_keep(self, budget: int, after_context: int) -> int:
        """Context tokens a stream keeps: the budget less what will follow the context."""
        return max(2, budget - after_context)

    def keep_by_importance(self, importance: torch.Tensor, valid: torch.Tensor, keep: int) -> torch.Tensor:
        """bool [H, N]: each stream's `keep` most important valid tokens. importance float32 [H, N]."""
        k = min(keep, importance.shape[1])
        top = importance.masked_fill(~valid, float("-inf")).topk(k, dim=1).indices
        out = torch.zeros_like(valid)
        out.scatter_(1, top, True)
        return out & valid

    def expected_live_tokens(self, total_tokens: int, kept_fraction: float) -> int:
        return total_tokens  # prefill holds the whole context before it is compressed
