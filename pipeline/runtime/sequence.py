"""One request's sequence: its tokens, sampling settings, and its KV streams (per layer, per KV head)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.runtime.policies.base import Stream
from pipeline.runtime.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)  # prompt + generated
    status: Status = Status.WAITING
    num_cached: int = 0  # tokens whose KV went through the model (logical length of every stream)
    streams: list[list[Stream]] | None = None  # [layer][kv_head]
    tables: np.ndarray | None = None  # int32 [layers, kv_heads, max_blocks]: the streams' block tables
    lens: np.ndarray | None = None  # int32 [layers, kv_heads]: live slots per stream
    generator: torch.Generator | None = None
    finish_reason: str | None = None
    error: str | None = None
    num_preemptions: int = 0

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
