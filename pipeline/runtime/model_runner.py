"""Prefill and decode steps over the paged per-head KV pool (`ModelRunner`).

- Prefill (one sequence, any chunk size; not the hot path): the chunk's queries attend, with the
  training mask and hard decisions, to each stream's stored tokens plus the chunk; then the policy picks
  which of those stay and the stream is rewritten densely with only them. Because evicted tokens beyond
  the window are invisible to every later query, chunked prefill equals one-shot prefill.
- Decode (the whole running batch): tensor work only, no Python loop over sequences or heads and no
  host synchronisation inside the layer loop. Per layer the policy places every stream's new token (in
  place over an evicted slot, or appended), the new K/V is written there, and decode attention reads
  each stream's live slots through its block table (the Triton kernel on CUDA, a torch gather on CPU).
  Blocks were reserved before the step from the host mirror of the lengths; `finish_step` brings the
  sampled tokens, the new lengths and next step's growth back in ONE device-to-host copy.

Sequences occupy the StreamTable's batch slots 0..n-1; a decode step takes all of them in slot order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dms_core import rule
from dms_core.streams import StreamTable
from pipeline.runtime.kv_cache import KVCache
from pipeline.runtime.model import Transformer, dense_attention
from pipeline.runtime.policies.base import Candidates, DecodeStep, EvictionPolicy
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
    `plugins.dms_attention.reference.reference_paged_decode_attention`, without a host sync (it reads
    every column of `block_tables` it is given: the runner passes only as many as the longest stream
    needs).

    Flash-decoding over chunks of blocks: gather one chunk of whole blocks (contiguous block_size x D
    tiles) for every stream, scores for each GQA group's query heads as the rows of one batched matmul
    (no repeat of K/V), then fold the chunk into a running softmax. A chunk is sized to stay in the
    core's cache (`CHUNK_BYTES` of K); when one chunk covers every block the softmax is taken directly.
    """

    CHUNK_BYTES = 2 << 20

    def __init__(self) -> None:
        self._arange: torch.Tensor | None = None

    def _slots(self, num: int, device: torch.device) -> torch.Tensor:
        """arange(num), from one cached tensor (no allocation per layer)."""
        if self._arange is None or self._arange.numel() < num or self._arange.device != device:
            self._arange = torch.arange(max(num, 4096), device=device)
        return self._arange[:num]

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
        """q [S, Hq, D]; k_cache, v_cache [num_blocks, block_size, D]; block_tables int32 [S*Hkv, nb];
        stream_lens int32 [S*Hkv] (<= nb * block_size). Returns [S, Hq, D]."""
        s, hq, d = q.shape
        n = s * num_kv_heads
        bs = k_cache.shape[1]
        nb = block_tables.shape[1]
        if n == 0 or nb == 0:
            return torch.zeros_like(q)
        chunk = max(1, self.CHUNK_BYTES // (n * bs * d * k_cache.element_size()))
        lens = stream_lens[:, None, None]  # [n, 1, 1]
        qg = q.reshape(n, hq // num_kv_heads, d).to(k_cache.dtype)
        if nb <= chunk:  # one pass: the softmax directly (the common case at short contexts)
            ids = block_tables.reshape(-1)
            k = k_cache.index_select(0, ids).view(n, nb * bs, d)
            v = v_cache.index_select(0, ids).view(n, nb * bs, d)
            scores = torch.bmm(qg, k.transpose(1, 2)).mul_(scale)
            scores.masked_fill_(self._slots(nb * bs, q.device) >= lens, float("-inf"))
            probs = torch.softmax(scores.float(), dim=-1).nan_to_num_(0.0)  # an empty stream gives zeros
            return torch.bmm(probs.to(v.dtype), v).reshape(s, hq, d).to(q.dtype)
        run_max = torch.full((*qg.shape[:2], 1), float("-inf"), device=q.device)
        run_sum = torch.zeros_like(run_max)
        acc = torch.zeros(qg.shape, device=q.device)
        for first in range(0, nb, chunk):
            last = min(nb, first + chunk)
            ids = block_tables[:, first:last].reshape(-1).long()
            k = k_cache.index_select(0, ids).view(n, (last - first) * bs, d)
            v = v_cache.index_select(0, ids).view(n, (last - first) * bs, d)
            scores = torch.bmm(qg, k.transpose(1, 2)).float().mul_(scale)  # [n, g, chunk tokens]
            slot = torch.arange(first * bs, last * bs, device=q.device)
            scores.masked_fill_(slot >= lens, float("-inf"))
            # a stream with no token in this chunk keeps max -inf: guard exp(-inf - -inf)
            new_max = torch.maximum(run_max, scores.amax(-1, keepdim=True))
            safe_max = new_max.clamp_min(torch.finfo(torch.float32).min)
            weights = torch.exp(scores - safe_max)
            rescale = torch.exp(run_max - safe_max)
            run_sum = run_sum * rescale + weights.sum(-1, keepdim=True)
            acc = acc * rescale + torch.bmm(weights.to(v.dtype), v).float()
            run_max = new_max
        out = torch.where(lens > 0, acc / run_sum.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
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
    q: torch.Tensor, cache: KVCache, pool_rows: torch.Tensor, live: torch.Tensor, scale: float, hkv: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paged decode attention in torch that also returns the probabilities (H2O / TOVA need them).

    q [S, Hq, D]; pool_rows int64 [S*Hkv, L] and live bool [S*Hkv, L] (StreamTable.live_rows). Returns
    (out [S, Hq, D], probs float32 [S*Hkv, L] summed over each GQA group, 0 where not live).
    """
    s, hq, d = q.shape
    g = hq // hkv
    k = cache.k.view(-1, d)[pool_rows].float()  # [S*Hkv, L, D]
    v = cache.v.view(-1, d)[pool_rows].float()
    scores = torch.einsum("sgd,sld->sgl", q.reshape(s * hkv, g, d).float(), k) * scale
    probs = torch.softmax(scores.masked_fill(~live[:, None], float("-inf")), dim=-1).nan_to_num(0.0)
    out = torch.einsum("sgl,sld->sgd", probs, v).reshape(s, hq, d).to(q.dtype)
    return out, probs.sum(dim=1)


def _pad_stack(rows: list[torch.Tensor], value: float | bool | int) -> torch.Tensor:
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
        cache: KVCache,
        streams: StreamTable,
        attention: AttentionFn | None = None,
    ):
        self.model = model
        self.policy = policy
        self.cache = cache
        self.streams = streams
        self.args = model.args
        self.device = cache.k.device
        self.attention = attention or default_attention(self.device)
        self.scale = self.args.head_dim**-0.5
        self.slots: list[Sequence] = []  # slots[i]: the sequence in batch slot i
        self._pending: tuple[torch.Tensor, torch.Tensor, int] | None = None  # a decode not yet synced
        self.graphs = None  # a CudaGraphDecoder (pipeline.runtime.cuda_graphs) replaying decode steps

    # -- stream lifetime ---------------------------------------------------------------------------
    def attach(self, seq: Sequence) -> None:
        """Give a sequence a batch slot with empty streams (no blocks yet)."""
        self.sync()
        seq.slot = self.streams.open(self.policy.budget(seq.total_budget_tokens))
        self.slots.append(seq)

    def release(self, seq: Sequence) -> None:
        """Return every block of the sequence to the pool; the last slot's sequence moves into its slot."""
        self.sync()
        slot = seq.slot
        moved = self.streams.close(slot)
        last = self.slots.pop()
        if moved is not None:
            self.slots[slot] = last
            last.slot = slot
        seq.slot = None

    def live_tokens(self, seq: Sequence):
        """int32 [layers, kv_heads] live tokens per stream (the host mirror, current after every step)."""
        self.sync()
        return self.streams.seq_lens(seq.slot)

    # -- prefill -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, seq: Sequence, token_ids: list[int]) -> torch.Tensor:
        """Run one chunk of `seq` (the tokens after its cached ones); returns the last logits [V]."""
        self.sync()
        dev, st, policy, hkv = self.device, self.streams, self.policy, self.args.num_kv_heads
        t = len(token_ids)
        start = seq.num_cached
        seen = start + t
        pos = torch.arange(start, seen, device=dev)[None]  # [1, T]
        x = self.model.embed(torch.tensor([token_ids], device=dev))
        rope = self.model.rope(pos)
        streams = torch.arange(seq.slot * hkv, (seq.slot + 1) * hkv, device=dev)
        budget = policy.budget(seq.total_budget_tokens)
        for li, layer in enumerate(self.model.layers):
            q, k, v, logits = layer.project(x, rope, policy.reads_decisions)
            dec = policy.decisions(logits, pos, hkv)  # [1, Hkv, T] or None
            flag_new = rule.shift_by_one(dec[0], False) if dec is not None else torch.zeros(
                hkv, t, dtype=torch.bool, device=dev
            )
            K, V, P, F_, S = self._candidates(li, streams, k[0].transpose(0, 1), v[0].transpose(0, 1),
                                             pos[0], flag_new, dec, start)
            visible = rule.hard_visibility(F_, pos[0], P, policy.mask_window())  # [Hkv, T, L]
            if policy.needs_probs:
                out, probs = dense_attention(q, K[None], V[None], visible[None], self.scale)
            else:  # nothing reads the probabilities: SDPA, which never materialises them
                out, probs = sdpa_prefill_attention(q, K[None], V[None], visible[None], self.scale), None
            x = layer.finish(x, out)
            valid = P < seen
            cand = Candidates(
                pos=P, flag=F_, score=S, valid=valid, budget=budget, seen=seen,
                probs_sum=probs[0].sum(1) if probs is not None else None,
                probs_last=probs[0, :, -1] if probs is not None else None,
            )  # fmt: skip
            keep, score = policy.prefill_keep(cand)  # bool [Hkv, L]
            self._rewrite(li, streams, K, V, cand, keep & valid, score, seen)
        seq.num_cached = seen
        context_end = seq.context_len or len(seq.prompt_ids)
        if policy.reconstructs and start < context_end <= seen:
            self._reconstruct(seq)
        rows = st.rows_of(seq.slot)
        st.grows_host[:, rows] = self._grows_of(seq)
        return self.model.logits(x[0, -1])

    @torch.inference_mode()
    def _reconstruct(self, seq: Sequence) -> None:
        """KVzip's compression (policies/kvzip.py): read the stored context again, teacher-forced after
        itself, score each context token by the most attention any reconstruction query of its stream's
        GQA group pays to it, keep each stream's top tokens. The reconstruction's KV is not stored."""
        dev, st, policy, a = self.device, self.streams, self.policy, self.args
        hkv, g = a.num_kv_heads, a.num_heads // a.num_kv_heads
        n0 = seq.num_cached
        ids = [*policy.repeat_ids, *seq.token_ids[:n0]]
        t = len(ids)
        pos = torch.arange(n0, n0 + t, device=dev)[None]
        x = self.model.embed(torch.tensor([ids], device=dev))
        rope = self.model.rope(pos)
        streams = torch.arange(seq.slot * hkv, (seq.slot + 1) * hkv, device=dev)
        keep = policy.context_keep(policy.budget(seq.total_budget_tokens), seq.total_budget_tokens - n0)
        ctx_pos = torch.arange(n0, device=dev).expand(hkv, n0)
        causal = torch.ones(t, n0 + t, dtype=torch.bool, device=dev).tril(n0)  # all context, then causal
        for li, layer in enumerate(self.model.layers):
            q, k, v, _ = layer.project(x, rope, decisions=False)
            stored = [self.cache.read(st.pool_rows(li, row, n0)) for row in streams.tolist()]
            K = torch.stack([torch.cat([ks, k[0, :, h]]) for h, (ks, _) in enumerate(stored)])  # [Hkv, L, D]
            V = torch.stack([torch.cat([vs, v[0, :, h]]) for h, (_, vs) in enumerate(stored)])
            qg = q[0].reshape(t, hkv, g, a.head_dim).permute(1, 2, 0, 3).float()  # [Hkv, G, T, D]
            scores = torch.einsum("hgtd,hld->hgtl", qg, K.float()) * self.scale
            probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
            out = torch.einsum("hgtl,hld->thgd", probs, V.float()).reshape(1, t, a.num_heads, a.head_dim)
            x = layer.finish(x, out.to(x.dtype))
            importance = probs[..., :n0].amax(dim=(1, 2))  # [Hkv, n0]
            valid = torch.ones(hkv, n0, dtype=torch.bool, device=dev)
            cand = Candidates(
                pos=ctx_pos, flag=torch.zeros_like(valid), score=torch.zeros(hkv, n0, device=dev),
                valid=valid, probs_sum=None, probs_last=None, budget=keep, seen=n0,
            )  # fmt: skip
            mask = policy.keep_by_importance(importance, valid, keep)
            self._rewrite(li, streams, K[:, :n0], V[:, :n0], cand, mask, cand.score, n0)

    def _candidates(self, li: int, streams: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                    flag_new: torch.Tensor, dec: torch.Tensor | None, start: int):
        """Each stream's stored tokens then the chunk, padded to one length L: K, V [Hkv, L, D]; positions
        P [Hkv, L] (padding "in the future", never causal); flags F [Hkv, L]; scores S [Hkv, L]."""
        st, policy, t = self.streams, self.policy, pos.shape[0]
        stored = st.lens_host[li, streams.tolist()]
        if not stored.any():  # a first chunk: nothing stored yet
            return k, v, pos.expand(len(streams), t), flag_new, torch.zeros(len(streams), t, device=k.device)
        ks, vs, ps, fs, ss = [], [], [], [], []
        for h, row in enumerate(streams.tolist()):
            rows = st.pool_rows(li, row, int(stored[h]))
            k_old, v_old = self.cache.read(rows)
            p_old = st.slot_pos[rows]
            f_old = policy.stored_flags(st, li, row, p_old, start)
            if len(rows) and dec is not None:  # the chunk's first decision is about the last stored token
                f_old = f_old | ((p_old == start - 1) & dec[0, h, 0])
            s_old = st.slot_score[rows] if policy.tracks_scores else torch.zeros(len(rows), device=k.device)
            ks.append(torch.cat([k_old, k[h]]))
            vs.append(torch.cat([v_old, v[h]]))
            ps.append(torch.cat([p_old, pos]))
            fs.append(torch.cat([f_old, flag_new[h]]))
            ss.append(torch.cat([s_old, torch.zeros(t, device=k.device)]))
        return (_pad_stack(ks, 0.0), _pad_stack(vs, 0.0), _pad_stack(ps, 1 << 40), _pad_stack(fs, False),
                _pad_stack(ss, 0.0))

    def _rewrite(self, li: int, streams: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cand: Candidates,
                 keep: torch.Tensor, score: torch.Tensor, seen: int) -> None:
        """Make each stream (li, streams[h]) hold exactly its kept candidates keep[h], in slots 0..n-1."""
        st = self.streams
        counts = keep.sum(1).tolist()
        rows = []
        for row, n in zip(streams.tolist(), counts, strict=True):
            st.resize(li, row, n)  # the scheduler checked capacity beforehand
            rows.append(st.pool_rows(li, row, n))
        rows = torch.cat(rows)
        if len(rows):
            self.cache.write(rows, k[keep], v[keep])
        kept_pos = cand.pos[keep]
        st.slot_pos[rows] = kept_pos
        owner = streams.repeat_interleave(torch.tensor(counts, device=streams.device))
        self.policy.load(st, li, owner, rows, kept_pos, cand.flag[keep], score[keep], seen)

    def _grows_of(self, seq: Sequence):
        """bool [layers, kv_heads]: whether each of the sequence's streams takes a new slot for its next
        token (computed for rows 0..its last; only its own are kept)."""
        st = self.streams
        rows = st.rows_of(seq.slot)
        pos = torch.full((rows.stop,), seq.num_cached, device=self.device)
        return self.policy.appends(st, rows.stop, pos)[:, rows].cpu().numpy()

    # -- decode ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token for each sequence (its last token id is fed). `seqs` are every attached sequence,
        in slot order. Returns logits [S, V] on the device; call `finish_step` with the sampled tokens
        (or nothing) before the host reads lengths again."""
        self.sync()
        s = len(seqs)
        assert s == self.streams.num_active and all(sq.slot == i for i, sq in enumerate(seqs)), (
            "decode takes every attached sequence in slot order"
        )
        st, dev = self.streams, self.device
        n = st.num_rows(s)
        st.reserve(n)  # blocks for every stream that grows past its last one in this step
        tokens = torch.tensor([sq.token_ids[sq.num_cached] for sq in seqs], device=dev)
        pos = torch.tensor([sq.num_cached for sq in seqs], device=dev)
        if self.graphs is not None:
            logits, grows = self.graphs.step(tokens, pos)
        else:
            logits, grows = self.decode_step(tokens, pos, st.widths(n))
        for sq in seqs:
            sq.num_cached += 1
        self._pending = (st.lens[:, :n], grows, n)
        return logits

    def decode_step(
        self, tokens: torch.Tensor, pos: torch.Tensor, widths: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The device part of a decode step: no host synchronisation (tests/test_runtime_sync.py).

        tokens, pos int64 [S] (the batch slots 0..S-1); widths: block-table columns to read per layer. Returns
        (logits [S, V], grows bool [layers, S * Hkv]: whether each stream's next token takes a new slot).
        """
        st, a, policy = self.streams, self.args, self.policy
        hkv, d = a.num_kv_heads, a.head_dim
        n = tokens.shape[0] * hkv
        pos_rows = pos.repeat_interleave(hkv)  # [n]
        ring = rule.RingStep.at(st.row_index[:n], pos_rows, st.ring_size) if st.ring_size else None
        step = DecodeStep(n, widths, pos_rows, st.append_rows(n), ring)
        x = self.model.embed(tokens[:, None])
        rope = self.model.rope(pos[:, None])
        for li, layer in enumerate(self.model.layers):
            q, k, v, logits = layer.project(x, rope, policy.reads_decisions)
            dec = policy.decisions(logits, pos[:, None], hkv)
            rows = policy.place(st, li, step, dec.reshape(n) if dec is not None else None)
            self.cache.write(rows, k.reshape(n, d), v.reshape(n, d))
            st.slot_pos[rows] = pos_rows
            if policy.needs_probs:
                pool_rows, live = st.live_rows(li, n, widths[li])
                out, probs = gathered_attention(q[:, 0], self.cache, pool_rows, live, self.scale, hkv)
                policy.observe(st, li, step, pool_rows, live, probs)
            else:
                out = self.attention(
                    q[:, 0], self.cache.k, self.cache.v, st.tables[li, :n, : widths[li]], st.lens[li, :n],
                    self.scale, hkv,
                )
            x = layer.finish(x, out[:, None])
        return self.model.logits(x[:, 0]), policy.appends(st, n, pos_rows + 1)

    def finish_step(self, tokens: torch.Tensor | None = None) -> list[int]:
        """End a step: the sampled tokens [S] (device) and, after a decode, the new lengths and next
        step's growth come to the host in one copy. Returns the tokens as ints ([] if none)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return [] if tokens is None else tokens.tolist()
        lens, grows, n = pending
        parts = [lens.reshape(-1), grows.reshape(-1).to(lens.dtype)]
        if tokens is not None:
            parts.append(tokens.to(lens.dtype))
        host = torch.cat(parts).cpu()  # the step's one device-to-host copy
        size = lens.numel()
        self.streams.refresh(n, host[:size].view(lens.shape), host[size : 2 * size].view(lens.shape).bool())
        return host[2 * size :].tolist()

    def sync(self) -> None:
        """Bring the host mirror up to date if a decode step has not been finished yet."""
        if self._pending is not None:
            self.finish_step()
