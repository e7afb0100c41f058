"""The engine's KV pool gauges on Triton's /metrics (`dms_kv_pool_*`, published by the torch engine model
from Engine.pool_stats() twice a second), sampled while a load runs.
"""

from __future__ import annotations

import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

GAUGE = re.compile(r'^dms_kv_pool_(\w+)\{model="([^"]+)"\}\s+(\S+)$', re.MULTILINE)


def read_gauges(metrics_url: str, timeout_s: float = 5.0) -> dict[str, dict[str, float]]:
    """model -> {gauge: value} from one scrape of http://<metrics_url>/metrics."""
    with urllib.request.urlopen(f"http://{metrics_url}/metrics", timeout=timeout_s) as resp:
        text = resp.read().decode()
    out: dict[str, dict[str, float]] = {}
    for name, model, value in GAUGE.findall(text):
        out.setdefault(model, {})[name] = float(value)
    return out


@dataclass
class PoolSampler:
    """Scrapes one engine model's gauges every `interval_s` in a thread, between start() and stop()."""

    metrics_url: str
    model: str
    interval_s: float = 0.5
    samples: list[dict[str, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _sample(self) -> None:
        try:
            gauges = read_gauges(self.metrics_url).get(self.model)
        except (urllib.error.URLError, OSError):  # a missed scrape on a busy machine: the next one counts
            return
        if gauges:
            self.samples.append(gauges)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def start(self) -> PoolSampler:
        self._sample()  # the state before the load: preemptions are counted from here
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, float | int | None]:
        """Stop and summarise: most sequences running and queued, peak pool occupancy, preemptions
        during the load, and the mean compression ratio of running sequences (over samples with any)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        time.sleep(self.interval_s)  # the publisher's last refresh lands after the load's last token
        self._sample()
        s = self.samples
        if not s:
            return {"running_max": None, "queued_max": None, "pool_occupancy_max": None,
                    "preemptions": None, "mean_cr": None, "pool_bytes": None}  # fmt: skip
        ratio = "mean_compression_ratio"  # the pair's driver publishes no ratio (nor bytes)
        busy = [x[ratio] for x in s if x.get("running", 0) > 0 and ratio in x]
        return {
            "running_max": int(max(x["running"] for x in s)),
            "queued_max": int(max(x["waiting"] for x in s)),
            "pool_occupancy_max": round(max(x["blocks_used"] / x["blocks_total"] for x in s), 4),
            "preemptions": int(s[-1]["preemptions"] - s[0]["preemptions"]),
            "mean_cr": round(sum(busy) / len(busy), 3) if busy else (1.0 if ratio in s[-1] else None),
            "pool_bytes": int(s[-1]["bytes_total"]) if "bytes_total" in s[-1] else None,
        }
