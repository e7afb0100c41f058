"""perf_analyzer against the served ensembles: input data, runs, CSV parsing, gates, plot.

perf_analyzer 2.51 ships in the tritonclient 2.51 wheel (`<venv>/bin/perf_analyzer`); it needs Debian's
libb64-0d and a libcudart.so.12 on the library path (nvidia-cuda-runtime-cu12), even on CPU. The
ensembles contain a decoupled model, so it runs over gRPC with `--async --streaming`; a request's
latency is then the time to its final response.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.serve.server import TritonServer, library_path


class PerfError(RuntimeError):
    """perf_analyzer could not run or produced no result; the message carries its output."""


@dataclass(frozen=True)
class PerfRow:
    method: str  # "dms" | "vanilla"
    concurrency: int
    inferences_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float


def perf_analyzer_binary() -> Path:
    found = Path(sys.executable).parent / "perf_analyzer"
    if found.is_file():
        return found
    which = shutil.which("perf_analyzer")
    if which:
        return Path(which)
    raise PerfError(
        "perf_analyzer not found: it ships in the tritonclient==2.51.0 wheel (`pip install -e '.[serve]'` "
        "or `make setup`)"
    )


# Plain English words that the embedded model's word-level vocabulary also knows (others would be unk).
PROMPT_WORDS = "the old farmer walks across the green field and the dog sleeps by the river".split()


def prompt_of_tokens(tokenizer: Any, num_tokens: int, rng: random.Random) -> str:
    """A prompt that tokenizes to exactly `num_tokens` (without special tokens), made of real words."""
    text = ""
    while len(tokenizer.encode(text, add_special_tokens=False)) < num_tokens + 8:
        # The stop is spaced: a word-level vocabulary has "." but not "river.".
        text += " ".join(rng.choice(PROMPT_WORDS) for _ in range(16)) + " . "
    return cut_to_tokens(tokenizer, text, num_tokens)


def cut_to_tokens(tokenizer: Any, text: str, num_tokens: int) -> str:
    """The start of `text` that tokenizes to `num_tokens` tokens (without special tokens)."""
    for _ in range(4):  # decode(encode(x)[:n]) can re-tokenize differently at the cut: converge
        ids = tokenizer.encode(text, add_special_tokens=False)[:num_tokens]
        text = tokenizer.decode(ids)
        if len(tokenizer.encode(text, add_special_tokens=False)) == num_tokens:
            return text
    return text


def input_data(
    tokenizer: Any, input_tokens: int, output_tokens: int, num_prompts: int = 8, seed: int = 0
) -> dict:
    """perf_analyzer's --input-data JSON: `num_prompts` prompts of `input_tokens` tokens, exactly
    `output_tokens` generated per request (end_id -1)."""
    rng = random.Random(seed)
    return {
        "data": [
            {
                "text_input": {"content": [prompt_of_tokens(tokenizer, input_tokens, rng)], "shape": [1]},
                "max_tokens": {"content": [int(output_tokens)], "shape": [1]},
                # no end token: every request generates exactly output_tokens (TensorRT-LLM's benchmarks)
                "end_id": {"content": [-1], "shape": [1]},
            }
            for _ in range(num_prompts)
        ]
    }


def parse_csv(path: Path, method: str) -> list[PerfRow]:
    """perf_analyzer's -f CSV (latencies in microseconds) -> rows with milliseconds."""
    rows = []
    with open(path, newline="") as fh:
        for rec in csv.DictReader(fh):
            try:
                rows.append(
                    PerfRow(
                        method=method,
                        concurrency=int(rec["Concurrency"]),
                        inferences_per_s=float(rec["Inferences/Second"]),
                        p50_ms=float(rec["p50 latency"]) / 1000.0,
                        p90_ms=float(rec["p90 latency"]) / 1000.0,
                        p99_ms=float(rec["p99 latency"]) / 1000.0,
                    )
                )
            except (KeyError, ValueError) as exc:
                raise PerfError(
                    f"{path}: unexpected perf_analyzer CSV (column {exc}); header: {list(rec)}"
                ) from None
    if not rows:
        raise PerfError(f"{path}: perf_analyzer wrote no measurement rows")
    return rows


def run_perf_analyzer(
    model: str,
    grpc_url: str,
    input_json: Path,
    concurrency: int,
    measurement_ms: int,
    csv_path: Path,
    method: str,
    timeout_s: float = 900.0,
) -> list[PerfRow]:
    """One perf_analyzer run at one concurrency; returns its parsed rows (the CSV stays at csv_path)."""
    cmd = [
        *_streaming_command(model, grpc_url, input_json, concurrency),
        "--measurement-interval", str(measurement_ms),
        # LLM requests take seconds: accept any 3 consecutive windows rather than searching for 10%
        # stability, which on a busy CPU would often never come.
        "--stability-percentage", "999",
        "--max-trials", "3",
        "-f", str(csv_path),
    ]  # fmt: skip
    _run(cmd, csv_path, f"perf_analyzer on {model} at concurrency {concurrency}", timeout_s)
    return parse_csv(csv_path, method)


def run_perf_analyzer_requests(
    model: str,
    grpc_url: str,
    input_json: Path,
    concurrency: int,
    requests: int,
    export_path: Path,
    timeout_s: float = 3600.0,
) -> Path:
    """perf_analyzer sending exactly `requests` streaming requests, `concurrency` at a time, measured
    as one window however long they take (long generations); their timings go to `export_path`
    (--profile-export-file, pipeline.serve.profile reads it)."""
    export_path.unlink(missing_ok=True)  # perf_analyzer refuses to overwrite it
    cmd = [
        *_streaming_command(model, grpc_url, input_json, concurrency),
        "--request-count", str(requests),
        "--profile-export-file", str(export_path),
    ]  # fmt: skip
    _run(cmd, export_path, f"perf_analyzer on {model} at concurrency {concurrency}", timeout_s)
    return export_path


def _streaming_command(model: str, grpc_url: str, input_json: Path, concurrency: int) -> list[str]:
    """perf_analyzer over gRPC streaming, `concurrency` requests in flight, inputs from `input_json`."""
    return [
        str(perf_analyzer_binary()),
        "-m", model,
        "-u", grpc_url,
        "-i", "grpc",
        "--async",
        "--streaming",
        "--input-data", str(input_json),
        "--concurrency-range", f"{concurrency}:{concurrency}",
    ]  # fmt: skip


def _run(cmd: list[str], result: Path, what: str, timeout_s: float) -> None:
    """Run perf_analyzer; its output goes to `result` with suffix .log; PerfError unless it wrote `result`."""
    env = dict(os.environ, LD_LIBRARY_PATH=library_path())
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise PerfError(f"{what} ran over {timeout_s:.0f} s") from None
    log = (out.stdout or "") + (out.stderr or "")
    result.with_suffix(".log").write_text(log)
    if out.returncode != 0 or not result.is_file():
        tail = "\n".join(log.strip().splitlines()[-15:])
        raise PerfError(f"{what} failed ({out.returncode}):\n{tail}")


def at_concurrency(rows: list[PerfRow], method: str, concurrency: int) -> PerfRow:
    for row in rows:
        if row.method == method and row.concurrency == concurrency:
            return row
    raise PerfError(f"no {method} measurement at concurrency {concurrency}")


def dms_over_vanilla(rows: list[PerfRow]) -> float | None:
    """DMS throughput over vanilla at DMS's highest concurrency (None without vanilla rows)."""
    top = max(r.concurrency for r in rows if r.method == "dms")
    if not any(r.method == "vanilla" for r in rows):
        return None
    dms, vanilla = at_concurrency(rows, "dms", top), at_concurrency(rows, "vanilla", top)
    return dms.inferences_per_s / vanilla.inferences_per_s if vanilla.inferences_per_s > 0 else float("inf")


def check_gates(rows: list[PerfRow], min_inferences_per_s: float, max_p99_latency_ms: float) -> list[dict]:
    """The latency check's gates on the DMS rows: throughput at the highest concurrency
    (min_inferences_per_s) and the worst p99 latency over all concurrencies (max_p99_latency_ms).
    DMS against vanilla is judged on the equal-memory workload (pipeline.serve.equal_memory), where
    the pool is what limits them."""
    dms = [r for r in rows if r.method == "dms"]
    if not dms:
        raise PerfError("no DMS measurements to gate")
    top = max(r.concurrency for r in dms)
    peak = at_concurrency(rows, "dms", top)
    worst_p99 = max(r.p99_ms for r in dms)
    return [
        {
            "name": "min_inferences_per_s",
            "limit": min_inferences_per_s,
            "measured": round(peak.inferences_per_s, 4),
            "at_concurrency": top,
            "passed": peak.inferences_per_s >= min_inferences_per_s,
        },
        {
            "name": "max_p99_latency_ms",
            "limit": max_p99_latency_ms,
            "measured": round(worst_p99, 3),
            "passed": worst_p99 <= max_p99_latency_ms,
        },
    ]


def verdict(checks: list[dict]) -> dict[str, Any]:
    """{passed, checks}, and `message` naming every missed gate and its numbers."""
    out: dict[str, Any] = {"passed": all(c["passed"] for c in checks), "checks": checks}
    if not out["passed"]:
        out["message"] = gate_message(out)
    return out


def gate_message(gates: dict[str, Any]) -> str:
    failed = [c for c in gates["checks"] if not c["passed"]]
    parts = []
    for c in failed:
        where = f" at concurrency {c['at_concurrency']}" if "at_concurrency" in c else ""
        relation = "at most" if c["name"].rsplit(".", 1)[-1].startswith("max_") else "at least"
        detail = ""
        if "dms_tokens_per_s" in c:
            detail = f" (DMS {c['dms_tokens_per_s']} vs vanilla {c['vanilla_tokens_per_s']} output tokens/s)"
        parts.append(
            f"{c['name']}: measured {c['measured']}{where}{detail}, the card requires {relation} {c['limit']}"
        )
    return (
        "perf gate missed: "
        + "; ".join(parts)
        + " (card section `perf`; --no-gate records instead of failing)"
    )


def plot(rows: list[PerfRow], path: Path, title: str = "") -> None:
    """Throughput and p99 latency against concurrency, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for method in sorted({r.method for r in rows}):
        mine = sorted((r for r in rows if r.method == method), key=lambda r: r.concurrency)
        xs = [r.concurrency for r in mine]
        ax1.plot(xs, [r.inferences_per_s for r in mine], marker="o", label=method)
        ax2.plot(xs, [r.p99_ms for r in mine], marker="o", label=method)
    ax1.set(xlabel="concurrency", ylabel="inferences / s", title="throughput")
    ax2.set(xlabel="concurrency", ylabel="p99 latency (ms)", title="p99 latency")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def rows_json(rows: list[PerfRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    path.write_text(json.dumps(summary, indent=2))


METHOD_MODELS = {"dms": "ensemble", "vanilla": "ensemble_vanilla"}


def repo_tokenizer_dir(model_repo: Path) -> Path:
    """The tokenizer directory the repository's preprocessing model loads (relative to the repository)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(
        (model_repo / "preprocessing" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    path = Path(config.parameters["tokenizer_dir"].string_value)
    return path if path.is_absolute() else (model_repo.resolve() / path).resolve()


def measure(
    model_repo: Path,
    out_dir: Path,
    concurrency: tuple[int, ...],
    input_tokens: int,
    output_tokens: int,
    measurement_ms: int,
    log=print,
    server: TritonServer | None = None,
) -> list[PerfRow]:
    """Measure every method present in `model_repo` at every concurrency, on `server` if given, else on
    a server started here on free ports.

    Writes into out_dir: input_data.json, <method>_c<N>.csv (+ .log), server.log.
    """
    from tqdm import tqdm

    from pipeline.hf_files import load_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(repo_tokenizer_dir(model_repo))
    data_path = out_dir / "input_data.json"
    data_path.write_text(json.dumps(input_data(tokenizer, input_tokens, output_tokens), indent=1))
    methods = [m for m, model in METHOD_MODELS.items() if (model_repo / model / "config.pbtxt").is_file()]
    rows: list[PerfRow] = []
    own = server is None
    if own:
        server = TritonServer(model_repo, log_path=out_dir / "server.log").start()
    try:
        log(f"[perf] server up: http {server.http_url}, grpc {server.grpc_url}")
        runs = [(m, c) for c in sorted(concurrency) for m in methods]  # interleaved: same load for both
        for method, conc in tqdm(runs, desc="perf_analyzer", unit="run"):
            csv_path = out_dir / f"{method}_c{conc}.csv"
            model = METHOD_MODELS[method]
            rows += run_perf_analyzer(
                model, server.grpc_url, data_path, conc, measurement_ms, csv_path, method
            )
    finally:
        if own:
            server.stop()
    return rows
