"""One request's sequence: its tokens, sampling settings, and where its KV streams live."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipeline.runtime.sampling import SamplingParams


@dataclass
class Sequence:
    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)  # prompt + generated
    num_cached: int = 0  # tokens whose KV went through the model (logical length of every stream)
    slot: int | None = None  # batch slot in the StreamTable while attached (streams: slot * Hkv + head)
    generator: torch.Generator | None = None
    error: str | None = None
    num_preemptions: int = 0
    # The first prefill chunk ends here (the context/question protocol of evaluation), or None.
    context_len: int | None = None
    # Teacher forcing: these tokens are "generated" in order instead of sampled ones.
    forced_ids: list[int] | None = None
    keep_logits: bool = False  # record the logits of every generated position (CPU float32)
    logits: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def total_budget_tokens(self) -> int:
        """Prompt plus the most tokens this request may generate."""
        return len(self.prompt_ids) + (self.params.max_tokens or 0)

    def prefill_chunks(self, chunk_tokens: int | None) -> list[list[int]]:
        """The uncached tokens split into prefill chunks: at `context_len` first (when it lies ahead),
        then at most `chunk_tokens` each (None: no limit)."""
        todo_start, end = self.num_cached, len(self.token_ids)
        cuts = [todo_start]
        if self.context_len is not None and todo_start < self.context_len < end:
            cuts.append(self.context_len)
        cuts.append(end)
        chunks = []
        for a, b in zip(cuts, cuts[1:], strict=False):
            step = chunk_tokens or (b - a)
            chunks += [self.token_ids[i : min(i + step, b)] for i in range(a, b, step)]
        return chunks
