"""The host driver of the DMS TensorRT engine pair: serves requests with continuous batching over the
per-(layer, sequence, KV head) pool, talking to the engines through sessions (plugins/trtllm/sessions.py).

    driver = load_driver("build/qwen3-8b/build/engine")               # TensorRT-LLM sessions, on the GPU
    driver = load_driver(engine_dir, session="emulated")              # the same computation on CPU
    handle = driver.submit(prompt_ids, SamplingParams(max_tokens=32))  # thread-safe; returns at once
    for event in handle: ...                                           # TokenEvent per token
    handle.result()                                                    # Completion; handle.cancel()

The request interface is the torch engine's (pipeline.runtime.engine: submit / handle / start / stop /
pool_stats, events carrying the request's live KV tokens and compression ratio), so the Triton engine
model serves either. Sampling settings are any object with pipeline.runtime.sampling.SamplingParams'
fields. Each step is one engine call (or a few, for a prefill longer than a call):

- prefill: newly admitted sequences run through the context engine, packed, in chunks of at most the
  engine's token budget (a later chunk of a sequence at most dms_window_size tokens, so the one decision
  it cannot know yet, its first token's about the last stored token, cannot hide that token from any of
  its queries); each chunk also attends to what its streams stored from earlier chunks. After each chunk
  every stream keeps its survivors (`rule.survivors`), densely, in the pool.
- decode: every running sequence gets one token from the generation engine. Before the call the host
  places each stream's new token (`rule.ring_place_`: over the slot of the token leaving the window if
  that one was evicted, else the next free slot, whose block was reserved a step ahead); after it, the
  new tokens' decisions mark the previous tokens (`rule.ring_record_`, shift by one).

The bookkeeping is dms_core's StreamTable and rule (the torch engine's, one implementation). Admission
reserves a prompt's worst case (every token stored); a decode step that finds the pool short preempts
the youngest sequence (freed, requeued, recomputed from its tokens: prefill is exact, so its output does
not change). Imports torch, numpy, dms_core and plugins only (it runs inside TensorRT-LLM's environment).
"""

from __future__ import annotations

import itertools
import json
import threading
import traceback
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dms_core import rule
from dms_core.config import DmsConfig
from dms_core.sampling import sample_batch
from dms_core.serving import Completion, Outbox, RequestHandle, StepLoop
from dms_core.streams import BlockPool, StreamTable
from plugins.dms_attention.prefill import NEVER
from plugins.trtllm import engine_io
from plugins.trtllm.pool import plan_pool
from plugins.trtllm.sessions import EmulatedSession, EngineSession, TrtllmSession, read_trtllm_checkpoint

MANIFEST = "dms_build.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class PairPlan:
    """What the driver needs to know about a built pair (from its manifest and the model's config)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    dms: DmsConfig
    dtype: str
    block_size: int
    pool_blocks: int  # every layer's blocks (the pool tensors hold one more: the scratch block)
    max_batch_size: int
    max_input_len: int
    max_output_len: int
    max_num_tokens: int  # tokens of one context-engine call
    eos_token_ids: tuple[int, ...] = ()

    @property
    def max_blocks_per_stream(self) -> int:
        return -(-(self.max_input_len + self.max_output_len) // self.block_size)

    @classmethod
    def from_config(cls, config: dict, limits: dict, eos: Sequence[int] = ()) -> PairPlan:
        """config: the TensorRT-LLM checkpoint's config.json; limits: the manifest's (build_engine.py)."""
        dms = DmsConfig.from_hf_config(config)
        if dms is None:
            raise ValueError("config has no dms_window_size: a plain model is served by one stock engine")
        tp = int((config.get("mapping") or {}).get("tp_size", 1))
        if tp != 1:
            raise ValueError(f"the driver runs tp_size 1 engines; this pair was built for tp_size {tp}")
        dtype = config.get("dtype", "float32")
        pool = plan_pool(config, int(limits["tokens_per_block"]), int(limits["kv_pool_tokens"]), dtype)
        return cls(
            num_layers=pool.num_layers,
            num_kv_heads=pool.kv_heads_per_rank,
            head_dim=pool.head_dim,
            vocab_size=config["vocab_size"],
            dms=dms,
            dtype=dtype,
            block_size=pool.block_size,
            pool_blocks=pool.total_blocks,
            max_batch_size=int(limits["max_batch_size"]),
            max_input_len=int(limits["max_input_len"]),
            max_output_len=int(limits["max_output_len"]),
            max_num_tokens=int(limits.get("max_num_tokens") or limits["max_input_len"]),
            eos_token_ids=tuple(eos),
        )


@dataclass
class _Request:
    request_id: int
    prompt_ids: list[int]
    params: Any
    eviction: bool
    keep_logits: bool = False
    token_ids: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens every stream has seen
    slot: int | None = None
    generator: torch.Generator | None = None
    preemptions: int = 0
    logits: list[torch.Tensor] = field(default_factory=list)
    handle: RequestHandle | None = None

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)


class PairDriver(StepLoop):
    def __init__(
        self,
        plan: PairPlan,
        context: EngineSession,
        generation: EngineSession,
        device: str | torch.device = "cpu",
        eviction: bool = True,
    ):
        super().__init__("dms-pair-driver")
        self.plan, self.context, self.generation = plan, context, generation
        self.device = torch.device(device)
        self.eviction = eviction and not plan.dms.disable_eviction
        self.window = plan.dms.window_size
        if plan.block_size >= self.window:
            raise ValueError(
                f"block size {plan.block_size} must be smaller than dms_window_size {self.window}"
            )
        self.pool = BlockPool(plan.pool_blocks, plan.block_size)
        self.streams = StreamTable(
            plan.num_layers,
            plan.num_kv_heads,
            plan.max_batch_size,
            plan.max_blocks_per_stream,
            self.pool,
            ring=self.window + 1,
            device=self.device,
        )
        shape = (plan.pool_blocks + 1, plan.block_size, plan.head_dim)  # + the scratch block
        self.k_pool = torch.zeros(shape, dtype=DTYPES[plan.dtype], device=self.device)
        self.v_pool = torch.zeros_like(self.k_pool)
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []  # prefilled, in slot order
        self.num_preemptions = 0
        self._ids = itertools.count()
        self._live: dict[int, _Request] = {}
        self._one_step = threading.Lock()

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.plan.eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids: Sequence[int]) -> None:
        self.plan = replace(self.plan, eos_token_ids=tuple(ids))

    # -- requests ------------------------------------------------------------------------------
    def submit(
        self,
        prompt: Sequence[int],
        params: Any = None,
        *,
        keep_logits: bool = False,
        eviction: bool | None = None,
        outbox: Outbox | None = None,
    ) -> RequestHandle:
        """Queue a request of token ids (thread-safe). Raises ValueError for one the engines cannot take.
        eviction: None follows the driver; False serves this request with eviction off. outbox: where its
        events go instead of the handle (dms_core.serving.RequestHandle)."""
        p = self.plan
        if params is None:
            raise ValueError("give sampling settings (pipeline.runtime.sampling.SamplingParams)")
        if hasattr(params, "validate"):
            params.validate()
        if params.max_tokens is None:
            params = replace(params, max_tokens=p.max_output_len)
        ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        if len(ids) > p.max_input_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens, over the engine's max_input_len {p.max_input_len}"
            )
        if params.max_tokens > p.max_output_len:
            raise ValueError(
                f"max_tokens {params.max_tokens} is over the engine's max_output_len {p.max_output_len}"
            )
        bad = [t for t in ids if not 0 <= t < p.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} outside the vocabulary [0, {p.vocab_size})")
        req = _Request(
            next(self._ids),
            ids,
            params,
            self.eviction if eviction is None else eviction and self.eviction,
            keep_logits,
            token_ids=list(ids),
        )
        if params.seed is not None:
            req.generator = torch.Generator().manual_seed(int(params.seed))
        req.handle = RequestHandle(self, req.request_id, req, outbox=outbox)
        return self._enqueue(req.handle)

    def generate(self, prompts: Sequence[Sequence[int]], params: Any, **kw: Any) -> list[Completion]:
        handles = [self.submit(p, params, **kw) for p in prompts]
        return [h.result() for h in handles]

    # -- the step loop (start / stop / has_work: dms_core.serving.StepLoop) ----------------------
    def _busy(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> int:
        """One step: a prefill of newly admitted sequences, or a decode step of every running one.
        Returns how many sequences ran (0: idle)."""
        with self._one_step:
            inbox, cancelled = self._take_inbox()
            for req in (handle.request for handle in inbox):
                self._live[req.request_id] = req
                self.waiting.append(req)
            for rid in cancelled:
                if rid in self._live:
                    self._complete(self._live[rid], "cancelled")
            admitted = self._admit()
            seqs = admitted or self._make_room()
            if not seqs:
                return 0
            try:
                logits = self._prefill(admitted) if admitted else self._decode(seqs)
                tokens = sample_batch(logits, [r.params for r in seqs], [r.generator for r in seqs]).tolist()
            except Exception as exc:  # a failing batch must not take the driver (or other requests) down
                detail = "".join(traceback.format_exception_only(exc)).strip()
                for req in seqs:
                    self._complete(req, "error", f"engine step failed: {detail}")
                return len(seqs)
            if admitted:
                self.running = sorted(self.running + admitted, key=lambda r: r.slot)
            kept = logits.float().cpu() if any(r.keep_logits for r in seqs) else None
            for i, (req, token) in enumerate(zip(seqs, tokens, strict=True)):
                if req.keep_logits:
                    req.logits.append(kept[i])
                self._postprocess(req, token)
            return len(seqs)

    def _postprocess(self, req: _Request, token: int) -> None:
        req.token_ids.append(token)
        live, ratio = self._kv_figures(req)
        req.handle._emit(token, live, ratio)
        p = req.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            self._complete(req, "stop")
        elif req.num_generated >= p.max_tokens:
            self._complete(req, "length")

    def _kv_figures(self, req: _Request) -> tuple[int, float]:
        lens = torch.from_numpy(self.streams.seq_lens(req.slot).astype(np.int64))
        return int(lens.sum()), rule.compression_ratio(lens, torch.full_like(lens, req.num_cached))

    def _complete(self, req: _Request, reason: str, error: str | None = None) -> None:
        stats: dict[str, Any] = {
            "prompt_tokens": len(req.prompt_ids),
            "generated_tokens": req.num_generated,
            "preemptions": req.preemptions,
            "policy": "dms" if req.eviction else "none",
        }
        if req.slot is not None and req.num_cached:
            lens = self.streams.seq_lens(req.slot)
            live, ratio = self._kv_figures(req)
            stats |= {
                "live_kv_tokens": live,
                "live_tokens_per_stream": lens.tolist(),
                "compression_ratio": ratio,
            }
        self._release(req)
        if req in self.waiting:
            self.waiting.remove(req)
        self._live.pop(req.request_id, None)
        logits = torch.stack(req.logits) if req.keep_logits and req.logits else None
        gen = req.token_ids[len(req.prompt_ids) :]
        req.handle._finish(
            Completion(req.request_id, list(req.prompt_ids), gen, "", reason, error, stats, logits)
        )

    def pool_stats(self) -> dict[str, Any]:
        with self._one_step:
            return self.pool.stats() | {
                "running": len(self.running),
                "waiting": len(self.waiting),
                "preemptions": self.num_preemptions,
            }

    # -- scheduling ----------------------------------------------------------------------------
    def _streams_per_seq(self) -> int:
        return self.plan.num_layers * self.plan.num_kv_heads

    def _admit(self) -> list[_Request]:
        """Waiting requests whose prompt fits the pool whole (every token stored) beside what the running
        sequences' next step takes."""
        st, admitted = self.streams, []
        committed = st.blocks_needed(st.num_rows(len(self.running)))
        first_step = self._streams_per_seq()  # a new sequence's first decode step: a block per stream
        while self.waiting and len(self.running) + len(admitted) < self.plan.max_batch_size:
            req = self.waiting[0]
            need = self._streams_per_seq() * self.pool.blocks_for(len(req.token_ids)) + first_step
            if need > self.pool.num_blocks:
                self._complete(
                    req,
                    "error",
                    f"request needs {need} KV blocks but the pool has {self.pool.num_blocks}; "
                    "raise build.kv_pool_tokens or shorten the prompt",
                )
                continue
            if not self.pool.can_allocate(committed + need):
                break
            self.waiting.popleft()
            req.slot = st.open()
            admitted.append(req)
            committed += need
        return admitted

    def _make_room(self) -> list[_Request]:
        """The running sequences, after preempting the youngest until their decode step fits the pool."""
        st = self.streams
        while self.running and not self.pool.can_allocate(st.blocks_needed(st.num_rows(len(self.running)))):
            if len(self.running) == 1:
                self._complete(
                    self.running[0],
                    "error",
                    "KV pool exhausted by a single sequence; raise build.kv_pool_tokens or lower max_tokens",
                )
                return []
            youngest = max(self.running, key=lambda r: r.request_id)
            self._release(youngest)
            youngest.num_cached, youngest.preemptions = 0, youngest.preemptions + 1
            self.num_preemptions += 1
            self.waiting.appendleft(youngest)
        return list(self.running)

    def _release(self, req: _Request) -> None:
        """Free a sequence's blocks; the last slot's sequence moves into its slot (StreamTable.close)."""
        if req.slot is None:
            return
        moved = self.streams.close(req.slot)
        if req in self.running:
            self.running.remove(req)
        if moved is not None:
            for other in self._live.values():
                if other.slot == moved:
                    other.slot = req.slot
        req.slot = None
        self.running.sort(key=lambda r: r.slot)

    # -- prefill (context engine) --------------------------------------------------------------
    def _prefill(self, seqs: list[_Request]) -> torch.Tensor:
        """Every uncached token of `seqs` through the context engine, in calls of at most max_num_tokens
        tokens; returns each sequence's last logits [S, V]."""
        last: dict[int, torch.Tensor] = {}
        while len(last) < len(seqs):
            budget, batch = self.plan.max_num_tokens, []
            for req in seqs:
                todo = len(req.token_ids) - req.num_cached
                if req.request_id in last or budget == 0 or todo == 0:
                    continue
                size = min(todo, budget, self.window if req.num_cached else todo)
                batch.append((req, req.token_ids[req.num_cached : req.num_cached + size]))
                budget -= size
            logits = self._context_call(batch)
            for (req, _), row in zip(batch, logits, strict=True):
                if req.num_cached == len(req.token_ids):
                    last[req.request_id] = row
                    self._mirror_growth(req)
        return torch.stack([last[r.request_id] for r in seqs])

    def _context_call(self, batch: list[tuple[_Request, list[int]]]) -> torch.Tensor:
        st, dev, hkv = self.streams, self.device, self.plan.num_kv_heads
        starts = [req.num_cached for req, _ in batch]
        sizes = [len(chunk) for _, chunk in batch]
        ids = torch.tensor([t for _, chunk in batch for t in chunk], dtype=torch.int32, device=dev)
        pos = torch.cat(
            [torch.arange(s, s + n, dtype=torch.int32) for s, n in zip(starts, sizes, strict=True)]
        ).to(dev)
        cu = torch.tensor(np.concatenate([[0], np.cumsum(sizes)]), dtype=torch.int32, device=dev)
        evictable = torch.ones(len(ids), dtype=torch.int32, device=dev)
        evictable[cu[1:].long() - 1] = 0  # each chunk's last token: its decision comes with the next token
        for (req, _), a, b in zip(batch, cu[:-1].tolist(), cu[1:].tolist(), strict=True):
            if not req.eviction:
                evictable[a:b] = 0
        rows = torch.tensor([req.slot * hkv + h for req, _ in batch for h in range(hkv)], device=dev)
        start_rows = torch.tensor(starts, device=dev).repeat_interleave(hkv)
        inputs = {
            "input_ids": ids,
            "position_ids": pos,
            "last_token_ids": cu[1:].contiguous(),
            engine_io.POSITIONS: pos,
            engine_io.CU_SEQLENS: cu,
            engine_io.EVICTABLE: evictable,
            engine_io.K_POOL: self.k_pool,
            engine_io.V_POOL: self.v_pool,
        }
        for li in range(self.plan.num_layers):
            lens = st.lens[li, rows]
            width = max(1, self.pool.blocks_for(int(st.lens_host[li, rows.cpu().numpy()].max())))
            inputs[engine_io.tables(li)] = st.tables[li, rows, :width].contiguous()
            inputs[engine_io.lens(li)] = lens.contiguous()
            inputs[engine_io.expiry(li)] = self._past_expiry(li, rows, start_rows, width)
        out = self.context.run(inputs)
        for li in range(self.plan.num_layers):
            logit = out[engine_io.logits(li)]
            k, v = out[engine_io.keys(li)], out[engine_io.values(li)]
            for (req, _), a, b in zip(batch, cu[:-1].tolist(), cu[1:].tolist(), strict=True):
                decided = rule.evicts(logit[a:b]) & req.eviction  # [T, Hkv]: decision AT each token
                for h in range(hkv):
                    self._keep_survivors(
                        li, req.slot * hkv + h, req.num_cached, decided[:, h], k[a:b, h], v[a:b, h]
                    )
        for (req, _), n in zip(batch, sizes, strict=True):
            req.num_cached += n
        return out["logits"]

    def _past_expiry(self, layer: int, rows: torch.Tensor, start: torch.Tensor, width: int) -> torch.Tensor:
        """int32 [R, width * block_size]: for each stored slot of streams `rows`, the first query position
        that no longer sees it (rule.visible_until over rule.stored_evicted)."""
        st, bs = self.streams, self.plan.block_size
        slot = torch.arange(width * bs, device=self.device)
        live = slot[None, :] < st.lens[layer, rows, None]
        blocks = st.tables[layer, rows, :width].long().repeat_interleave(bs, dim=1)
        pos = st.slot_pos[blocks * bs + slot % bs]
        evicted = rule.stored_evicted(st.ring_flag[layer, rows], pos.clamp_min(0), start[:, None]) & live
        until = rule.visible_until(pos, evicted, self.window, NEVER)
        return torch.where(live, until, 0).to(torch.int32).contiguous()

    def _keep_survivors(
        self, layer: int, row: int, start: int, decided: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Rewrite stream (layer, row) with the survivors of what it stored plus the chunk's tokens
        (positions start..start+T-1, `decided` [T] the decision made at each), densely from slot 0."""
        st, d = self.streams, self.plan.head_dim
        n_old, t = int(st.lens_host[layer, row]), len(decided)
        old_rows = st.pool_rows(layer, row, n_old)
        old_pos = st.slot_pos[old_rows]
        old_flag = rule.stored_evicted(st.ring_flag[layer, row], old_pos, start)
        if n_old:  # the chunk's first decision is about the last stored token (shift by one)
            old_flag = old_flag | ((old_pos == start - 1) & decided[0])
        pos = torch.cat([old_pos, torch.arange(start, start + t, device=self.device)])
        flag = torch.cat([old_flag, rule.shift_by_one(decided, False)])
        keep = rule.survivors(pos, flag, start + t, self.window)
        keys = torch.cat([self.k_pool.view(-1, d)[old_rows], k.to(self.k_pool.dtype)])[keep]
        values = torch.cat([self.v_pool.view(-1, d)[old_rows], v.to(self.v_pool.dtype)])[keep]
        st.resize(layer, row, int(keep.sum()))
        new_rows = st.pool_rows(layer, row, len(keys))
        self.k_pool.view(-1, d)[new_rows] = keys
        self.v_pool.view(-1, d)[new_rows] = values
        st.slot_pos[new_rows] = pos[keep]
        rule.ring_load_(
            st.ring_row[layer], st.ring_flag[layer], row, pos[keep], flag[keep], new_rows, start + t
        )

    def _mirror_growth(self, req: _Request) -> None:
        """Whether each of the sequence's streams takes a new slot for its next token (host mirror)."""
        st, rows = self.streams, self.streams.rows_of(req.slot)
        pos = torch.full((rows.stop,), req.num_cached, device=self.device)
        grows = rule.ring_appends(
            st.ring_flag, rule.RingStep.at(st.row_index[: rows.stop], pos, st.ring_size)
        )
        st.grows_host[:, rows] = grows[:, rows].cpu().numpy()

    # -- decode (generation engine) ------------------------------------------------------------
    def _decode(self, seqs: list[_Request]) -> torch.Tensor:
        """One token for every running sequence (slot order 0..S-1). Returns logits [S, V]."""
        st, dev, hkv, layers = self.streams, self.device, self.plan.num_kv_heads, self.plan.num_layers
        n = st.num_rows(len(seqs))
        pos_seq = torch.tensor([r.num_cached for r in seqs], dtype=torch.int64, device=dev)
        pos = pos_seq.repeat_interleave(hkv)
        step = rule.RingStep.at(st.row_index[:n], pos, st.ring_size)
        st.reserve(n)  # blocks for the streams about to grow (known from the host mirror)
        width = st.width(n)
        append = st.append_rows(n)
        pos32 = pos_seq.to(torch.int32)
        last = torch.tensor([r.token_ids[-1] for r in seqs], dtype=torch.int32, device=dev)
        inputs = {
            "input_ids": last,
            "position_ids": pos32,
            engine_io.POSITIONS: pos32,
            "last_token_ids": torch.arange(1, len(seqs) + 1, dtype=torch.int32, device=dev),
            engine_io.K_POOL: self.k_pool,
            engine_io.V_POOL: self.v_pool,
        }
        for li in range(layers):
            place = rule.ring_place_(st.ring_row[li], st.ring_flag[li], st.lens[li], step, append[li], None)
            st.slot_pos[place] = pos
            inputs[engine_io.write_rows(li)] = place.to(torch.int32)
            inputs[engine_io.tables(li)] = st.tables[li, :n, :width].contiguous()
            inputs[engine_io.lens(li)] = st.lens[li, :n].contiguous()
        out = self.generation.run(inputs)
        evicting = torch.tensor([r.eviction for r in seqs], device=dev).repeat_interleave(hkv)
        for li in range(layers):
            rule.ring_record_(
                st.ring_flag[li], step, rule.evicts(out[engine_io.logits(li)].reshape(-1)) & evicting
            )
        for r in seqs:
            r.num_cached += 1
        grows = rule.ring_appends(st.ring_flag, rule.RingStep.at(st.row_index[:n], pos + 1, st.ring_size))
        st.refresh(n, st.lens[:, :n].cpu(), grows.cpu())
        return out["logits"]


def read_manifest(engine_dir: Path) -> dict:
    path = Path(engine_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {path}: not a DMS engine pair built by plugins/trtllm/build_engine.py")
    manifest = json.loads(path.read_text())
    if sorted(manifest.get("engines", {})) != ["context", "generation"]:
        raise ValueError(f"{path} lists engines {sorted(manifest.get('engines', {}))}, not the DMS pair")
    return manifest


def load_driver(
    engine_dir: str | Path,
    session: str = "trtllm",
    eviction: bool = True,
    pool_tokens: int | None = None,
    device: str | None = None,
    kernels: bool | None = None,
) -> PairDriver:
    """The driver of a built pair (`engine/` of the build stage: context/, generation/, dms_build.json,
    tokenizer/). session "trtllm" runs the engines (GPU, TensorRT-LLM 1.2.1); "emulated" runs the same
    computation from the converted checkpoint named by the manifest (any device; CPU by default).
    pool_tokens overrides the manifest's kv_pool_tokens (smaller only: the engines' profiles cap it);
    kernels: the emulated session's choice of kernels or their references (sessions.EmulatedSession)."""
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    limits = dict(manifest["limits"])
    if pool_tokens:
        limits["kv_pool_tokens"] = min(int(pool_tokens), int(limits["kv_pool_tokens"]))
    ckpt = Path(manifest["checkpoint_dir"])
    ckpt = ckpt if ckpt.is_absolute() else (engine_dir / ckpt).resolve()
    gen = engine_dir / "tokenizer" / "generation_config.json"
    eos = json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None
    eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
    if session == "emulated":
        config, weights = read_trtllm_checkpoint(ckpt)
        plan = PairPlan.from_config(config, limits, eos)
        device = device or "cpu"
        dtype = torch.float32 if torch.device(device).type == "cpu" else DTYPES[plan.dtype]
        plan = replace(plan, dtype=str(dtype).removeprefix("torch."))
        phases = [EmulatedSession(p, config, weights, device, dtype, kernels) for p in engine_io.PHASES]
    elif session == "trtllm":
        config = json.loads((engine_dir / "context" / "config.json").read_text())["pretrained_config"]
        plan = PairPlan.from_config(config, limits, eos)
        device = device or "cuda"
        phases = [TrtllmSession(engine_dir / p) for p in engine_io.PHASES]
    else:
        raise ValueError(f"session must be 'trtllm' or 'emulated', got {session!r}")
    return PairDriver(plan, *phases, device=device, eviction=eviction)
