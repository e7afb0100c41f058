"""What the body-capping proxy in front of Triton's HTTP endpoint costs: the same requests sent to Triton
directly and through the proxy, one after another and at concurrency 16.

    .venv/bin/python scripts/proxy_overhead.py [--model tiny-qwen3] [--build-dir build] [--repo DIR]

Needs a built repository (make engine), or `--repo` naming one. Prints one table; bench/RESULTS.md keeps
the measured one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.card import load_card  # noqa: E402
from pipeline.serve import client  # noqa: E402
from pipeline.serve.proxy import BodyLimitProxy  # noqa: E402
from pipeline.serve.server import TritonServer, free_port  # noqa: E402

PROMPT = "k5 31 . the grass is green . k9 77 . ? k9"


def sequential_ms(call, n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def throughput(call, concurrency: int, seconds: float) -> float:
    done = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def worker() -> None:
        while time.monotonic() < stop_at:
            call()
            with lock:
                done[0] += 1

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0] / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-qwen3")
    parser.add_argument("--build-dir", default="build")
    parser.add_argument("--repo", help="a model repository (default: the card's build)")
    args = parser.parse_args()
    card = load_card(args.model)
    repo = Path(args.repo) if args.repo else Path(args.build_dir) / card.name / "model_repo"
    limit = card.serve.max_request_bytes
    with TritonServer(repo) as server:
        proxy = BodyLimitProxy(server.host, free_port(), server.http_url, limit).start()
        rows = []
        try:
            for name, url in (("direct", server.http_url), ("proxy", f"{proxy.host}:{proxy.port}")):
                ready = lambda url=url: urllib.request.urlopen(f"http://{url}/v2/health/ready").read()  # noqa: E731
                one = lambda url=url: client.generate_http(url, PROMPT, 1)  # noqa: E731
                eight = lambda url=url: client.generate_http(url, PROMPT, 8)  # noqa: E731
                ready()
                one()
                row = (sequential_ms(ready, 500), sequential_ms(one, 100), throughput(eight, 16, 15))
                rows.append((name, *row))
        finally:
            proxy.stop()
    print("| endpoint | health/ready p50 ms | generate 1 token p50 ms | generate 8 tokens, c=16, req/s |")
    print("| --- | --- | --- | --- |")
    for name, ready_ms, one_ms, rps in rows:
        print(f"| {name} | {ready_ms:.2f} | {one_ms:.1f} | {rps:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
