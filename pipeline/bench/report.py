"""bench.json and the Markdown table of `make bench` (bench/RESULTS.md)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

RESULTS_MD = Path("bench/RESULTS.md")


def device_description() -> str:
    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name()})"
    threads = torch.get_num_threads()
    cpu = platform.processor() or platform.machine()
    return f"cpu ({cpu}, {os.cpu_count()} cores, torch threads {threads})"


def output_paths(out: str | None, markdown: str | None) -> tuple[Path, Path]:
    """(directory for bench.json, Markdown table). The table is the tracked bench/RESULTS.md only when
    neither is given: an experiment with --out elsewhere leaves the recorded results alone."""
    out_dir = Path(out or "build/bench")
    return out_dir, Path(markdown or (RESULTS_MD if out is None else out_dir / "RESULTS.md"))


def _decode_lines(report: dict[str, Any]) -> list[str]:
    s = report["decode_tokens_per_s"]
    return [
        "## Decode on the embedded model",
        "",
        f"Model: {report['model']}.",
        f"DMS decisions: {report['dms_decisions']} (window {report['dms_window']}).",
        f"Workload: batch {report['batch']}, {report['prompt_tokens']}-token prompts "
        f"({report['prompts']}), "
        f"{report['generated_tokens']} generated tokens each ({report['context_tokens']}-token context), "
        "greedy, EOS ignored.",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| kv_bytes_ratio (vanilla / DMS KV bytes per sequence) | {report['kv_bytes_ratio']:.2f} |",
        f"| capacity_ratio (sequences fitting the pool, DMS / vanilla) | {report['capacity_ratio']:.2f} "
        f"({report['sequences_fitting_pool']['dms']} vs {report['sequences_fitting_pool']['vanilla']}) |",
        f"| measured compression ratio (DMS) | {report['measured_compression_ratio']:.2f} |",
        f"| decode tokens/s: DMS | {s['dms']:.1f} |",
        f"| decode tokens/s: vanilla (our engine) | {s['vanilla']:.1f} |",
        f"| decode tokens/s: HF generate | {s['hf']:.1f} |",
        f"| DMS / vanilla speed | {report['dms_over_vanilla_speed']:.2f} |",
        f"| DMS / HF speed | {report['dms_over_hf_speed']:.2f} |",
        f"| vanilla / HF speed | {report['vanilla_over_hf_speed']:.2f} |",
        "",
        f"Decode speed excludes prefill and a warm-up run; each is the best of {report['rounds']} rounds "
        "that interleave DMS, vanilla and HF. KV bytes are the blocks a sequence holds after",
        f"{report['context_tokens']} tokens (all layers and KV heads); the DMS overhead over 1/CR is the",
        "window of recent tokens every stream keeps plus the partly filled last block.",
        "",
    ]


def _shape_lines(shape: dict[str, Any]) -> list[str]:
    widths = "tiny widths (hidden 64, head_dim 8, MLP 64)" if shape["tiny_widths"] else "real widths"
    batches = sorted(shape["step_ms"]["dms"], key=int)
    lines = [
        f"## Decode step at {shape['name']}'s shape",
        "",
        f"A random {shape['name']}-shaped model ({widths}; {shape['dtype']} on {shape['device']}), "
        f"{shape['prompt_tokens']}-token prompts, the median of {shape['timed_steps']} decode steps; DMS "
        "through",
        f"random adapters (window {shape['window']}, block {shape['block_size']}). Host fraction: the share "
        "of a step outside tensor kernels (a profile; see pipeline/bench/shape.py).",
        "",
        "| method | " + " | ".join(f"batch {b}: step ms (host share)" for b in batches) + " | CR |",
        "| --- | " + " | ".join("---" for _ in batches) + " | --- |",
    ]
    for m in ("dms", "vanilla"):
        cells = [f"{shape['step_ms'][m][b]:.1f} ({shape['host_fraction'][m][b]:.0%})" for b in batches]
        cr = shape["compression_ratio"][m][batches[-1]]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {cr:.2f} |")
    if "step_ratio_largest_over_smallest_batch" in shape:
        r = shape["step_ratio_largest_over_smallest_batch"]
        lines += ["", f"Step at batch {batches[-1]} / batch {batches[0]}: DMS {r['dms']:.2f}, "
                  f"vanilla {r['vanilla']:.2f}."]
    return [*lines, ""]


def _equal_memory_lines(em: dict[str, Any]) -> list[str]:
    lines = [
        "## Equal KV memory, engine only",
        "",
        f"Model: {em['model']}. One KV budget of {em['kv_memory_bytes'] / 2**20:.1f} MiB for both "
        f"({em['kv_pool_tokens']} slots per layer and KV head); {em['requests']} requests of "
        f"{em['prompt_tokens']} prompt tokens generating {em['generated_tokens']} each, offered at once.",
        "",
        "| method | output tokens/s | running at most | queued at most | preemptions | mean CR |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for m in ("dms", "vanilla"):
        r = em["rows"][m]
        lines.append(f"| {m} | {r['output_tokens_per_s']:.1f} | {r['running_max']} | {r['queued_max']} | "
                     f"{r['preemptions']} | {r['mean_cr']:.2f} |")
    lines += ["", f"DMS / vanilla output tokens/s: {em['dms_over_vanilla_tokens_per_s']:.2f}.", ""]
    return lines + _served_lines(em.get("served"), em["dms_over_vanilla_tokens_per_s"])


def _served_lines(served: dict[str, Any] | None, engine_ratio: float) -> list[str]:
    """The same workload through Triton (the perf stage's last run) and the gap to the engine alone."""
    if served is None:
        return ["Served through Triton: no perf measurement yet (`make engine` writes it).", ""]
    load = served.get("load_average_1m") or {}
    at_load = f", 1-minute load {load['start']:.1f} to {load['end']:.1f}" if load else ""
    lines = [
        "### The same budget served through Triton",
        "",
        f"From {served['source']} (the perf stage: Triton, perf_analyzer over gRPC streaming, both "
        f"ensembles; concurrency {served['concurrency']}{at_load}).",
        "",
        "| method | output tokens/s | running at most | mean CR | ITL p99 ms | CPU ms per token by part |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for m, r in sorted(served["rows"].items()):
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in (r.get("cpu_ms_per_token") or {}).items() if v >= 0.01)
        cr = "" if r["mean_cr"] is None else f"{r['mean_cr']:.2f}"
        lines.append(f"| {m} | {r['output_tokens_per_s']:.1f} | {r['running_max']} | {cr} | "
                     f"{r['itl_ms_p99']:.1f} | {cpu} |")  # fmt: skip
    ratio = served["dms_over_vanilla_tokens_per_s"]
    lines += ["", f"DMS / vanilla output tokens/s served: {ratio:.2f}; engine only (above): "
              f"{engine_ratio:.2f}; gap {engine_ratio - ratio:+.2f}.", ""]  # fmt: skip
    return lines


def write_results(report: dict[str, Any], out_dir: Path, md_path: Path = RESULTS_MD) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2))
    load = report["load_average_1m"]
    lines = [
        "# DMS runtime benchmark (`make bench`)",
        "",
        f"Device: {report['device']}; 1-minute load average {load['start']:.1f} at start, {load['end']:.1f} "
        "at end (compare the ratios, which come from one run). Regenerate with `make bench` "
        "(DMS_BENCH_THREADS=1 on an oversubscribed machine).",
        "",
    ]
    if "decode_tokens_per_s" in report:
        lines += _decode_lines(report)
    if "shape" in report:
        lines += _shape_lines(report["shape"])
    if "equal_memory" in report:
        lines += _equal_memory_lines(report["equal_memory"])
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(keep_notes(md_path, "\n".join(lines)))


NOTES = "<!-- notes: kept by make bench; everything above is regenerated -->"


def keep_notes(md_path: Path, generated: str) -> str:
    """The new table followed by the notes section an earlier file had (figures from other commands:
    served runs, GPU checks, one-off comparisons), which `make bench` does not produce."""
    old = md_path.read_text() if md_path.exists() else ""
    notes = old[old.index(NOTES) :] if NOTES in old else NOTES + "\n"
    return generated.rstrip() + "\n\n" + notes
