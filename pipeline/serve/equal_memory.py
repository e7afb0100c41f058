"""perf's equal-memory workload: how many tokens per second one KV memory budget serves, DMS against
vanilla, through the real Triton server and perf_analyzer (gRPC streaming).

One budget in bytes (`perf.equal_memory.kv_memory_bytes`) sizes both engines' pools; a copy of the
packaged repository gives both engine models that pool and room for as many running sequences as the
sweep offers, so memory alone limits them. Prompts are task text (what the model was retrofitted on;
DMS decisions depend on content), every request generates exactly `output_tokens` (end_id -1) and
streams them. At each concurrency c perf_analyzer sends c requests, c at a time, for DMS and then
vanilla (interleaved by concurrency, so a change in the machine's load hits both). The figures come
from perf_analyzer's profile export (pipeline.serve.profile) and from the engine's gauges sampled
during the run (pipeline.serve.metrics).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.card import Card, EqualMemoryPool, equal_memory_pool, kv_bytes_per_token
from pipeline.serve import cpu, perf
from pipeline.serve.metrics import PoolSampler
from pipeline.serve.profile import StreamFigures, figures, read_export
from pipeline.serve.server import TritonServer

ENGINE_MODELS = {"dms": "tensorrt_llm", "vanilla": "tensorrt_llm_vanilla"}
NUM_PROMPTS = 16


@dataclass(frozen=True)
class EqualMemoryRow(StreamFigures):
    """One method at one concurrency: perf_analyzer's figures (StreamFigures) and the engine's."""

    method: str  # "dms" | "vanilla"
    concurrency: int
    running_max: int | None  # the engine's gauges, sampled during the run
    queued_max: int | None
    pool_occupancy_max: float | None
    preemptions: int | None
    mean_cr: float | None  # mean compression ratio of the running sequences, over the run
    pool_bytes: int | None  # the engine's KV pool, as it reports it
    cpu_ms_per_token: dict[str, float]  # CPU time per generated token by part (pipeline.serve.cpu)


def engine_kv_layout(model_repo: Path) -> tuple[int, int]:
    """(KV bytes per token, block size) of the engine the repository serves (its engine.json)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from pipeline.runtime.model import ModelArgs

    config = text_format.Parse(
        (model_repo / "tensorrt_llm" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    engine_dir = Path(config.parameters["gpt_model_path"].string_value)
    meta = json.loads(((model_repo.resolve() / engine_dir) / "engine.json").read_text())
    a = ModelArgs.from_hf_config(meta["hf_config"])
    bytes_per_token = kv_bytes_per_token(a.num_layers, a.num_kv_heads, a.head_dim, meta["dtype"])
    return bytes_per_token, int(meta["limits"]["kv_block_size"])


def task_prompt(tokenizer: Any, num_tokens: int, seed: int) -> str:
    """Held-out task text (pipeline/data/tasks.py: filler with facts and questions) cut to `num_tokens`."""
    from pipeline.data.tasks import MIN_LENGTH, TASKS, eval_items

    item = eval_items(TASKS[seed % len(TASKS)], max(MIN_LENGTH, num_tokens + 16), 1, seed=seed)[0]
    return perf.cut_to_tokens(tokenizer, item.prompt, num_tokens)


def input_data(tokenizer: Any, input_tokens: int, output_tokens: int, num_prompts: int = NUM_PROMPTS) -> dict:
    """perf_analyzer's --input-data: task prompts, exactly `output_tokens` each, streamed."""
    data = perf.input_data(tokenizer, input_tokens, output_tokens, num_prompts)
    for i, entry in enumerate(data["data"]):
        entry["text_input"]["content"] = [task_prompt(tokenizer, input_tokens, seed=i)]
        entry["stream"] = {"content": [True], "shape": [1]}  # streamed: TTFT and ITL
    return data


def pool_of(card: Card, model_repo: Path) -> EqualMemoryPool:
    """The card's budget on the served engine's real shape (a clear CardError when it cannot work)."""
    return equal_memory_pool(card, *engine_kv_layout(model_repo))


def measure(card: Card, model_repo: Path, out_dir: Path, log=print) -> dict[str, Any]:
    """Run the sweep; write <method>_c<N>.json (profile exports, + .log), input_data.json and server.log
    into out_dir. Returns the report section without its verdict (`check_gates` judges it)."""
    from tqdm import tqdm

    from pipeline.serve.repo import resized_copy
    from pipeline.serve.text import load_tokenizer

    em = card.perf.equal_memory
    assert em is not None
    pool = pool_of(card, model_repo)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(perf.repo_tokenizer_dir(model_repo))
    data_path = out_dir / "input_data.json"
    data_path.write_text(json.dumps(input_data(tokenizer, em.input_tokens, em.output_tokens), indent=1))
    rows: list[EqualMemoryRow] = []
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="dms-equal-memory-") as tmp:
        repo = resized_copy(model_repo, Path(tmp) / "model_repo", pool.kv_pool_tokens, max(em.concurrency))
        with TritonServer(repo, log_path=out_dir / "server.log") as server:
            metrics_url = f"{server.host}:{server.metrics_port}"
            log(
                f"[perf] equal memory: {em.kv_memory_bytes} bytes of KV for each engine "
                f"({pool.kv_pool_tokens} slots per KV stream; the vanilla pool holds "
                f"{pool.vanilla_requests} of its requests)"
            )
            for method in ENGINE_MODELS:  # warm-up: the first request of a fresh engine pays one-time costs
                warmup = out_dir / f"warmup_{method}.json"
                _warm_up(perf.METHOD_MODELS[method], server.grpc_url, data_path, warmup, log)
            runs = [(m, c) for c in sorted(em.concurrency) for m in ENGINE_MODELS]
            for method, conc in tqdm(runs, desc="perf_analyzer (equal memory)", unit="run"):
                export = out_dir / f"{method}_c{conc}.json"
                sampler = PoolSampler(metrics_url, ENGINE_MODELS[method]).start()
                cpu_before = cpu.snapshot(server)
                try:
                    perf.run_perf_analyzer_requests(
                        perf.METHOD_MODELS[method], server.grpc_url, data_path, conc, conc, export
                    )
                finally:
                    engine = sampler.stop()
                f = figures(read_export(export)[conc])
                cpu_ms = cpu.per_token_ms(cpu_before, cpu.snapshot(server), f.output_tokens)
                row = dict(method=method, concurrency=conc, cpu_ms_per_token=cpu_ms, **engine)
                rows.append(EqualMemoryRow(**asdict(f), **row))
    for name in ("warmup_dms.json", "warmup_vanilla.json"):
        (out_dir / name).unlink(missing_ok=True)
    return {
        "kv_memory_bytes": em.kv_memory_bytes,
        "kv_pool_tokens": pool.kv_pool_tokens,
        "pool_bytes": pool.pool_bytes,
        "vanilla_requests_fit": pool.vanilla_requests,
        "dms_over_vanilla_tokens_per_s": dms_over_vanilla(rows),
        "rows": [asdict(r) for r in rows],
        # other jobs on the machine slow DMS (many tokens/s, each through the server) more than vanilla
        "load_average_1m": {"start": load_start, "end": os.getloadavg()[0]},
        "workload": {
            "input_tokens": em.input_tokens,
            "output_tokens": em.output_tokens,
            "concurrency": list(em.concurrency),
            "prompts": "held-out task text (pipeline/data/tasks.py)",
            "requests_per_concurrency": "as many as the concurrency, all offered at once",
        },
    }


def _row(rows: list[EqualMemoryRow], method: str, concurrency: int) -> EqualMemoryRow:
    for row in rows:
        if row.method == method and row.concurrency == concurrency:
            return row
    raise perf.PerfError(f"no equal-memory {method} measurement at concurrency {concurrency}")


def dms_over_vanilla(rows: list[EqualMemoryRow]) -> float:
    """DMS output tokens/s over vanilla's at the sweep's highest concurrency."""
    top = max(r.concurrency for r in rows)
    dms, vanilla = _row(rows, "dms", top), _row(rows, "vanilla", top)
    if vanilla.output_tokens_per_s <= 0:
        return float("inf")
    return dms.output_tokens_per_s / vanilla.output_tokens_per_s


def rows_of(section: dict[str, Any]) -> list[EqualMemoryRow]:
    return [EqualMemoryRow(**row) for row in section["rows"]]


def check_gates(
    section: dict[str, Any], min_dms_over_vanilla: float, max_dms_itl_ms_p99: float
) -> list[dict[str, Any]]:
    """The equal-memory checks: DMS/vanilla output tokens/s at the highest concurrency, and the worst
    DMS p99 inter-token latency over the sweep."""
    rows = rows_of(section)
    top = max(r.concurrency for r in rows)
    ratio = dms_over_vanilla(rows)
    worst = max((r for r in rows if r.method == "dms"), key=lambda r: r.itl_ms_p99)
    return [
        {
            "name": "equal_memory.min_dms_over_vanilla_tokens_per_s",
            "limit": min_dms_over_vanilla,
            "measured": round(ratio, 3),
            "at_concurrency": top,
            "dms_tokens_per_s": round(_row(rows, "dms", top).output_tokens_per_s, 1),
            "vanilla_tokens_per_s": round(_row(rows, "vanilla", top).output_tokens_per_s, 1),
            "passed": ratio >= min_dms_over_vanilla,
        },
        {
            "name": "equal_memory.max_dms_itl_ms_p99",
            "limit": max_dms_itl_ms_p99,
            "measured": round(worst.itl_ms_p99, 2),
            "at_concurrency": worst.concurrency,
            "passed": worst.itl_ms_p99 <= max_dms_itl_ms_p99,
        },
    ]


def plot(section: dict[str, Any], path: Path, title: str = "") -> None:
    """Output tokens/s and concurrent sequences against offered concurrency, DMS and vanilla, with the
    memory limit: vanilla x the CR DMS measured (what DMS would reach if its CR-times smaller requests
    cost vanilla's per token)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rows_of(section)
    by = {m: sorted((r for r in rows if r.method == m), key=lambda r: r.concurrency) for m in ENGINE_MODELS}
    xs = [r.concurrency for r in by["vanilla"]]
    cr = [d.final_cr or d.mean_cr or 1.0 for d in by["dms"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, style in (("dms", "o-"), ("vanilla", "s-")):
        mine = by[method]
        ax1.plot([r.concurrency for r in mine], [r.output_tokens_per_s for r in mine], style, label=method)
        ax2.plot([r.concurrency for r in mine], [r.running_max or 0 for r in mine], style, label=method)
    ax1.plot(xs, [v.output_tokens_per_s * c for v, c in zip(by["vanilla"], cr, strict=True)], "k--",
             label="vanilla x measured CR (the limit)")  # fmt: skip
    ax2.plot(xs, [min(x, section["vanilla_requests_fit"] * c) for x, c in zip(xs, cr, strict=True)], "k--",
             label="vanilla's fit x measured CR")  # fmt: skip
    ax2.plot(xs, xs, ":", color="grey", label="offered")
    ax1.set(xlabel="offered concurrency", ylabel="output tokens / s", title="throughput, same KV memory")
    ax2.set(xlabel="offered concurrency", ylabel="sequences running (max)", title="concurrent sequences")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _warm_up(model: str, grpc_url: str, data_path: Path, export: Path, log, attempts: int = 3) -> None:
    """One request to a freshly loaded model. On a loaded machine Triton has answered ready and then
    "failed to find the requested model version" for the first request; a second try a moment later
    goes through, so the warm-up tries again before the sweep would fail."""
    for attempt in range(1, attempts + 1):
        try:
            perf.run_perf_analyzer_requests(model, grpc_url, data_path, 1, 1, export)
            return
        except perf.PerfError as exc:
            if attempt == attempts:
                raise
            log(f"[perf] warm-up of {model} failed ({str(exc).splitlines()[-1]}); trying again")
            time.sleep(2.0 * attempt)
