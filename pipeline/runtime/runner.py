"""Prefill and decode steps over the paged per-head KV pool.

- Prefill (one sequence, any chunk size): the chunk's queries attend, with the training mask and hard
  decisions, to the stream's stored tokens plus the chunk; then the policy picks which of those stay and
  the stream is rewritten densely with only them. Because evicted tokens beyond the window are invisible
  to every later query, chunked prefill equals one-shot prefill.
- Decode (a batch): per stream the policy names the slot of the new token (in-place reuse of an evicted
  slot, or append), the new K/V is written there, and decode attention reads each stream's live slots
  through its block table (Triton kernel on CUDA, the torch reference on CPU).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from pipeline.runtime.block_pool import BlockPool
from pipeline.runtime.kv_cache import KVCache
from pipeline.runtime.model import Transformer, dense_attention
from pipeline.runtime.policies.base import Candidates, EvictionPolicy, Stream
from pipeline.runtime.sequence import Sequence

AttentionFn = Callable[..., torch.Tensor]


def default_attention(device: torch.device) -> AttentionFn:
    """The Triton paged-decode kernel on CUDA; elsewhere a `BlockGatherAttention` of this runner's own
    (the torch reference's semantics with whole-block gathers; the tests hold it equal to the reference)."""
    if device.type == "cuda":
        from plugins.dms_attention.decode import paged_decode_attention

        return paged_decode_attention
    return BlockGatherAttention()


class BlockGatherAttention:
    """Paged decode attention for CPU: same signature and result as
    `plugins.dms_attention.reference.reference_paged_decode_attention`.

    Flash-decoding over chunks of blocks: gather one chunk of whole blocks (contiguous block_size x D
    tiles) for every stream, scores for each GQA group's query heads as the rows of one batched matmul
    (no repeat of K/V), then fold the chunk into a running softmax (max, sum, weighted values). A chunk
    is sized to stay in the core's cache (`CHUNK_BYTES` of K), so the gathered K/V is read back from
    cache instead of memory (batch 8 at 4K tokens, in the engine: 21.8 -> 20.1 ms of attention per
    decode step against gathering whole streams first; on a warm cache 3x, but in a real step the
    pool's blocks come from memory either way).
    """

    CHUNK_BYTES = 2 << 20

    def __call__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        stream_lens: torch.Tensor,
        scale: float,
        num_kv_heads: int,
    ) -> torch.Tensor:
        """q [S, Hq, D]; k_cache, v_cache [num_blocks, block_size, D]; block_tables int32
        [S*Hkv, max_blocks] (only the first ceil(max_len / block_size) columns are read); stream_lens
        int32 [S*Hkv]. Returns [S, Hq, D]."""
        s, hq, d = q.shape
        n = s * num_kv_heads
        bs = k_cache.shape[1]
        max_len = int(stream_lens.max()) if n else 0
        if max_len == 0:
            return torch.zeros_like(q)
        nb = -(-max_len // bs)
        chunk = max(1, self.CHUNK_BYTES // (n * bs * d * k_cache.element_size()))
        min_len = int(stream_lens.min())
        lens = stream_lens.long()[:, None, None]  # [n, 1, 1]
        qg = q.reshape(n, hq // num_kv_heads, d).to(k_cache.dtype)
        run_max = torch.full((*qg.shape[:2], 1), float("-inf"), device=q.device)
        run_sum = torch.zeros_like(run_max)
        acc = torch.zeros(qg.shape, device=q.device)
        for first in range(0, nb, chunk):
            last = min(nb, first + chunk)
            ids = block_tables[:, first:last].reshape(-1).long()
            k = k_cache.index_select(0, ids).view(n, (last - first) * bs, d)
            v = v_cache.index_select(0, ids).view(n, (last - first) * bs, d)
            scores = torch.bmm(qg, k.transpose(1, 2)).float().mul_(scale)  # [n, g, chunk tokens]
            if min_len < last * bs:  # some stream ends inside this chunk
                slot = torch.arange(first * bs, last * bs, device=q.device)
                scores.masked_fill_(slot >= lens, float("-inf"))
            new_max = torch.maximum(run_max, scores.amax(-1, keepdim=True))
            weights = torch.exp(scores - new_max)
            rescale = torch.exp(run_max - new_max)
            run_sum = run_sum * rescale + weights.sum(-1, keepdim=True)
            acc = acc * rescale + torch.bmm(weights.to(v.dtype), v).float()
            run_max = new_max
        out = torch.where(lens > 0, acc / run_sum, 0.0)  # an empty stream gives zeros, not NaN
        return out.reshape(s, hq, d).to(q.dtype)


def sdpa_prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float
) -> torch.Tensor:
    """`dense_attention`'s output without its probabilities. q [B, T, Hq, D]; k, v [B, Hkv, L, D];
    visible bool [B, Hkv, T, L] (every query sees at least itself). Returns [B, T, Hq, D]."""
    b, t, hq, _ = q.shape
    hkv, length = k.shape[1], k.shape[2]
    mask = visible[:, :, None].expand(b, hkv, hq // hkv, t, length).reshape(b, hq, t, length)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k, v, attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out.transpose(1, 2)


def gathered_attention(
    q: torch.Tensor, cache: KVCache, tables: torch.Tensor, lens: torch.Tensor, scale: float, hkv: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paged decode attention in torch that also returns the probabilities (H2O / TOVA need them).

    q [S, Hq, D]; tables int32 [S*Hkv, max_blocks]; lens int32 [S*Hkv]. Returns (out [S, Hq, D],
    probs [S*Hkv, max_len] summed over each GQA group).
    """
    s, hq, d = q.shape
    g = hq // hkv
    bs = cache.block_size
    max_len = int(lens.max())
    slot = torch.arange(max_len, device=q.device)
    live = slot[None, :] < lens[:, None].long()
    rows = torch.where(live, tables[:, slot // bs].long() * bs + slot % bs, 0)
    k = cache.k.view(-1, d)[rows].float()  # [S*Hkv, L, D]
    v = cache.v.view(-1, d)[rows].float()
    scores = torch.einsum("sgd,sld->sgl", q.reshape(s * hkv, g, d).float(), k) * scale
    probs = torch.softmax(scores.masked_fill(~live[:, None], float("-inf")), dim=-1).nan_to_num(0.0)
    out = torch.einsum("sgl,sld->sgd", probs, v).reshape(s, hq, d).to(q.dtype)
    return out, probs.sum(dim=1)


def _pad_stack(rows: list[torch.Tensor], value: float | bool) -> torch.Tensor:
    """Stack tensors of different lengths along a new dim 0, padding dim 0 of each with `value`."""
    length = max(r.shape[0] for r in rows)
    out = rows[0].new_full((len(rows), length, *rows[0].shape[1:]), value)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


class ModelRunner:
    def __init__(
        self,
        model: Transformer,
        policy: EvictionPolicy,
        pool: BlockPool,
        cache: KVCache,
        max_blocks_per_stream: int,
        attention: AttentionFn | None = None,
    ):
        self.model = model
        self.policy = policy
        self.pool = pool
        self.cache = cache
        self.args = model.args
        self.max_blocks = max_blocks_per_stream
        self.device = cache.k.device
        self.attention = attention or default_attention(self.device)
        self.scale = self.args.head_dim**-0.5

    # -- stream lifetime ---------------------------------------------------------------------
    def attach(self, seq: Sequence) -> None:
        """Give a sequence empty streams (no blocks yet)."""
        a = self.args
        budget = self.policy.budget(seq.total_budget_tokens)
        seq.streams = [
            [Stream(id=self.pool.new_stream(), budget=budget) for _ in range(a.num_kv_heads)]
            for _ in range(a.num_layers)
        ]
        seq.tables = np.zeros((a.num_layers, a.num_kv_heads, self.max_blocks), dtype=np.int32)
        seq.lens = np.zeros((a.num_layers, a.num_kv_heads), dtype=np.int32)
        seq.num_cached = 0

    def release(self, seq: Sequence) -> None:
        """Return every block of the sequence to the pool."""
        for layer in seq.streams or []:
            for stream in layer:
                self.pool.free(stream.id)
        seq.streams, seq.tables, seq.lens = None, None, None

    def live_tokens(self, seq: Sequence) -> np.ndarray:
        """[layers, kv_heads] live tokens per stream."""
        return seq.lens.copy()

    # -- prefill -----------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, seq: Sequence, token_ids: list[int]) -> torch.Tensor:
        """Run one chunk of `seq` (the tokens after its cached ones); returns the last logits [V]."""
        dev = self.device
        t = len(token_ids)
        start = seq.num_cached
        pos = torch.arange(start, start + t, device=dev)[None]  # [1, T]
        x = self.model.embed(torch.tensor([token_ids], device=dev))
        rope = self.model.rope(pos)
        for li, layer in enumerate(self.model.layers):
            q, k, v, logits = layer.project(x, rope)
            dec = self.policy.decisions(logits, pos, self.args.num_kv_heads)  # [1, Hkv, T] or None
            ks, vs, kpos, kflag, stored = [], [], [], [], []
            for h, stream in enumerate(seq.streams[li]):
                n = len(stream.pos)
                rows = self.cache.rows(self.pool.table(stream.id), n)
                k_old, v_old = self.cache.read(rows)
                flag_old = torch.tensor(stream.flag, dtype=torch.bool, device=dev)
                if n and dec is not None:  # the chunk's first decision is about the last stored token
                    last = int(np.argmax(stream.pos))
                    flag_old[last] = bool(dec[0, h, 0])
                flag_new = (
                    torch.cat([dec[0, h, 1:], dec.new_zeros(1)])
                    if dec is not None
                    else torch.zeros(t, dtype=torch.bool, device=dev)
                )
                ks.append(torch.cat([k_old, k[0, :, h]]))
                vs.append(torch.cat([v_old, v[0, :, h]]))
                kpos.append(torch.cat([torch.tensor(stream.pos, dtype=torch.long, device=dev), pos[0]]))
                kflag.append(torch.cat([flag_old, flag_new]))
                stored.append(n)
            K, V = _pad_stack(ks, 0.0)[None], _pad_stack(vs, 0.0)[None]  # [1, Hkv, L, D]
            P = _pad_stack(kpos, 1 << 40)  # [Hkv, L]; padding sits "in the future": never causal
            F_ = _pad_stack(kflag, False)
            qp = pos[0]
            causal = P[:, None, :] <= qp[None, :, None]  # [Hkv, T, L] (padding has a huge position)
            far = (qp[None, :, None] - P[:, None, :]) > self.policy.mask_window()
            visible = causal & ~(far & F_[:, None, :])
            if self.policy.needs_probs:
                out, probs = dense_attention(q, K, V, visible[None], self.scale)
            else:  # nothing reads the probabilities: SDPA, ~3x faster on CPU, never materialises them
                out, probs = sdpa_prefill_attention(q, K, V, visible[None], self.scale), None
            x = layer.finish(x, out)
            for h, stream in enumerate(seq.streams[li]):
                n_all = ks[h].shape[0]
                no_probs = torch.zeros(n_all)  # read only by policies that need probabilities
                cand = Candidates(  # on the CPU: policies do small bookkeeping, whatever the device
                    pos=kpos[h].cpu(),
                    flag=kflag[h].cpu(),
                    score=torch.cat(
                        [
                            torch.as_tensor(stream.score[: stored[h]], dtype=torch.float32)
                            if stream.score is not None
                            else torch.zeros(stored[h]),
                            torch.zeros(t),
                        ]
                    ),
                    probs_sum=probs[0, h, :, :n_all].sum(0).cpu() if probs is not None else no_probs,
                    probs_last=probs[0, h, -1, :n_all].cpu() if probs is not None else no_probs,
                    budget=stream.budget,
                )
                keep, score = self.policy.prefill_keep(cand)  # CPU bool [N]
                keep_dev = keep.to(ks[h].device)
                self._rewrite(seq, li, h, ks[h][keep_dev], vs[h][keep_dev])
                stream.pos = cand.pos[keep].tolist()
                stream.flag = cand.flag[keep].tolist()
                if self.policy.needs_probs:
                    cap = self.max_blocks * self.pool.block_size
                    stream.score = np.zeros(cap, dtype=np.float32)
                    stream.score[: len(stream.pos)] = score[keep].numpy()
                self.policy.start(stream)
        seq.num_cached = start + t
        return self.model.logits(x[0, -1])

    def _rewrite(self, seq: Sequence, li: int, h: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Make stream (li, h) hold exactly rows k, v [N, D] in slots 0..N-1."""
        stream = seq.streams[li][h]
        n = k.shape[0]
        self.pool.resize(stream.id, n)  # the scheduler checked capacity beforehand
        table = self.pool.table(stream.id)
        if len(table) > self.max_blocks:
            raise ValueError(f"stream of {n} tokens exceeds the engine's max length per stream")
        seq.tables[li, h, : len(table)] = table
        seq.lens[li, h] = n
        if n:
            self.cache.write(self.cache.rows(table, n), k, v)

    # -- decode ------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token for each sequence (its last token id is fed). Returns logits [S, V]."""
        a, dev, bs = self.args, self.device, self.pool.block_size
        s = len(seqs)
        tokens = torch.tensor([[sq.token_ids[sq.num_cached]] for sq in seqs], device=dev)
        pos_list = [sq.num_cached for sq in seqs]
        pos = torch.tensor(pos_list, device=dev)[:, None]
        x = self.model.embed(tokens)
        rope = self.model.rope(pos)
        for li, layer in enumerate(self.model.layers):
            q, k, v, logits = layer.project(x, rope)
            dec = self.policy.decisions(logits, pos, self.args.num_kv_heads)
            dec_list = dec[:, :, 0].tolist() if dec is not None else None
            rows = []
            for si, sq in enumerate(seqs):
                for h, stream in enumerate(sq.streams[li]):
                    evict_prev = dec_list[si][h] if dec_list is not None else False
                    slot = self.policy.place(stream, pos_list[si], evict_prev)
                    if slot < 0:
                        slot, block = self.pool.append(stream.id)
                        if block is not None:
                            if slot // bs >= self.max_blocks:
                                raise ValueError("sequence longer than the engine's max length per stream")
                            sq.tables[li, h, slot // bs] = block
                        sq.lens[li, h] = slot + 1
                        stream.pos.append(pos_list[si])
                        stream.flag.append(False)
                    else:
                        stream.pos[slot] = pos_list[si]
                        stream.flag[slot] = False
                    rows.append(int(sq.tables[li, h, slot // bs]) * bs + slot % bs)
            rows_t = torch.tensor(rows, device=dev)
            self.cache.write(rows_t, k[:, 0].reshape(-1, a.head_dim), v[:, 0].reshape(-1, a.head_dim))
            lens_np = np.stack([sq.lens[li] for sq in seqs]).reshape(-1)
            width = max(1, -(-int(lens_np.max()) // bs))
            tables = torch.from_numpy(
                np.ascontiguousarray(
                    np.stack([sq.tables[li, :, :width] for sq in seqs]).reshape(s * a.num_kv_heads, width)
                )
            ).to(dev)
            lens = torch.from_numpy(lens_np.astype(np.int32)).to(dev)
            if self.policy.needs_probs:
                out, probs = gathered_attention(q[:, 0], self.cache, tables, lens, self.scale, a.num_kv_heads)
                probs_np = probs.cpu().numpy()
                for si, sq in enumerate(seqs):
                    for h, stream in enumerate(sq.streams[li]):
                        i = si * a.num_kv_heads + h
                        self.policy.observe(stream, probs_np[i, : lens_np[i]])
            else:
                out = self.attention(
                    q[:, 0].contiguous(), self.cache.k, self.cache.v, tables, lens, self.scale, a.num_kv_heads
                )
            x = layer.finish(x, out[:, None])
        for sq in seqs:
            sq.num_cached += 1
        return self.model.logits(x[:, 0])
