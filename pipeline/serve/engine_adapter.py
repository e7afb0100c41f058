"""Between Triton requests and pipeline.runtime's Engine: parameters and stop sequences.

No Triton import here (the python-backend model in model_repo/tensorrt_llm/1/model.py only moves
tensors), so the request handling is unit-testable against a real Engine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.hf_files import read_eos_ids
from pipeline.serve.text import RequestError, split_stop_words

SCHEDULER_POLICIES = ("max_utilization",)


@dataclass(frozen=True)
class EngineRequest:
    """One request, as the engine takes it."""

    input_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    end_id: int | None = None
    streaming: bool = False

    def sampling(self):
        """SamplingParams: single-token stops (and end_id) stop inside the engine; longer ones here.

        end_id -1 means "no end token" (TensorRT-LLM's convention, what benchmarks send): the request then
        generates exactly max_tokens.
        """
        from pipeline.runtime.sampling import SamplingParams

        single = tuple(s[0] for s in self.stop_sequences if len(s) == 1)
        if self.end_id is not None and self.end_id >= 0:
            single = (*single, self.end_id)
        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            stop_token_ids=single,
            ignore_eos=self.end_id is not None and self.end_id < 0,
        )


def _scalar(tensors: Mapping[str, np.ndarray | None], name: str, default: Any = None) -> Any:
    value = tensors.get(name)
    if value is None:
        return default
    flat = np.asarray(value).reshape(-1)
    if flat.size == 0:
        return default
    return flat[0].item()


# SamplingParams' field -> the engine model's input (and the text models' input it comes from)
TENSOR_NAMES = {
    "max_tokens": "request_output_len (max_tokens)",
    "temperature": "temperature",
    "top_k": "runtime_top_k (top_k)",
    "top_p": "runtime_top_p (top_p)",
    "seed": "random_seed",
    "stop_token_ids": "stop_words_list / end_id",
}


def parse_request(tensors: Mapping[str, np.ndarray | None]) -> EngineRequest:
    """The engine model's input tensors (TensorRT-LLM names, batch of one) -> EngineRequest, checked.

    input_ids [1, n] (padded), input_lengths [1, 1], request_output_len [1, 1]; optional
    stop_words_list [1, 2, m], end_id, runtime_top_k, runtime_top_p, temperature, random_seed, streaming.
    Every inconsistency or sampling value the engine cannot take is a RequestError naming the input.
    """
    ids = tensors.get("input_ids")
    if ids is None:
        raise RequestError("input_ids is missing")
    ids = np.asarray(ids)
    if ids.ndim == 2 and ids.shape[0] != 1:
        raise RequestError(
            f"the engine takes one request per call (batch size 1, as TensorRT-LLM's in-flight batcher), "
            f"got a batch of {ids.shape[0]}: send the prompts as separate requests"
        )
    sent = ids.shape[-1] if ids.ndim else 0
    length = _scalar(tensors, "input_lengths", sent)
    if not 1 <= length <= sent:
        raise RequestError(
            f"input_lengths is {length}; it must be between 1 and {sent} (the number of input_ids sent)"
        )
    input_ids = [int(t) for t in ids.reshape(-1)[:length]]
    max_tokens = _scalar(tensors, "request_output_len")
    if max_tokens is None:
        raise RequestError("request_output_len is missing")
    stop = tensors.get("stop_words_list")
    try:
        stops = split_stop_words(np.asarray(stop).reshape(2, -1)) if stop is not None else []
    except ValueError:
        raise RequestError(
            f"stop_words_list has shape {np.shape(stop)}; it must be [1, 2, n] (ids, then end offsets)"
        ) from None
    req = EngineRequest(
        input_ids=input_ids,
        max_tokens=max_tokens,
        temperature=float(_scalar(tensors, "temperature", 0.0)),
        top_k=_scalar(tensors, "runtime_top_k", 0),
        top_p=float(_scalar(tensors, "runtime_top_p", 1.0)),
        seed=_scalar(tensors, "random_seed"),
        stop_sequences=tuple(tuple(s) for s in stops),
        end_id=_scalar(tensors, "end_id"),
        streaming=bool(_scalar(tensors, "streaming", False)),
    )
    try:
        req.sampling().validate()
    except ValueError as exc:
        field, _, rest = str(exc).partition(" ")
        raise RequestError(f"{TENSOR_NAMES.get(field, field)} {rest}") from None
    return req


def ends_with_stop(generated: Sequence[int], stops: Sequence[Sequence[int]]) -> bool:
    """Whether `generated` ends with one of the stop sequences. Asked after every token, it finds the
    first complete stop at a cost that does not grow with the generation."""
    return any(len(s) <= len(generated) and tuple(generated[-len(s) :]) == tuple(s) for s in stops)


def set_cpu_threads(params: Mapping[str, str]) -> None:
    """Without a GPU, torch's intra-op threads in the engine model's process: the model parameter
    cpu_threads, default 1. The server, the other models and the client share the cores, and with more
    threads OpenMP's spin-waits take the CPU they need (bench/RESULTS.md, served equal memory)."""
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(int(params.get("cpu_threads", "") or 1))


def load_engine(params: Mapping[str, str], repo_dir: Path):
    """Engine for the model's parameters: gpt_model_path (relative to the repository), eviction_policy,
    max_tokens_in_paged_kv_cache, batch_scheduler_policy, device; optional max_num_sequences (the most
    requests the torch engine runs at once; default its max_batch_size), which perf's equal-memory
    workload raises so that only the KV pool limits how many run; with dms_session, the DMS TensorRT
    engine pair at gpt_model_path, served by its host driver (same interface; it needs nothing of
    pipeline.runtime, which TensorRT-LLM's environment may not import)."""
    policy = params.get("batch_scheduler_policy", "max_utilization")
    if policy not in SCHEDULER_POLICIES:
        raise ValueError(
            f"batch_scheduler_policy {policy!r} is not supported by the torch engine (its scheduler admits "
            f"optimistically and preempts: {', '.join(SCHEDULER_POLICIES)})"
        )
    engine_dir = Path(params["gpt_model_path"])
    if not engine_dir.is_absolute():
        engine_dir = (repo_dir / engine_dir).resolve()
    pool_tokens = params.get("max_tokens_in_paged_kv_cache", "")
    device = params.get("device", "auto")
    if params.get("dms_session"):
        from plugins.trtllm.driver import load_driver

        eviction = params.get("eviction_policy", "dms") != "none"
        return load_driver(engine_dir, session=params["dms_session"], eviction=eviction,
                           pool_tokens=int(pool_tokens) if pool_tokens else None,
                           device=None if device == "auto" else device)  # fmt: skip
    import torch

    from pipeline.runtime.engine import Engine
    from pipeline.runtime.engine_dir import read_engine_dir

    config, state, limits, dtype = read_engine_dir(engine_dir)
    if pool_tokens:
        limits = replace(limits, kv_pool_tokens=int(pool_tokens))
    max_sequences = params.get("max_num_sequences", "")
    if max_sequences:
        limits = replace(limits, max_batch_size=int(max_sequences))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # No tokenizer in the engine: requests arrive as ids and leave as ids (the ensemble tokenizes), and
    # loading one here would import much of transformers in this process for nothing.
    engine = Engine.from_state(
        config, state, limits, policy=params.get("eviction_policy", "dms"), dtype=dtype, device=device
    )
    engine.eos_token_ids = read_eos_ids(config, engine_dir)
    return engine
