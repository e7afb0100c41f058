"""What `python -m pipeline serve` runs: Triton behind the size-capping HTTP proxy, watched and restarted.

The watch is live, twice a second: Triton's process and each of its python-backend stubs (a killed stub
leaves Triton 2.51 answering ready while every request to that model fails). On a failure the server
is stopped (its process group and shared memory with it) and started again, at most `max_restarts`
times in 10 minutes; past that `run` returns 1, so a supervisor above (systemd, Kubernetes) restarts
the whole service. While Triton is down the proxy answers 502 and health probes through it fail.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.serve.proxy import BodyLimitProxy
from pipeline.serve.server import ServerError, TritonServer, check_ports, free_port

RESTART_WINDOW_S = 600.0


@dataclass
class Supervisor:
    model_repo: Path
    host: str
    http_port: int  # the proxy's; Triton's own HTTP endpoint gets a free port on the same host
    grpc_port: int
    metrics_port: int
    log_path: Path
    max_request_bytes: int
    admin_key: str | None = None
    max_restarts: int = 3
    poll_s: float = 0.5
    log: Callable[[str], None] = print

    def run(self, on_ready: Callable[[TritonServer, int], None]) -> int:
        """Serve until interrupted (KeyboardInterrupt propagates, after everything is stopped) or until
        Triton fails more than `max_restarts` times in 10 minutes (returns 1). `on_ready(server, n)` is
        called after each start, n = restarts so far."""
        check_ports(self.host, self.http_port, self.grpc_port, self.metrics_port)
        self.http_port = self.http_port or free_port(self.host)
        upstream_port = free_port(self.host)
        upstream = f"{self.host}:{upstream_port}"
        proxy = BodyLimitProxy(self.host, self.http_port, upstream, self.max_request_bytes)
        proxy.start()
        restarts: list[float] = []
        server: TritonServer | None = None
        try:
            while True:
                server = TritonServer(
                    self.model_repo, host=self.host, http_port=upstream_port, grpc_port=self.grpc_port,
                    metrics_port=self.metrics_port, log_path=self.log_path, admin_key=self.admin_key,
                )  # fmt: skip
                try:
                    server.start()
                except ServerError as exc:
                    if not restarts:  # the first start: nothing to retry, the message says why
                        raise
                    reason = f"the restart failed: {exc}"
                else:
                    # The same ports after a restart: clients reconnect where they were.
                    self.grpc_port, self.metrics_port = server.grpc_port, server.metrics_port
                    on_ready(server, len(restarts))
                    reason = self._watch(server)
                    tail = server.log_tail(15)
                    reason = f"{reason}; its log ends with:\n{tail}"
                server.stop(timeout_s=5)  # a failed server: no long goodbye
                server = None
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < RESTART_WINDOW_S]
                if len(restarts) >= self.max_restarts:
                    self.log(
                        f"error: {reason}\nerror: Triton failed {len(restarts) + 1} times within "
                        f"{RESTART_WINDOW_S / 60:.0f} minutes (--max-restarts {self.max_restarts}): giving up"
                    )
                    return 1
                restarts.append(now)
                self.log(
                    f"error: {reason}\nrestarting Triton (restart {len(restarts)} of at most "
                    f"{self.max_restarts} in {RESTART_WINDOW_S / 60:.0f} minutes) ..."
                )
        finally:
            if server is not None:
                server.stop()
            proxy.stop()

    def _watch(self, server: TritonServer) -> str:
        while True:
            failure = server.failure()
            if failure:
                return failure
            time.sleep(self.poll_s)
