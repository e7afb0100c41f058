"""`make bench` (`python -m pipeline bench`): three sections, one run, one bench.json.

- decode (decode.py): the embedded model's KV bytes and decode speed, DMS vs our vanilla vs HF generate;
- shape (shape.py): the decode step at a real model's layer and head counts, and its host share;
- equal_memory (equal_memory.py): tokens per second one KV budget serves, DMS vs vanilla, engine only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from pipeline.bench.decode import DECODE_TOKENS, run_decode
from pipeline.bench.report import device_description, output_paths, write_results

SECTIONS = ("decode", "shape", "equal_memory")


def bench_command(args: argparse.Namespace) -> int:
    """`python -m pipeline bench`."""
    out, markdown = output_paths(args.out, args.markdown)
    sections = args.sections.split(",") if args.sections else list(SECTIONS)
    unknown = sorted(set(sections) - set(SECTIONS))
    problems = []
    if unknown:
        problems.append(f"--sections: unknown {', '.join(unknown)} (choose from {', '.join(SECTIONS)})")
    if args.batch < 1 or args.context <= 2 * DECODE_TOKENS:
        problems.append(
            f"--batch must be >= 1 and --context more than {2 * DECODE_TOKENS} tokens "
            f"({DECODE_TOKENS} of them are generated); got --batch {args.batch} --context {args.context}"
        )
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 2
    # On a shared, oversubscribed CPU, OpenMP spin-waits make multi-threaded small matmuls collapse;
    # DMS_BENCH_THREADS=1 gives stable numbers there (the thread count is recorded in `device`).
    if os.environ.get("DMS_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["DMS_BENCH_THREADS"]))
    report: dict = {"device": device_description(), "load_average_1m": {"start": os.getloadavg()[0]}}
    try:
        if "decode" in sections:
            report |= run_decode(args.context, args.batch)
        if "shape" in sections:
            from pipeline.bench.shape import run_shape

            tiny = args.tiny_widths if args.tiny_widths is not None else not torch.cuda.is_available()
            report["shape"] = run_shape(args.shape, tiny_widths=tiny)
        if "equal_memory" in sections:
            from pipeline.bench.equal_memory import run_equal_memory, served

            report["equal_memory"] = run_equal_memory() | {"served": served()}
    except ValueError as exc:  # limits the engine refuses (pool too small for the batch, ...)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report["device"] = device_description()
    report["load_average_1m"]["end"] = os.getloadavg()[0]
    write_results(report, out, markdown)
    print(json.dumps({k: v for k, v in report.items() if k != "details"}, indent=2))
    print(f"wrote {out / 'bench.json'} and {markdown}")
    return 0
