"""perf_analyzer's profile export (`--profile-export-file`) of a streaming run -> token timings and figures.

The export (perf_analyzer 2.51) is one JSON object: {"experiments": [{"experiment": {"mode",
"value"}, "requests": [{"timestamp", "request_inputs", "response_timestamps", "response_outputs"}],
"window_boundaries"}], "version", ...}, times in nanoseconds since the epoch. With `--streaming` a
request gets a response per generated token, or per few tokens: our ensemble reports how many in
`num_output_tokens` (the engine model's `stream_interval`). Without that output (the TensorRT-LLM
backend's ensemble) every response but the last carries one token, and the last one does when its text
is not empty; our engine model's final response carries none.

A response of k tokens that arrives `gap` after the request's previous one counts k tokens arriving at
its time, and k inter-token latencies of gap / k each: the same total time spread over its tokens, so
ITL keeps meaning the time per generated token whatever the interval.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class ProfileError(ValueError):
    """The file is not a perf_analyzer profile export of a streaming run; the message says why."""


@dataclass(frozen=True)
class RequestTiming:
    sent_ns: int
    token_ns: tuple[int, ...]  # when each generated token's response arrived (k equal times: k tokens)
    end_ns: int  # the request's last response
    final_compression_ratio: float | None  # the KV compression ratio its last response reports


@dataclass(frozen=True)
class StreamFigures:
    """One run: throughput over its span (first request sent to last response), latencies in ms."""

    requests: int
    output_tokens: int
    seconds: float
    output_tokens_per_s: float
    requests_per_s: float
    ttft_ms_p50: float
    ttft_ms_p99: float
    itl_ms_p50: float
    itl_ms_p99: float
    final_cr: float | None  # mean over requests of the compression ratio at their end (None: not reported)


def _tokens_in(output: dict[str, Any], last: bool) -> int:
    """How many generated tokens one response carries."""
    if "num_output_tokens" in output:
        count = output["num_output_tokens"]
        return int(count[0] if isinstance(count, list) else count)
    if not last:
        return 1
    text = output.get("text_output", "")
    return int(bool(text)) if isinstance(text, str) else 1


def read_export(path: Path) -> dict[int, list[RequestTiming]]:
    """Concurrency -> the requests measured at it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        experiments = data["experiments"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        kind = type(exc).__name__
        raise ProfileError(f"{path}: not a perf_analyzer profile export ({kind}: {exc})") from None
    out: dict[int, list[RequestTiming]] = {}
    for exp in experiments:
        mode = exp.get("experiment", {})
        if mode.get("mode") != "concurrency":
            raise ProfileError(f"{path}: experiment mode {mode.get('mode')!r}; expected a concurrency sweep")
        timings = []
        for req in exp.get("requests", []):
            stamps = [int(t) for t in req.get("response_timestamps", [])]
            outputs = req.get("response_outputs", [])
            if not stamps:
                continue  # a request that got no response (cancelled at the end of a run)
            if len(outputs) != len(stamps):
                raise ProfileError(
                    f"{path}: a request has {len(stamps)} response timestamps but {len(outputs)} outputs"
                )
            counts = [_tokens_in(o, i == len(outputs) - 1) for i, o in enumerate(outputs)]
            tokens = [t for t, k in zip(stamps, counts, strict=True) for _ in range(k)]
            ratio = outputs[-1].get("kv_compression_ratio")
            ratio = None if ratio is None else float(ratio)
            timings.append(RequestTiming(int(req["timestamp"]), tuple(tokens), stamps[-1], ratio))
        out[int(mode["value"])] = timings
    return out


def figures(timings: list[RequestTiming]) -> StreamFigures:
    """Output tokens/s and requests/s over the run's span; time to first token (per request) and
    inter-token latency (every gap between a request's consecutive tokens), p50 and p99."""
    timings = [t for t in timings if t.token_ns]
    if not timings:
        raise ProfileError("no request in the export received a token")
    start = min(t.sent_ns for t in timings)
    end = max(t.end_ns for t in timings)
    seconds = max(end - start, 1) / 1e9
    tokens = sum(len(t.token_ns) for t in timings)
    ttft = np.array([(t.token_ns[0] - t.sent_ns) / 1e6 for t in timings])
    gaps = [_token_gaps_ms(t.token_ns) for t in timings if len(t.token_ns) > 1]
    itl = np.concatenate(gaps) if gaps else np.zeros(1)
    ratios = [t.final_compression_ratio for t in timings if t.final_compression_ratio is not None]
    return StreamFigures(
        requests=len(timings),
        output_tokens=tokens,
        seconds=round(seconds, 3),
        output_tokens_per_s=tokens / seconds,
        requests_per_s=len(timings) / seconds,
        ttft_ms_p50=float(np.percentile(ttft, 50)),
        ttft_ms_p99=float(np.percentile(ttft, 99)),
        itl_ms_p50=float(np.percentile(itl, 50)),
        itl_ms_p99=float(np.percentile(itl, 99)),
        final_cr=sum(ratios) / len(ratios) if ratios else None,
    )


def _token_gaps_ms(token_ns: tuple[int, ...]) -> np.ndarray:
    """Inter-token latencies (ms) of one request: a response of k tokens spreads its gap over them."""
    times, counts = np.unique(np.array(token_ns, dtype=np.int64), return_counts=True)
    gaps = np.diff(times) / 1e6 / counts[1:]
    itl = np.repeat(gaps, counts[1:])
    # the first response's extra tokens arrived with the first token: no wait of their own
    return np.concatenate([np.zeros(counts[0] - 1), itl])
