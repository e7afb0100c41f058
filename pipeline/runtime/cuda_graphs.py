"""The decode step replayed from CUDA graphs: one launch for all layers instead of hundreds of kernels.

`ModelRunner.decode_step` is fixed-shape given (batch, width) and has no host synchronisation
(tests/test_runtime_sync.py), so it can be captured. One graph per batch bucket (1, 2, 4, 8, 16, ...,
max_batch_size), all reading the full block-table width: the paged kernel walks each stream's live length
itself, so the width costs nothing. A batch of S sequences runs in the smallest bucket >= S; the bucket's
extra rows are batch slots nobody holds: their block tables point at the scratch block, their lengths
are reset to 0 before each replay, and whatever they write lands in scratch.

Only on CUDA, only for policies whose decode needs no attention probabilities (dms, none): the others
fall back to eager decode. NEVER RUN on a GPU from this repository's machines (they have none); the
logic it relies on (fixed shapes, no sync, padding rows harmless) is tested on CPU.
"""

from __future__ import annotations

import torch

from pipeline.runtime.model_runner import ModelRunner


def capture_decode(runner: ModelRunner) -> bool:
    """Give the runner CUDA-graph decode when it runs on a GPU and its policy's decode needs no attention
    probabilities. Returns whether it did. Call before any request is attached."""
    if runner.device.type != "cuda" or runner.policy.needs_probs:
        return False
    assert runner.streams.num_active == 0, "capture before any request is attached"
    graphs = CudaGraphDecoder(runner)
    graphs.capture()
    runner.graphs = graphs
    return True


def batch_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... up to and including max_batch_size."""
    out, b = [], 1
    while b < max_batch_size:
        out.append(b)
        b *= 2
    return [*out, max_batch_size]


class CudaGraphDecoder:
    def __init__(self, runner: ModelRunner):
        if runner.device.type != "cuda":
            raise ValueError("CUDA graphs need the engine on a CUDA device")
        self.runner = runner
        st = runner.streams
        self.buckets = batch_buckets(st.max_seqs)
        self.widths = (st.max_blocks,) * st.num_layers
        dev = runner.device
        self.tokens = torch.zeros(st.max_seqs, dtype=torch.long, device=dev)
        self.pos = torch.zeros(st.max_seqs, dtype=torch.long, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pool = None

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket (largest first, so the smaller ones reuse its memory pool). The step is
        run once on a side stream first (allocations, Triton compilation), on padding rows only."""
        st, r = self.runner.streams, self.runner
        saved = st.num_active
        for b in sorted(self.buckets, reverse=True):
            self._reset_padding(0, b)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                r.decode_step(self.tokens[:b], self.pos[:b], self.widths)
            torch.cuda.current_stream().wait_stream(side)
            self._reset_padding(0, b)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[b] = r.decode_step(self.tokens[:b], self.pos[:b], self.widths)
            self.pool = graph.pool()
            self.graphs[b] = graph
        self._reset_padding(0, max(self.buckets))
        st.num_active = saved

    def _reset_padding(self, first_slot: int, last_slot: int) -> None:
        """Empty the streams of batch slots first..last-1 (nobody holds them)."""
        st = self.runner.streams
        rows = slice(first_slot * st.num_kv_heads, last_slot * st.num_kv_heads)
        st.lens[:, rows] = 0
        st.ring_flag[:, rows] = False

    def bucket(self, num_seqs: int) -> int:
        return next(b for b in self.buckets if b >= num_seqs)

    def step(self, tokens: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the decode step for S sequences in slots 0..S-1: (logits [S, V], grows [L, S*Hkv])."""
        s = tokens.shape[0]
        b = self.bucket(s)
        self.tokens[:s].copy_(tokens)
        self.pos[:s].copy_(pos)
        self.tokens[s:b].zero_()
        self.pos[s:b].zero_()
        self._reset_padding(s, b)
        self.graphs[b].replay()
        logits, grows = self.outputs[b]
        return logits[:s], grows[:, : s * self.runner.streams.num_kv_heads]
