"""`python -m pipeline serve` (run Triton on a built repository) and `python -m pipeline ask` (a client)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from pipeline.signals import stop_on_sigterm

EXAMPLE = """\
endpoints:
  HTTP    http://{http}  (generate: /v2/models/ensemble/generate, streaming: .../generate_stream)
          through a proxy refusing bodies over {limit} bytes (Triton's own HTTP endpoint: {upstream})
  gRPC    {grpc}  (streaming: the tensorrt_llm_bls or ensemble model; the recommended client path)
  metrics http://{metrics}/metrics  (dms_kv_pool_blocks_used, ...)
administration APIs (model repository, shared memory, logging, trace): {admin}
try:
  curl -s -X POST http://{http}/v2/models/ensemble/generate \\
       -d '{{"text_input": "k5 31 . the grass is green . k9 77 . ? k9", "max_tokens": 8}}'
  python -m pipeline ask "k5 31 . the grass is green . k9 77 . ? k5" --url {http}
  python -m pipeline ask "v3 7 . v10 v3 . ? v10" --protocol grpc --stream --url {grpc}
vanilla (eviction off) for comparison: /v2/models/ensemble_vanilla/generate
Ctrl-C stops the server.
"""


def _admin_key(path: str | None) -> str | None:
    from pipeline.serve.server import ServerError, check_admin_key

    if path is None:
        return None
    try:
        return check_admin_key(Path(path).read_text().strip())
    except OSError as exc:
        raise ServerError(f"cannot read --admin-key-file {path}: {exc.strerror}") from None


def serve_command(args: argparse.Namespace) -> int:
    from pipeline.card import load_card
    from pipeline.serve.server import ServerError
    from pipeline.serve.supervisor import Supervisor

    card = load_card(args.model)
    root = Path(args.build_dir) / card.name
    repo = root / "model_repo"
    if not (repo / "ensemble" / "config.pbtxt").is_file():
        print(
            f"error: no model repository at {repo}: build it first with "
            f"`python -m pipeline engine --model {card.name} --build-dir {args.build_dir}`",
            file=sys.stderr,
        )
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: binding {args.host}: the server has no authentication, and Triton 2.51's HTTP front "
            "end has known crashes (CVE-2025-23310; bodies are capped here, other malformed traffic may "
            "still hurt it): put a hardened proxy in front of it, or use NVIDIA's 25.07+ containers",
            file=sys.stderr,
        )
    limit = card.serve.max_request_bytes

    def ready(server, restarts: int) -> None:
        if restarts:
            print(f"Triton is serving again (restart {restarts})", flush=True)
            return
        admin = (
            f"open to clients sending the `admin-key` header from {args.admin_key_file}"
            if args.admin_key_file
            else "closed (open them with --admin-key-file FILE)"
        )
        print(
            EXAMPLE.format(
                http=f"{server.host}:{supervisor.http_port}", upstream=server.http_url, grpc=server.grpc_url,
                metrics=f"{server.host}:{server.metrics_port}", limit=limit, admin=admin,
            ),
            flush=True,
        )  # fmt: skip

    print(f"starting Triton on {repo.resolve()} (log: {root / 'server.log'}) ...", flush=True)
    # Ctrl-C, and SIGTERM from a supervisor, stop cleanly (a shell's background job starts with SIGINT
    # ignored, so the handler is installed explicitly).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stop_on_sigterm()
    try:
        supervisor = Supervisor(
            repo, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
            metrics_port=args.metrics_port, log_path=root / "server.log", max_request_bytes=limit,
            admin_key=_admin_key(args.admin_key_file), max_restarts=args.max_restarts,
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )  # fmt: skip
        return supervisor.run(ready)
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopped the server (requests in flight got up to 10 s)", flush=True)
        return 0


def ask_command(args: argparse.Namespace) -> int:
    from pipeline.serve import client

    url = args.url or ("127.0.0.1:8001" if args.protocol == "grpc" else "127.0.0.1:8000")
    url = url.removeprefix("http://").removeprefix("https://").rstrip("/")  # the clients take host:port
    params = {"temperature": args.temperature, "timeout_s": args.timeout}
    try:
        if args.stream:
            # the BLS model detokenizes incrementally (no split characters in the streamed pieces)
            stream = client.stream_grpc if args.protocol == "grpc" else client.stream_http
            reply = client.Reply(text="")
            model = args.model or "tensorrt_llm_bls"
            for piece in stream(url, args.prompt, args.max_tokens, model=model, **params):
                print(piece.text, end="", flush=True)
                reply.text += piece.text
                if piece.kv_live_tokens is not None:
                    reply.kv_live_tokens, reply.kv_compression_ratio = (
                        piece.kv_live_tokens,
                        piece.kv_compression_ratio,
                    )
            print()
        else:
            generate = client.generate_grpc if args.protocol == "grpc" else client.generate_http
            reply = generate(url, args.prompt, args.max_tokens, model=args.model or "ensemble", **params)
            print(reply.text)
    except client.ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if reply.kv_live_tokens is not None:
        print(
            f"[kv] {reply.kv_live_tokens} live KV entries (tokens summed over layers and KV heads), "
            f"compression {reply.kv_compression_ratio:.2f}x",
            file=sys.stderr,
        )
    return 0
