"""Command line: `python -m pipeline engine --model NAME`, `serve`, `ask`, `bench`, `prune`, `cards`.

Flags map onto function arguments; nothing else overrides a card. Subcommands import their modules
lazily so `--help` and card errors answer in well under a second.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

from pipeline.card import CardError, available_cards, load_card
from pipeline.signals import stop_on_sigterm
from pipeline.stages import STAGE_ORDER

DEFAULT_MODEL = "tiny-qwen3"


def _cmd_engine(args: argparse.Namespace) -> int:
    from pipeline.runner import GateFailed, Options, StageFailed, run_pipeline

    card = load_card(args.model)
    options = Options(from_scratch=args.from_scratch, no_gate=args.no_gate, backend=args.backend)
    late = [f for f in args.force if args.until and STAGE_ORDER.index(f) > STAGE_ORDER.index(args.until)]
    if late:
        print(f"error: --force {late[0]} comes after --until {args.until}: nothing would run it",
              file=sys.stderr)  # fmt: skip
        return 2
    stop_on_sigterm()  # no half-written stage directory is left behind
    problem = _unusable_dir(Path(args.build_dir))
    if problem:
        print(f"error: cannot use --build-dir {args.build_dir}: {problem}; name a writable directory",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        report = run_pipeline(
            card, Path(args.build_dir), until=args.until, force=tuple(args.force), options=options,
            verify=args.verify,
        )  # fmt: skip
    except StageFailed as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        kept = f"{args.build_dir}/{card.name}/"
        if isinstance(exc.cause, GateFailed):
            advice = (
                f"The measurement is kept ({kept}{exc.stage}): the same command with --no-gate, or after a "
                "change of the card's limit, judges it again instead of measuring again."
            )
        else:
            advice = (
                f"Outputs of the stages before '{exc.stage}' are kept under {kept}; fix the cause and run "
                "the same command again to resume from there (DMS_DEBUG=1 prints the traceback)."
            )
        print(advice, file=sys.stderr)
        return 1
    root = Path(args.build_dir) / card.name
    print(f"\nreport: {root / 'report.json'}")
    if (root / "model_repo").exists():
        print(f"Triton model repository: {root / 'model_repo'}")
    timings = report.get("stages", {})
    done = [f"{s} (cached)" if timings[s]["cached"] else s for s in STAGE_ORDER if s in timings]
    print(f"stages: {' -> '.join(done)}")
    return 0


def _unusable_dir(path: Path) -> str | None:
    """Why `path` could not be created or written, or None. Tried for real (made, a file written in it,
    and what was made removed again): permission bits do not tell for root, /proc or /sys, or a
    read-only mount."""
    path = path.absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    made = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        return f"{exc.filename or path} cannot be written ({exc.strerror})"
    finally:
        for directory in made:  # deepest first
            if directory.is_dir():
                directory.rmdir()
    return None


def int_in(low: int, high: int, what: str):
    """argparse type: an int from `low` to `high` (a port, a count the server's INT32 tensors carry)."""

    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not {what} ({low}-{high})")
        return value

    return parse


port = int_in(0, 65535, "a port")  # 0: any free one


def finite_float(low: float, what: str, low_allowed: bool = True):
    """argparse type: a finite number from `low` up (not NaN or inf: `--timeout nan` must not pass)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        above = value >= low if low_allowed else value > low
        if not math.isfinite(value) or not above:
            bound = f">= {low:g}" if low_allowed else f"> {low:g}"
            raise argparse.ArgumentTypeError(f"{text} is not {what} (a finite number {bound})")
        return value

    return parse


seconds = finite_float(0, "a duration in seconds", low_allowed=False)


def _cmd_prune(args: argparse.Namespace) -> int:
    from pipeline.runner import prune

    card = load_card(args.model)
    root = Path(args.build_dir) / card.name
    if not (root / "stages").is_dir():
        print(f"error: no build of {card.name} under {args.build_dir} (nothing to prune)", file=sys.stderr)
        return 2
    removed = prune(root)
    for path, size in removed.items():
        print(f"removed {path} ({size / 2**20:.1f} MiB)")
    freed = sum(removed.values()) / 2**30
    print(f"{len(removed)} superseded stage outputs removed, {freed:.2f} GiB freed; linked outputs kept")
    return 0


def _cmd_cards(args: argparse.Namespace) -> int:
    for name in available_cards():
        card = load_card(name)
        print(f"{name:16s} {card.family:6s} {card.description}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from pipeline.serve.cli import serve_command

    return serve_command(args)


def _cmd_ask(args: argparse.Namespace) -> int:
    from pipeline.serve.cli import ask_command

    return ask_command(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from pipeline.bench import bench_command

    return bench_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    engine = sub.add_parser("engine", help="run the build pipeline for a model card")
    engine.add_argument("--model", default=os.environ.get("MODEL", DEFAULT_MODEL), help="card name or path")
    engine.add_argument("--until", choices=STAGE_ORDER, help="stop after this stage")
    engine.add_argument("--force", action="append", default=[], choices=STAGE_ORDER, help="rerun a stage")
    engine.add_argument("--from-scratch", action="store_true", help="retrain the embedded model too")
    engine.add_argument("--no-gate", action="store_true", help="record failed gates but keep building")
    engine.add_argument("--backend", choices=("torch", "trtllm"), help="engine backend (default: card)")
    engine.add_argument("--build-dir", default="build")
    engine.add_argument("--verify", action="store_true", help="hash cached outputs against their manifests")
    engine.set_defaults(func=_cmd_engine)

    cards = sub.add_parser("cards", help="list the model cards")
    cards.set_defaults(func=_cmd_cards)

    serve = sub.add_parser("serve", help="serve a built model repository with Triton")
    serve.add_argument("--model", default=os.environ.get("MODEL", DEFAULT_MODEL))
    serve.add_argument("--build-dir", default="build")
    serve.add_argument("--http-port", type=port, default=8000, help="default 8000")
    serve.add_argument("--grpc-port", type=port, default=8001, help="default 8001")
    serve.add_argument("--metrics-port", type=port, default=8002, help="default 8002")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--admin-key-file", help="open the administration APIs to clients sending this key")
    serve.add_argument(
        "--max-restarts", type=int_in(0, 100, "a restart count"), default=3,
        help="restarts of a failed Triton within 10 minutes before serve exits 1 (default 3)",
    )  # fmt: skip
    serve.set_defaults(func=_cmd_serve)

    ask = sub.add_parser("ask", help="send a prompt to a running server")
    ask.add_argument("prompt")
    ask.add_argument("--url", default=None, help="host:port (default 127.0.0.1:8000 http, :8001 grpc)")
    ask.add_argument("--protocol", choices=("http", "grpc"), default="http")
    ask.add_argument("--stream", action="store_true", help="print tokens as they come (HTTP or gRPC)")
    ask.add_argument("--model", help="ensemble (default), ensemble_vanilla (eviction off), tensorrt_llm_bls")
    ask.add_argument("--max-tokens", type=int_in(1, 2**31 - 1, "a token count"), default=64)
    ask.add_argument("--temperature", type=finite_float(0, "a temperature"), default=0.0)
    ask.add_argument("--timeout", type=seconds, default=600.0, help="seconds to wait for the answer")
    ask.set_defaults(func=_cmd_ask)

    prune = sub.add_parser("prune", help="remove stage outputs the last runs no longer use")
    prune.add_argument("--model", default=os.environ.get("MODEL", DEFAULT_MODEL))
    prune.add_argument("--build-dir", default="build")
    prune.set_defaults(func=_cmd_prune)

    bench = sub.add_parser(
        "bench", help="KV memory, decode speed, real-shape step time and equal-memory throughput"
    )
    bench.add_argument("--out", help="where bench.json goes (default build/bench)")
    bench.add_argument(
        "--markdown", help="the results table (default bench/RESULTS.md, or OUT/RESULTS.md with --out)"
    )
    bench.add_argument("--context", type=int, default=4096)
    bench.add_argument("--batch", type=int, default=8)
    bench.add_argument("--sections", help="comma-separated: decode,shape,equal_memory (default: all)")
    bench.add_argument("--shape", default="qwen3-8b", help="the real model shape of the shape section")
    widths = bench.add_mutually_exclusive_group()
    widths.add_argument("--tiny-widths", dest="tiny_widths", action="store_true", default=None,
                        help="shape section at tiny widths (the default without a GPU)")
    widths.add_argument("--real-widths", dest="tiny_widths", action="store_false",
                        help="shape section at the model's real widths (the default on a GPU)")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; completed stages are kept, run the command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `python -m pipeline cards | head -2`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
