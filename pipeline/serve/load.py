"""Load test: N concurrent clients for S seconds; every request must succeed and the KV pool must drain.

    python -m pipeline.serve.load --model tiny-qwen3 --concurrency 16 --seconds 60
    python -m pipeline.serve.load --mixed --concurrency 32 --seconds 60

starts the server on the built repository (free ports), runs the load over gRPC, then reads the engine
models' `dms_kv_pool_blocks_used` gauges from Triton's metrics endpoint until they are back to zero.
`--mixed` is the reliability workload (README, Reliability): short and near-max-length prompts over
gRPC and over HTTP through the body-capping proxy, token streaming over both, requests cancelled after
a few tokens, and bad requests among them; every good answer must equal the same request's answer
alone (greedy), and every bad one must be refused.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

METRIC = re.compile(r'^(dms_kv_pool_\w+)\{model="([^"]+)"\}\s+([0-9.eE+-]+)$', re.MULTILINE)


@dataclass
class LoadResult:
    requests: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0


def kv_pool_metrics(metrics_url: str) -> dict[str, dict[str, float]]:
    """{model: {blocks_used, blocks_total, running, waiting}} from Triton's Prometheus endpoint."""
    with urllib.request.urlopen(f"http://{metrics_url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, dict[str, float]] = {}
    for name, model, value in METRIC.findall(text):
        out.setdefault(model, {})[name.removeprefix("dms_kv_pool_")] = float(value)
    return out


def wait_pool_empty(metrics_url: str, timeout_s: float = 60.0) -> dict[str, dict[str, float]]:
    """Poll until every engine model reports 0 blocks used and no running/waiting requests."""
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = kv_pool_metrics(metrics_url)
        busy = {
            m: v for m, v in metrics.items() if v.get("blocks_used") or v.get("running") or v.get("waiting")
        }
        if metrics and not busy:
            return metrics
        if time.monotonic() > deadline:
            raise RuntimeError(f"KV pool not empty {timeout_s:.0f} s after the load ended: {busy or metrics}")
        time.sleep(0.5)


def _run_workers(worker: Callable[[int], None], concurrency: int) -> float:
    """Run `worker(i)` in `concurrency` threads until all return; the seconds it took."""
    start = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.monotonic() - start


def run_load(
    grpc_url: str,
    prompts: list[str],
    concurrency: int,
    seconds: float,
    max_tokens: int,
    model: str = "ensemble",
    stream: bool = False,
) -> LoadResult:
    """`concurrency` client threads send requests back to back for `seconds`; count failures."""
    from pipeline.serve.client import ClientError, join, stream_grpc

    result = LoadResult()
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    bar = tqdm(desc=f"load c={concurrency}", unit="req")

    def worker(index: int) -> None:
        i = index
        while time.monotonic() < stop_at:
            prompt = prompts[i % len(prompts)]
            i += concurrency
            try:
                reply = join(stream_grpc(grpc_url, prompt, max_tokens, model=model, stream=stream))
                error = None if reply.kv_live_tokens is not None else "response without KV statistics"
            except ClientError as exc:
                error = str(exc)
            with lock:
                result.requests += 1
                bar.update(1)
                if error:
                    result.failed += 1
                    if len(result.errors) < 10:
                        result.errors.append(error)

    result.seconds = _run_workers(worker, concurrency)
    bar.close()
    return result


MIXED_KINDS = ("short", "long", "http", "stream_grpc", "stream_http", "cancel", "bad_value", "bad_body")


@dataclass
class MixedResult:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MIXED_KINDS, 0))
    latencies: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in MIXED_KINDS})
    failed: int = 0  # good requests that failed or answered wrong, bad ones that were not refused
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def percentile(self, kind: str, q: float) -> float:
        values = sorted(self.latencies[kind])
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    def summary(self) -> str:
        total = sum(self.counts.values())
        rows = [f"{total} requests in {self.seconds:.1f} s: {self.failed} failed"]
        for kind in MIXED_KINDS:
            rows.append(
                f"  {kind:12s} {self.counts[kind]:5d}  p50 {self.percentile(kind, 0.5):6.2f} s  "
                f"p99 {self.percentile(kind, 0.99):6.2f} s"
            )
        return "\n".join(rows)


def run_mixed_load(
    grpc_url: str,
    http_url: str,
    short_prompt: str,
    long_prompt: str,
    concurrency: int,
    seconds: float,
    max_tokens: int,
    cancel_tokens: int,
    max_request_bytes: int,
    progress: bool = True,
    timeout_s: float = 120.0,
    only: tuple[str, ...] = MIXED_KINDS,
    streaming_model: str = "ensemble",
) -> MixedResult:
    """The `--mixed` workload (module docstring): `concurrency` threads, each cycling through the kinds
    from its own offset, for `seconds`. `http_url` is the proxy's (bodies over `max_request_bytes` must
    come back 413). `timeout_s` bounds each wait for a response; `only` picks some of the kinds.
    `streaming_model`: what the streaming and cancelled requests call. `ensemble` streams a response per
    token or per few (checked: max_tokens in all, by its num_output_tokens); `tensorrt_llm_bls` streams
    text (checked against the answer alone) and passes cancellations on, but Triton 2.51's python backend
    can deadlock under many concurrent decoupled BLS calls (README, Reliability)."""
    from pipeline.serve import client

    wait_s = timeout_s
    grpc = lambda prompt, model="ensemble", **kw: client.generate_grpc(  # noqa: E731
        grpc_url, prompt, max_tokens, model=model, timeout_s=wait_s, **kw
    )
    expected = {p: grpc(p).text for p in (short_prompt, long_prompt)}

    def check(reply, prompt: str) -> str | None:
        if reply.kv_live_tokens is None:
            return "response without KV statistics"
        alone = expected[prompt]
        return None if reply.text == alone else f"answer {reply.text!r}, alone {alone!r}"

    def cancel() -> str | None:
        pieces = client.stream_grpc(
            grpc_url, long_prompt, cancel_tokens, model=streaming_model, end_id=-1, timeout_s=wait_s
        )
        got = list(itertools.islice(pieces, 3))  # fewer when its responses carry several tokens each
        pieces.close()  # leaves early: the client cancels its request
        return None if got else "no pieces before the cancel"

    def streamed(reply, prompt: str) -> str | None:
        if streaming_model != "ensemble":
            return check(reply, prompt)
        if reply.kv_live_tokens is None:
            return "response without KV statistics"
        return None if reply.num_tokens == max_tokens and 1 < len(reply.pieces) <= max_tokens + 1 else (
            f"{len(reply.pieces)} streamed responses carrying {reply.num_tokens} tokens for {max_tokens}")

    def refused(call: Callable[[], object], needle: str) -> str | None:
        try:
            call()
        except client.ClientError as exc:
            return None if needle in str(exc) else f"refused, but not naming {needle!r}: {exc}"
        return f"a bad request was not refused (expected {needle!r})"

    big = "x" * (max_request_bytes + 1)
    exact = {"end_id": -1} if streaming_model == "ensemble" else {}  # ensemble: exactly max_tokens tokens
    kinds: dict[str, Callable[[], str | None]] = {
        "short": lambda: check(grpc(short_prompt), short_prompt),
        "long": lambda: check(grpc(long_prompt), long_prompt),
        "http": lambda: check(client.generate_http(
            http_url, short_prompt, max_tokens, timeout_s=wait_s), short_prompt),
        "stream_grpc": lambda: streamed(client.join(client.stream_grpc(
            grpc_url, long_prompt, max_tokens, model=streaming_model, timeout_s=wait_s, **exact)),
            long_prompt),
        "stream_http": lambda: streamed(client.join(client.stream_http(
            http_url, short_prompt, max_tokens, model=streaming_model, timeout_s=wait_s, **exact)),
            short_prompt),
        "cancel": cancel,
        "bad_value": lambda: refused(lambda: grpc(short_prompt, temperature=float("nan")), "temperature"),
        "bad_body": lambda: refused(
            lambda: client.generate_http(http_url, big, max_tokens, timeout_s=wait_s), "HTTP 413"),
    }  # fmt: skip
    result = MixedResult()
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    bar = tqdm(desc=f"mixed load c={concurrency}", unit="req", disable=not progress)

    def worker(index: int) -> None:
        i = index
        while time.monotonic() < stop_at:
            kind = only[i % len(only)]
            i += 1
            start = time.monotonic()
            try:
                error = kinds[kind]()
            except (client.ClientError, StopIteration) as exc:
                error = f"{type(exc).__name__}: {exc}"
            with lock:
                result.counts[kind] += 1
                result.latencies[kind].append(time.monotonic() - start)
                bar.update(1)
                if error:
                    result.failed += 1
                    if len(result.errors) < 10:
                        result.errors.append(f"{kind}: {error}")

    result.seconds = _run_workers(worker, concurrency)
    bar.close()
    return result


def main(argv: list[str] | None = None) -> int:
    from pipeline.card import CardError, load_card
    from pipeline.cli import seconds as seconds_type
    from pipeline.hf_files import load_tokenizer
    from pipeline.serve.perf import input_data, repo_tokenizer_dir
    from pipeline.serve.server import TritonServer

    parser = argparse.ArgumentParser(
        prog="python -m pipeline.serve.load", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", default=os.environ.get("MODEL", "tiny-qwen3"))
    parser.add_argument("--build-dir", default="build")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=seconds_type, default=60.0)
    parser.add_argument("--stream", action="store_true", help="stream the tokens")
    parser.add_argument("--mixed", action="store_true", help="the reliability workload (module docstring)")
    args = parser.parse_args(argv)
    if args.concurrency < 1:
        parser.error(f"--concurrency must be >= 1 (got {args.concurrency})")
    try:
        card = load_card(args.model)
    except CardError as exc:
        parser.exit(2, f"error: {exc}\n")
    repo = Path(args.build_dir) / card.name / "model_repo"
    if not (repo / "ensemble" / "config.pbtxt").is_file():
        parser.exit(2, f"error: no model repository at {repo}: build it (make engine MODEL={card.name})\n")
    tokenizer = load_tokenizer(repo_tokenizer_dir(repo))
    data = input_data(tokenizer, card.perf.input_tokens, card.perf.output_tokens, num_prompts=16)
    prompts = [d["text_input"]["content"][0] for d in data["data"]]
    print(f"starting a server of its own on {repo} (free ports) ...", flush=True)
    if args.mixed:
        return _mixed(repo, card, prompts, tokenizer, args)
    with TritonServer(repo) as server:
        result = run_load(
            server.grpc_url,
            prompts,
            args.concurrency,
            args.seconds,
            card.perf.output_tokens,
            stream=args.stream,
        )
        pool = wait_pool_empty(f"{server.host}:{server.metrics_port}")
    print(
        f"{result.requests} requests in {result.seconds:.1f} s at concurrency {args.concurrency}: "
        f"{result.failed} failed"
    )
    for error in result.errors:
        print(f"  error: {error}")
    print(f"KV pool after the load: {pool}")
    return 1 if result.failed else 0



def _mixed(repo: Path, card, prompts: list[str], tokenizer, args) -> int:
    import random

    from pipeline.serve.perf import prompt_of_tokens
    from pipeline.serve.proxy import BodyLimitProxy
    from pipeline.serve.server import TritonServer, free_port

    long_prompt = prompt_of_tokens(tokenizer, card.build.max_input_len - 8, random.Random(1))
    limit = card.serve.max_request_bytes
    with TritonServer(repo) as server:
        proxy = BodyLimitProxy(server.host, free_port(server.host), server.http_url, limit).start()
        try:
            result = run_mixed_load(
                server.grpc_url, f"{proxy.host}:{proxy.port}", prompts[0], long_prompt, args.concurrency,
                args.seconds, card.perf.output_tokens, card.build.max_output_len, limit,
            )  # fmt: skip
        finally:
            proxy.stop()
        pool = wait_pool_empty(f"{server.host}:{server.metrics_port}")
    print(result.summary())
    for error in result.errors:
        print(f"  error: {error}")
    print(f"KV pool after the load: {pool}")
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
