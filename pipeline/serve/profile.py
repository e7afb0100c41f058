"""perf_analyzer's profile export (`--profile-export-file`) of a streaming run -> token timings and figures.

The export (perf_analyzer 2.51) is one JSON object: {"experiments": [{"experiment": {"mode",
"value"}, "requests": [{"timestamp", "request_inputs", "response_timestamps", "response_outputs"}],
"window_boundaries"}], "version", ...}, times in nanoseconds since the epoch. With `--streaming` a
request gets one response per generated token; our torch engine model then sends a final response
without a token (its text is empty), the TensorRT-LLM backend puts the last token in the final one. So
every response but the last carries a token, and the last one does when its text is not empty.
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
    token_ns: tuple[int, ...]  # when each generated token's response arrived
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


def _carries_token(output: dict[str, Any]) -> bool:
    text = output.get("text_output", "")
    return bool(text) if isinstance(text, str) else True


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
            tokens = stamps if _carries_token(outputs[-1]) else stamps[:-1]
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
    gaps = [np.diff(np.array(t.token_ns, dtype=np.int64)) / 1e6 for t in timings if len(t.token_ns) > 1]
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
