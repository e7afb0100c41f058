"""The KV tensors: one preallocated pool of blocks shared by every layer and KV head.

k, v: [num_blocks + 1, block_size, head_dim], the two halves of one tensor (one write per step). Block
ids come from `dms_core.streams.BlockPool` (one free list for all streams of all layers), so a block is
never reserved for a layer that does not need it. The extra last block is scratch: rows a step must
write but nobody reads (padding of a fixed-shape batch) land there. Slot n of a stream lives at flat
row `table[n // block_size] * block_size + n % block_size`.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self, num_blocks: int, block_size: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ):
        self.block_size = block_size
        self.head_dim = head_dim
        self.kv = torch.zeros(2, num_blocks + 1, block_size, head_dim, dtype=dtype, device=device)
        self.k, self.v = self.kv[0], self.kv[1]

    @property
    def bytes_per_token(self) -> int:
        """Bytes of K plus V for one token of one stream."""
        return 2 * self.head_dim * self.k.element_size()

    @property
    def bytes_per_block(self) -> int:
        return self.block_size * self.bytes_per_token

    def write(self, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [N, D] into flat rows [N]."""
        self.kv.view(2, -1, self.head_dim).index_copy_(1, rows, torch.stack([k, v]).to(self.kv.dtype))

    def read(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k.view(-1, self.head_dim)[rows], self.v.view(-1, self.head_dim)[rows]
