"""The DMS inference engine: continuous batching over a per-head paged KV pool with eviction policies.

Quick use:

    engine = Engine.from_dir("build/tiny-qwen3/build/engine")          # or Engine.from_hf(hf_dir, ...)
    outs = engine.generate(["2+2="], max_tokens=16)                    # list[Completion]
    for event in engine.stream("Once", max_tokens=16, temperature=0.8, seed=1):
        print(event.text, end="")

Serving from other threads (e.g. a Triton python backend with in-flight batching):

    engine.start()                                # background step loop (daemon thread)
    handle = engine.submit("prompt", SamplingParams(max_tokens=32))   # thread-safe, returns at once
    for event in handle:                          # TokenEvent(token_id, text) as tokens are produced
        ...
    completion = handle.result()                  # Completion with token_ids, text, finish_reason, stats
    handle.cancel()                               # optional: stop early, frees its KV blocks
    engine.stop()

Without `start()`, iterating a handle or calling `generate` drives `engine.step()` in the caller's
thread; `step()` may also be called directly (one scheduler step: a prefill or a batched decode).
`submit` validates at once and raises ValueError for an empty prompt, a prompt over max_input_len,
max_tokens <= 0 or over max_output_len. A request that can never fit the KV pool finishes with
finish_reason "error" and a message; requests that do not fit now are queued, never dropped.

Evaluation and tests use two request options of `submit`: `context_len` (the first prefill chunk ends
there: a context is compressed before the question is read through it) and `forced_ids` with
`keep_logits` (teacher forcing: those tokens are generated instead of sampled ones, and the logits of
every position come back in `Completion.logits`); `Engine.score` wraps the latter.

Completion.stats: prompt_tokens, generated_tokens, live_kv_tokens (over all layers and KV heads at the
end), live_tokens_per_stream ([layers][kv_heads]), kv_bytes (bytes of the blocks it held),
compression_ratio (1 / mean(kept / length) over layers and heads), preemptions. Every TokenEvent carries
the request's live KV tokens and compression ratio after that token.
`engine.pool_stats()`: blocks used / free, bytes, running / waiting requests, preemptions so far, and
the mean compression ratio of the running requests.
"""

from __future__ import annotations

import itertools
import queue
import threading
import traceback
from collections.abc import Callable, Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from dms_core import rule
from dms_core.streams import BlockPool, StreamTable
from pipeline.hf_files import has_tokenizer, load_tokenizer, read_eos_ids
from pipeline.runtime.cuda_graphs import capture_decode
from pipeline.runtime.detokenize import IncrementalDecoder
from pipeline.runtime.engine_dir import (
    DTYPES,
    EngineDirError,
    EngineLimits,
    load_hf_checkpoint,
    read_engine_dir,
)
from pipeline.runtime.kv_cache import KVCache
from pipeline.runtime.model import ModelArgs, Transformer, rope_inv_freq
from pipeline.runtime.model_runner import AttentionFn, ModelRunner
from pipeline.runtime.policies import EvictionPolicy, NoEviction, make_policy
from pipeline.runtime.sampling import SamplingParams, sample_batch
from pipeline.runtime.scheduler import Scheduler
from pipeline.runtime.sequence import Sequence


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    text: str  # the text this token adds ("" without a tokenizer)
    live_kv_tokens: int = 0  # the request's live KV entries (tokens summed over layers and KV heads)
    compression_ratio: float = 1.0


@dataclass
class Completion:
    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    logits: torch.Tensor | None = None  # [generated, V] float32 on CPU, when asked for (keep_logits)


_DONE = object()


Listener = Callable[["RequestHandle", "TokenEvent | Completion"], None]


class RequestHandle:
    """A submitted request: iterate for TokenEvents as they are produced; `result()` when done.

    With a listener (Engine.submit's on_event) the events go to it instead, on the engine's thread."""

    def __init__(self, engine: Engine, seq: Sequence, on_event: Listener | None = None):
        self._engine = engine
        self.seq = seq
        self.request_id = seq.request_id
        self._on_event = on_event
        self._events: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._completion: Completion | None = None
        tok = engine.tokenizer
        self._text = (
            None if tok is None else IncrementalDecoder(lambda ids: tok.decode(ids, skip_special_tokens=True))
        )

    def _emit(self, token_id: int, live_kv_tokens: int, compression_ratio: float) -> None:
        text = self._text.push([token_id]) if self._text is not None else ""
        event = TokenEvent(token_id, text, live_kv_tokens, compression_ratio)
        if self._on_event is not None:
            self._on_event(self, event)
        else:
            self._events.put(event)

    def _finish(self, completion: Completion) -> None:
        self._completion = completion
        self._done.set()
        if self._on_event is not None:
            self._on_event(self, completion)
        else:
            self._events.put(_DONE)

    def _wait(self, timeout: float | None) -> None:
        while not self._done.is_set():
            if self._engine.loop_running:
                self._done.wait(timeout)
                if timeout is not None and not self._done.is_set():
                    raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
            else:
                self._engine.step()

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            try:
                item = self._events.get_nowait()
            except queue.Empty:
                if self._engine.loop_running:
                    item = self._events.get()
                else:
                    self._engine.step()
                    continue
            if item is _DONE:
                return
            yield item

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Completion:
        self._wait(timeout)
        assert self._completion is not None
        return self._completion

    def cancel(self) -> None:
        self._engine._cancel(self.request_id)


class Engine:
    def __init__(
        self,
        model: Transformer,
        limits: EngineLimits,
        policy: EvictionPolicy | str | None = None,
        tokenizer: Any = None,
        eos_token_ids: Seq[int] = (),
        prefill_chunk_tokens: int | None = None,
        attention: AttentionFn | None = None,
        cuda_graphs: bool = True,
    ):
        limits.validate()
        self.model = model.eval()
        self.args: ModelArgs = model.args
        self.limits = limits
        self.policy = self._resolve_policy(policy)
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids)
        a = self.args
        param = next(model.parameters())
        bs = limits.kv_block_size
        num_blocks = -(-limits.kv_pool_tokens // bs) * a.num_layers * a.num_kv_heads
        pool = BlockPool(num_blocks, bs)
        self.cache = KVCache(num_blocks, bs, a.head_dim, param.dtype, param.device)
        self.streams = StreamTable(
            a.num_layers, a.num_kv_heads, limits.max_batch_size,
            pool.blocks_for(limits.max_input_len + limits.max_output_len), pool,
            ring=self.policy.ring_size(), device=param.device, track_scores=self.policy.tracks_scores,
        )  # fmt: skip
        self.pool = pool
        self.runner = ModelRunner(model, self.policy, self.cache, self.streams, attention)
        self.scheduler = Scheduler(self.runner, limits.max_batch_size, prefill_chunk_tokens)
        # On a GPU the decode step replays from CUDA graphs (one launch a step); elsewhere it runs eagerly.
        self.cuda_graphs = cuda_graphs and attention is None and capture_decode(self.runner)
        self._ids = itertools.count()
        self._inbox: list[RequestHandle] = []
        self._cancelled: set[int] = set()
        self._handles: dict[int, RequestHandle] = {}
        self._lock = threading.Lock()  # guards _inbox and _cancelled (submit/cancel from any thread)
        self._step_lock = threading.Lock()  # one step at a time
        self._loop: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.last_step_kind = "idle"  # what the last step() did: idle | prefill | decode (benchmarks)

    def _resolve_policy(self, policy: EvictionPolicy | str | None) -> EvictionPolicy:
        a = self.args
        if policy is None:
            policy = "dms" if a.dms is not None and not a.dms.disable_eviction else "none"
        if isinstance(policy, str):
            policy = make_policy(policy)
        policy = policy.bind(a)
        policy.check_block_size(self.limits.kv_block_size)
        return policy

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_state(
        cls,
        config: dict[str, Any],
        state: dict[str, torch.Tensor],
        limits: EngineLimits,
        *,
        policy: EvictionPolicy | str | None = None,
        tokenizer_dir: str | Path | None = None,
        dtype: str | None = None,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> Engine:
        args = ModelArgs.from_hf_config(config)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = DTYPES[dtype or "float32"]
        with torch.device("meta"):
            model = Transformer(args)
        model = model.to_empty(device=device).to(torch_dtype)
        model.load_hf_state_dict({k: v.to(device, torch_dtype) for k, v in state.items()})
        model.inv_freq = rope_inv_freq(args).to(device)  # a buffer to_empty left uninitialised
        tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir and has_tokenizer(tokenizer_dir) else None
        eos = read_eos_ids(config, tokenizer_dir)
        return cls(model, limits, policy, tokenizer, eos, **kwargs)

    @classmethod
    def from_hf(
        cls,
        hf_dir: str | Path,
        policy: EvictionPolicy | str | None = None,
        limits: EngineLimits | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Engine:
        """Build in memory from an HF (DMS) checkpoint directory (config.json + safetensors)."""
        config, state = load_hf_checkpoint(hf_dir)
        if limits is None:
            block = int(config.get("dms_paged_attention_block_size", 16))
            window = int(config.get("dms_window_size", 1 << 30))
            limits = EngineLimits(kv_block_size=min(block, max(1, window // 2)))
        elif not isinstance(limits, EngineLimits):
            limits = EngineLimits.from_mapping(limits)
        return cls.from_state(config, state, limits, policy=policy, tokenizer_dir=hf_dir, **kwargs)

    @classmethod
    def from_dir(
        cls, engine_dir: str | Path, policy: EvictionPolicy | str | None = None, **kwargs: Any
    ) -> Engine:
        """Load an engine directory written by `write_engine_dir`."""
        config, state, limits, dtype = read_engine_dir(engine_dir)
        kwargs.setdefault("dtype", dtype)
        return cls.from_state(config, state, limits, policy=policy, tokenizer_dir=engine_dir, **kwargs)

    # -- requests ----------------------------------------------------------------------------
    def _encode(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer files: pass prompts as lists of token ids")
            return list(self.tokenizer.encode(prompt))
        return [int(t) for t in prompt]

    def submit(
        self,
        prompt: str | Seq[int],
        params: SamplingParams | None = None,
        *,
        context_len: int | None = None,
        forced_ids: Seq[int] | None = None,
        keep_logits: bool = False,
        on_event: Listener | None = None,
        **kw: Any,
    ) -> RequestHandle:
        """Queue a request (thread-safe). Raises ValueError for invalid requests.

        context_len: end of the first prefill chunk (None: the engine's chunking). forced_ids: generate
        these tokens instead of sampling (max_tokens becomes their number). keep_logits: return the
        logits of every generated position in Completion.logits. on_event(handle, item): called on the
        engine's thread with each TokenEvent and then the Completion, instead of queueing them for
        iteration (a server forwards all its requests from one thread so); it must return at once and
        not raise."""
        if forced_ids is not None:
            if not forced_ids:
                raise ValueError("forced_ids: give at least one token")
            kw["max_tokens"] = len(forced_ids)
        params = replace(params or SamplingParams(), **kw)
        params.validate()
        if params.max_tokens is None:
            params = replace(params, max_tokens=self.limits.max_output_len)
        ids = self._encode(prompt)
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        if len(ids) > self.limits.max_input_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens, over the engine's max_input_len {self.limits.max_input_len}"
            )
        if params.max_tokens > self.limits.max_output_len:
            raise ValueError(
                f"max_tokens {params.max_tokens} is over the engine's max_output_len "
                f"{self.limits.max_output_len}"
            )
        bad = [t for t in ids if not 0 <= t < self.args.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} outside the vocabulary [0, {self.args.vocab_size})")
        if context_len is not None and not 0 < context_len <= len(ids):
            raise ValueError(f"context_len {context_len} must be in [1, {len(ids)}] (the prompt's tokens)")
        seq = Sequence(
            request_id=next(self._ids), prompt_ids=ids, params=params, context_len=context_len,
            forced_ids=None if forced_ids is None else [int(t) for t in forced_ids], keep_logits=keep_logits,
        )  # fmt: skip
        if params.seed is not None:
            seq.generator = torch.Generator().manual_seed(params.seed)
        handle = RequestHandle(self, seq, on_event)
        with self._lock:
            self._inbox.append(handle)
        self._wake.set()
        return handle

    def _cancel(self, request_id: int) -> None:
        with self._lock:
            self._cancelled.add(request_id)
        self._wake.set()

    def generate(
        self, prompts: str | Seq[int] | Seq[str | Seq[int]], params: SamplingParams | None = None, **kw: Any
    ) -> list[Completion]:
        """Run prompts to completion (batched) and return their Completions in order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        handles = [self.submit(p, params, **kw) for p in prompts]
        return [h.result() for h in handles]

    def stream(
        self, prompt: str | Seq[int], params: SamplingParams | None = None, **kw: Any
    ) -> Iterator[TokenEvent]:
        """TokenEvents of one request as they are produced."""
        yield from self.submit(prompt, params, **kw)

    def score(
        self, pairs: Seq[tuple[Seq[int], Seq[int]]], context_lens: Seq[int | None] | None = None
    ) -> list[Completion]:
        """Teacher-forced scoring: for each (prompt, forced) pair, the logits [len(forced), V] of every
        position (row j predicts forced[j]) with the engine's policy active, in Completion.logits, and
        the request's KV statistics at its end in Completion.stats. Batched like any requests."""
        handles = [
            self.submit(list(p), forced_ids=list(f), keep_logits=True,
                        context_len=None if context_lens is None else context_lens[i])
            for i, (p, f) in enumerate(pairs)
        ]  # fmt: skip
        done = [h.result() for h in handles]
        for c in done:
            if c.finish_reason == "error":
                raise RuntimeError(f"engine request failed: {c.error}")
        return done

    # -- the step loop -----------------------------------------------------------------------
    @property
    def loop_running(self) -> bool:
        return self._loop is not None and self._loop.is_alive()

    def has_work(self) -> bool:
        with self._lock:
            pending = bool(self._inbox or self._cancelled)
        return pending or self.scheduler.has_work()

    def step(self) -> int:
        """One scheduler step. Returns how many sequences ran (0 = idle)."""
        with self._step_lock:
            with self._lock:
                inbox, self._inbox = self._inbox, []
                cancelled, self._cancelled = self._cancelled, set()
            for handle in inbox:
                self._handles[handle.request_id] = handle
                self.scheduler.add(handle.seq)
            for rid in cancelled:
                self._cancel_now(rid)
            seqs, failed, is_prefill = self.scheduler.schedule()
            for seq in failed:
                self._complete(seq, "error")
            self.last_step_kind = "idle" if not seqs else "prefill" if is_prefill else "decode"
            if not seqs:
                return 0
            try:
                if is_prefill:
                    logits = torch.stack([self.scheduler.prefill(s) for s in seqs])
                else:
                    logits = self.runner.decode(seqs)
                tokens = self.runner.finish_step(
                    sample_batch(logits, [s.params for s in seqs], [s.generator for s in seqs])
                )
            except Exception as exc:  # a failing batch must not take the engine (or other requests) down
                self.runner.sync()
                detail = "".join(traceback.format_exception_only(exc)).strip()
                for seq in seqs:
                    seq.error = f"engine step failed: {detail}"
                    self._complete(seq, "error")
                return len(seqs)
            keep = [s.keep_logits for s in seqs]
            kept = iter(logits[torch.tensor(keep)].float().cpu()) if any(keep) else None
            for seq, token, kv in zip(seqs, tokens, self._kv_figures(seqs), strict=True):
                if seq.keep_logits:
                    seq.logits.append(next(kept))
                self._postprocess(seq, token, kv)
            return len(seqs)

    def _postprocess(self, seq: Sequence, token: int, kv: tuple[int, float]) -> None:
        if seq.forced_ids is not None:
            token = seq.forced_ids[seq.num_generated]
        seq.token_ids.append(token)
        self._handles[seq.request_id]._emit(token, *kv)
        p = seq.params
        eos = not p.ignore_eos and seq.forced_ids is None and token in self.eos_token_ids
        if token in p.stop_token_ids or eos:
            self._complete(seq, "stop")
        elif seq.num_generated >= p.max_tokens:
            self._complete(seq, "length")

    def _kv_figures(self, seqs: list[Sequence]) -> list[tuple[int, float]]:
        """(live KV tokens over layers and KV heads, compression ratio) of attached sequences now, from
        the host mirror, all at once."""
        a = self.args
        slots = [s.slot for s in seqs]
        lens = torch.from_numpy(self.streams.lens_host).view(a.num_layers, -1, a.num_kv_heads)[:, slots]
        lens = lens.permute(1, 0, 2).reshape(len(seqs), -1)  # [S, layers * kv_heads]
        cached = torch.tensor([s.num_cached for s in seqs])[:, None].expand_as(lens)
        ratio = rule.compression_ratio(lens, cached, dim=1)
        return list(zip(lens.sum(1).tolist(), ratio.tolist(), strict=True))

    def _cancel_now(self, request_id: int) -> None:
        handle = self._handles.get(request_id)
        if handle is None or handle.done:
            return
        self._complete(handle.seq, "cancelled")

    def _complete(self, seq: Sequence, reason: str) -> None:
        stats = self.request_stats(seq)
        self.scheduler.finish(seq)
        handle = self._handles.pop(seq.request_id)
        gen = seq.token_ids[len(seq.prompt_ids) :]
        text = self.tokenizer.decode(gen, skip_special_tokens=True) if self.tokenizer is not None else ""
        logits = torch.stack(seq.logits) if seq.keep_logits and seq.logits else None
        handle._finish(
            Completion(seq.request_id, list(seq.prompt_ids), gen, text, reason, seq.error, stats, logits)
        )

    def request_stats(self, seq: Sequence) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "prompt_tokens": len(seq.prompt_ids),
            "generated_tokens": seq.num_generated,
            "preemptions": seq.num_preemptions,
            "policy": self.policy.name,
        }
        if seq.slot is not None and seq.num_cached > 0:
            lens_np = self.streams.seq_lens(seq.slot)
            lens = torch.from_numpy(lens_np.astype("int64"))
            stats.update(
                live_kv_tokens=int(lens.sum()),
                live_tokens_per_stream=lens_np.tolist(),  # [layers][kv_heads]
                kv_bytes=self.streams.seq_blocks(seq.slot) * self.cache.bytes_per_block,
                compression_ratio=rule.compression_ratio(lens, torch.full_like(lens, seq.num_cached)),
            )
        return stats

    def pool_stats(self) -> dict[str, Any]:
        with self._step_lock:
            self.runner.sync()
            used = self.pool.num_used_blocks
            return {
                "blocks_total": self.pool.num_blocks,
                "blocks_used": used,
                "blocks_free": self.pool.num_free_blocks,
                "block_size": self.pool.block_size,
                "bytes_used": used * self.cache.bytes_per_block,
                "bytes_total": self.pool.num_blocks * self.cache.bytes_per_block,
                "running": len(self.scheduler.running),
                "waiting": len(self.scheduler.waiting),
                "preemptions": self.scheduler.num_preemptions,  # since the engine started
                "mean_compression_ratio": self._mean_compression_ratio(),
            }

    def _mean_compression_ratio(self) -> float:
        """Mean compression ratio of the running sequences now (1.0 when none runs)."""
        running = [s for s in self.scheduler.running if s.num_cached > 0]
        if not running:
            return 1.0
        return sum(ratio for _, ratio in self._kv_figures(running)) / len(running)

    def start(self) -> None:
        """Run the step loop in a background daemon thread."""
        if self.loop_running:
            return
        self._stop.clear()
        self._loop = threading.Thread(target=self._run_loop, name="dms-engine-loop", daemon=True)
        self._loop.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._loop is not None:
            self._loop.join()
            self._loop = None

    def _run_loop(self) -> None:
        while not self._stop.is_set():
            try:
                ran = self.step()
            except Exception:  # never let one bad step kill the server's loop; the step already
                traceback.print_exc()  # failed its requests where it could
                ran = 0
            if ran == 0 and not self.has_work():
                self._wake.wait(0.05)
                self._wake.clear()


__all__ = [
    "Completion",
    "EngineDirError",
    "Engine",
    "EngineLimits",
    "NoEviction",
    "RequestHandle",
    "SamplingParams",
    "TokenEvent",
]
