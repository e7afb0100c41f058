"""Load test: N concurrent clients for S seconds; every request must succeed and the KV pool must drain.

    python -m pipeline.serve.load --model tiny-qwen3 --concurrency 16 --seconds 60

starts the server on the built repository (free ports), runs the load over gRPC, then reads the engine
models' `dms_kv_pool_blocks_used` gauges from Triton's metrics endpoint until they are back to zero.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
import time
import urllib.request
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

    start = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bar.close()
    result.seconds = time.monotonic() - start
    return result


def main(argv: list[str] | None = None) -> int:
    from pipeline.card import CardError, load_card
    from pipeline.hf_files import load_tokenizer
    from pipeline.serve.perf import input_data, repo_tokenizer_dir
    from pipeline.serve.server import TritonServer

    parser = argparse.ArgumentParser(
        prog="python -m pipeline.serve.load", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", default=os.environ.get("MODEL", "tiny-qwen3"))
    parser.add_argument("--build-dir", default="build")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--stream", action="store_true", help="stream tokens (one response per token)")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.seconds <= 0:
        parser.error(f"--concurrency must be >= 1 and --seconds > 0 (got {args.concurrency}, {args.seconds})")
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


if __name__ == "__main__":
    sys.exit(main())
