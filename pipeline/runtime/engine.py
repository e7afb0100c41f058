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
import threading
import traceback
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from dms_core import rule
from dms_core.serving import Completion, Outbox, RequestHandle, StepLoop, TokenEvent
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


class Engine(StepLoop):
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
        super().__init__("dms-engine-loop")
        self._ids = itertools.count()
        self._handles: dict[int, RequestHandle] = {}
        self._step_lock = threading.Lock()  # one step at a time
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
        _check_finite(state)
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
        outbox: Outbox | None = None,
        **kw: Any,
    ) -> RequestHandle:
        """Queue a request (thread-safe). Raises ValueError for invalid requests.

        context_len: end of the first prefill chunk (None: the engine's chunking). forced_ids: generate
        these tokens instead of sampling (max_tokens becomes their number). keep_logits: return the
        logits of every generated position in Completion.logits. outbox: where the request's events go
        instead of the handle (dms_core.serving.RequestHandle: one thread forwards many requests)."""
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
        text_of = None
        if self.tokenizer is not None:
            tok = self.tokenizer
            decoder = IncrementalDecoder(lambda ids: tok.decode(ids, skip_special_tokens=True))
            text_of = lambda token: decoder.push([token])  # noqa: E731
        return self._enqueue(RequestHandle(self, seq.request_id, seq, text_of, outbox))

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

    # -- the step loop (start / stop / has_work: dms_core.serving.StepLoop) -------------------------
    def _busy(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> int:
        """One scheduler step. Returns how many sequences ran (0 = idle)."""
        with self._step_lock:
            inbox, cancelled = self._take_inbox()
            for handle in inbox:
                self._handles[handle.request_id] = handle
                self.scheduler.add(handle.request)
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
                unsampled: dict[int, str] = {}
                tokens = self.runner.finish_step(self._sample(logits, seqs, unsampled))
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
                if seq.request_id in unsampled:
                    self._fail(seq, f"engine failed this request: sampling: {unsampled[seq.request_id]}")
                    continue
                try:
                    self._postprocess(seq, token, kv)
                except Exception as exc:  # a stop check, emitting, finishing: this sequence's fault alone
                    self._fail(seq, f"engine failed this request: {_one_line(exc)}")
            return len(seqs)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], unsampled: dict[int, str]) -> torch.Tensor:
        """sample_batch; when it raises, row by row, so only the rows that raise fail (their request ids
        and errors go to `unsampled`; they get their argmax to keep the step's shapes)."""
        try:
            return sample_batch(logits, [s.params for s in seqs], [s.generator for s in seqs])
        except Exception:
            rows = []
            for i, seq in enumerate(seqs):
                try:
                    rows.append(sample_batch(logits[i : i + 1], [seq.params], [seq.generator]))
                except Exception as exc:
                    unsampled[seq.request_id] = _one_line(exc)
                    rows.append(logits[i : i + 1].argmax(dim=-1))
            return torch.cat(rows)

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

    def _fail(self, seq: Sequence, message: str) -> None:
        """Finish `seq` with an error and free its blocks; the rest of the batch goes on."""
        seq.error = message
        if seq.request_id not in self._handles:  # it had already finished
            return
        try:
            self._complete(seq, "error")
        except Exception:  # _complete itself failed (stats, detokenising): free and finish by hand
            self.scheduler.finish(seq)
            handle = self._handles.pop(seq.request_id, None)
            if handle is not None and not handle.done:
                prompt = list(seq.prompt_ids)
                handle._finish(Completion(seq.request_id, prompt, [], "", "error", message, {}))

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
        self._complete(handle.request, "cancelled")

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
            return self.pool.stats() | {
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


def _one_line(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(exc)).strip()


def _check_finite(state: dict[str, torch.Tensor]) -> None:
    """EngineDirError for weights holding NaN or inf: such an engine answers with garbage while its
    server reports ready, so it is refused at load, once, naming the tensors."""
    bad = {}
    for name, tensor in state.items():
        if tensor.is_floating_point():
            count = int((~torch.isfinite(tensor)).sum())
            if count:
                bad[name] = count
    if bad:
        names = ", ".join(f"{n} ({c})" for n, c in list(bad.items())[:3]) + (", ..." if len(bad) > 3 else "")
        raise EngineDirError(
            f"the weights hold {sum(bad.values())} non-finite values (NaN or inf) in {len(bad)} tensors: "
            f"{names}; the checkpoint or engine is corrupt: rebuild it (`python -m pipeline engine --verify`)"
        )


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
