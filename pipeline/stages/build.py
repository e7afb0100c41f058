"""build: an engine from the converted TensorRT-LLM checkpoint (never from the HF one).

Backends (card `build.backend`, overridden by `--backend`):
- torch: the checkpoint's ranks are merged and mapped back to HF names (`pipeline.convert`) and written as
  the runtime's engine directory (`pipeline.runtime.engine_dir.write_engine_dir`): every CPU build
  proves the conversion.
- trtllm: `plugins/trtllm/build_engine.py` runs `trtllm-build` (TensorRT-LLM 1.2.1) with our model
  class and DMS attention plugin, inside that environment: a Python interpreter named by
  DMS_TRTLLM_PYTHON, or `docker run --gpus all` of DMS_TRTLLM_IMAGE (default: Triton's 25.12 TRT-LLM
  container) with the repository mounted. It needs a GPU.
- auto: trtllm where a GPU and that environment are present, otherwise torch, saying which is missing.

Report: `backend` ("torch" | "trtllm"), `engine_dir` ("engine", relative to this stage's directory),
`tokenizer_dir`, `backend_reason`; for trtllm also `build_log` ("build.log"), the driver's manifest
(`engine/dms_build.json`), `trtllm_engines` ({"engine": ...} for a stock engine, {"context", "generation"}
for the DMS pair) and `servable_by_tensorrtllm_backend`. Triton's tensorrtllm backend cannot drive the
DMS pair (its per-head KV pool is engine I/O): the package stage serves it with the pair's host driver
(plugins/trtllm/driver.py) behind Triton's python backend. The package stage reads `backend`,
`engine_dir`, `tokenizer_dir`, `servable_by_tensorrtllm_backend` and `trtllm_engines`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.card import Card, card_section
from pipeline.stages.api import Options, StageContext

NAME = "build"
DEPENDS: tuple[str, ...] = ("convert",)
VERSION = 3  # 2: a DMS TensorRT engine pair came with a torch engine to serve; 3: the driver serves the pair
ENGINE_DIR = "engine"
BUILD_LOG = "build.log"
DEFAULT_IMAGE = "nvcr.io/nvidia/tritonserver:25.12-trtllm-python-py3"
REPO_ROOT = Path(__file__).resolve().parents[2]


class BackendUnavailable(RuntimeError):
    """`--backend trtllm` was asked for where it cannot run; the message says what is missing."""


@dataclass(frozen=True)
class TrtllmEnv:
    """Where trtllm-build runs: a local interpreter, or a container image run with docker."""

    python: str | None = None
    image: str | None = None

    def command(self, args: list[str], workdir: Path) -> list[str]:
        """The argument list that runs `python plugins/trtllm/build_engine.py ARGS` in this environment."""
        driver = "plugins/trtllm/build_engine.py"
        if self.python:
            return [self.python, str(REPO_ROOT / driver), *args]
        mount = f"{REPO_ROOT}:/workspace/dms"
        work = f"{workdir}:{workdir}"
        return [
            "docker", "run", "--rm", "--gpus", "all", "--ipc=host", "--user", f"{os.getuid()}:{os.getgid()}",
            "-e", "HOME=/tmp", "-v", mount, "-v", work,
            "-w", "/workspace/dms", self.image or DEFAULT_IMAGE, "python3", driver, *args,
        ]  # fmt: skip


def gpu_present() -> bool:
    """An NVIDIA GPU answers `nvidia-smi -L` (our torch may be a CPU build even on a GPU box)."""
    if not shutil.which("nvidia-smi"):
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def find_trtllm_env() -> tuple[TrtllmEnv | None, str]:
    """The TensorRT-LLM 1.2.1 environment, or None and a sentence saying what is missing."""
    python = os.environ.get("DMS_TRTLLM_PYTHON")
    if python:
        probe = [python, "-c", "import tensorrt_llm, sys; sys.stdout.write(tensorrt_llm.__version__)"]
        try:
            out = subprocess.run(probe, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"DMS_TRTLLM_PYTHON={python} cannot run ({exc})"
        if out.returncode != 0:
            return None, f"DMS_TRTLLM_PYTHON={python} cannot import tensorrt_llm"
        if not out.stdout.startswith("1.2"):
            return None, f"DMS_TRTLLM_PYTHON={python} has tensorrt_llm {out.stdout}, not 1.2.x"
        return TrtllmEnv(python=python), f"tensorrt_llm {out.stdout} at {python}"
    image = os.environ.get("DMS_TRTLLM_IMAGE", DEFAULT_IMAGE)
    if not shutil.which("docker"):
        return None, (
            "no TensorRT-LLM 1.2.1 environment: set DMS_TRTLLM_PYTHON to a Python with tensorrt-llm==1.2.1, "
            f"or install docker and pull {image}"
        )
    probe = subprocess.run(["docker", "image", "inspect", image], capture_output=True, timeout=60)
    if probe.returncode != 0:
        return None, f"docker image {image} is not present (docker pull {image}, or set DMS_TRTLLM_IMAGE)"
    return TrtllmEnv(image=image), f"docker image {image}"


def resolve_backend(requested: str, dtype: str = "bfloat16") -> tuple[str, str, TrtllmEnv | None]:
    """(backend, reason, environment) for "auto" | "torch" | "trtllm"; raises if trtllm cannot run."""
    if requested == "torch":
        return "torch", "torch backend requested", None
    if requested not in ("auto", "trtllm"):
        raise BackendUnavailable(f"unknown backend {requested!r}: use auto, torch or trtllm")
    missing = []
    if dtype not in ("bfloat16", "float16"):
        missing.append(f"build.dtype is {dtype}; TensorRT-LLM engines here are bfloat16 or float16")
    if not gpu_present():
        missing.append("no NVIDIA GPU (nvidia-smi -L finds none)")
    env, where = find_trtllm_env()
    if env is None:
        missing.append(where)
    if not missing:
        return "trtllm", f"GPU present, TensorRT-LLM from {where}", env
    reason = "; ".join(missing)
    if requested == "trtllm":
        raise BackendUnavailable(
            f"--backend trtllm cannot run here: {reason}. Run on a GPU machine with the TensorRT-LLM 1.2.1 "
            "container (ci/h100_engine.sh) or drop --backend to use the torch engine"
        )
    return "torch", f"trtllm unavailable ({reason}); using the torch engine", None


def requested_backend(card: Card, options: Options) -> str:
    return options.backend or card.build.backend


def settings(card: Card, options: Options) -> dict[str, Any]:
    out = card_section(card, "build")
    # The resolved backend is part of the key: the same card builds a different engine on a GPU box.
    requested = requested_backend(card, options)
    try:
        out["backend_resolved"] = resolve_backend(requested, card.build.dtype)[0]
    except BackendUnavailable:
        out["backend_resolved"] = "unavailable"  # run() raises the full message
    return out


def run(ctx: StageContext) -> dict[str, Any]:
    requested = requested_backend(ctx.card, ctx.options)
    backend, reason, env = resolve_backend(requested, ctx.card.build.dtype)
    print(f"[build] backend {backend}: {reason}")
    ckpt = ctx.inputs["convert"] / ctx.reports["convert"]["checkpoint_dir"]
    tokenizer = ctx.inputs["convert"] / ctx.reports["convert"].get("tokenizer_dir", "tokenizer")
    engine = ctx.out_dir / ENGINE_DIR
    if backend == "trtllm":
        assert env is not None
        try:
            report = build_trtllm(env, ckpt, tokenizer, engine, ctx.out_dir / BUILD_LOG, ctx.card)
            return {"backend": backend, "engine_dir": ENGINE_DIR, "backend_reason": reason} | report
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            if requested == "trtllm":
                raise
            # auto: a failed TensorRT-LLM build must not cost the user the engine; the log stays.
            print(f"[build] trtllm build failed ({exc}); backend auto: the torch engine", file=sys.stderr)
            shutil.rmtree(engine, ignore_errors=True)
            backend, reason = "torch", f"trtllm build failed ({exc}); log kept in {BUILD_LOG}"
    report = {"backend": backend, "engine_dir": ENGINE_DIR, "backend_reason": reason}
    return report | build_torch(ckpt, tokenizer, engine, ctx.card)


def build_torch(ckpt: Path, tokenizer: Path, engine: Path, card: Card) -> dict[str, Any]:
    """The runtime's engine directory from the TensorRT-LLM checkpoint (ranks merged, HF names)."""
    from pipeline.convert.checkpoint import read_checkpoint, to_hf
    from pipeline.hf_files import generation_ids
    from pipeline.runtime.engine_dir import write_engine_dir

    checkpoint = read_checkpoint(ckpt)
    config, state = to_hf(checkpoint)
    config |= generation_ids(tokenizer)
    write_engine_dir(
        engine,
        config=config,
        state_dict=state,
        limits=card.build.limits(),
        tokenizer_dir=tokenizer,
        dtype=card.build.dtype,
        extra={"built_from": "TensorRT-LLM checkpoint", "tp_size_merged": checkpoint.tp_size},
    )
    return {"tp_size_merged": checkpoint.tp_size, "tokenizer_dir": engine.name}


def build_trtllm(
    env: TrtllmEnv, ckpt: Path, tokenizer: Path, engine: Path, log_path: Path, card: Card
) -> dict[str, Any]:
    """Run the build driver in the TensorRT-LLM environment; keep its log and manifest."""
    b = card.build
    args = [
        "--checkpoint_dir", str(ckpt.resolve()), "--output_dir", str(engine.resolve()),
        "--tokenizer_dir", str(tokenizer.resolve()),
        "--max_batch_size", str(b.max_batch_size), "--max_input_len", str(b.max_input_len),
        "--max_output_len", str(b.max_output_len), "--tokens_per_block", str(b.kv_block_size),
        "--kv_pool_tokens", str(b.kv_pool_tokens), "--dtype", b.dtype,
    ]  # fmt: skip
    cmd = env.command(args, workdir=engine.resolve().parents[1])
    with log_path.open("w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    if proc.returncode != 0:
        tail = log_path.read_text().splitlines()[-20:]
        print("\n".join(tail), file=sys.stderr)
        raise RuntimeError(
            f"trtllm-build failed (exit {proc.returncode}); its last lines are above, all in {log_path.name}"
        )
    manifest = engine / "dms_build.json"
    if not manifest.is_file():
        raise RuntimeError(f"the build driver wrote no {manifest.name}; see {log_path.name}")
    engines = sorted(json.loads(manifest.read_text())["engines"])
    return {
        "build_log": BUILD_LOG,
        "build_manifest": f"{ENGINE_DIR}/dms_build.json",
        "tokenizer_dir": f"{ENGINE_DIR}/tokenizer",
        # {"engine": ...}: one stock engine (plain model), which Triton's tensorrtllm backend serves;
        # {"context", "generation"}: the DMS pair, which takes the per-head pool as I/O (plugins/README.md).
        "trtllm_engines": {name: f"{ENGINE_DIR}/{name}" for name in engines},
        "servable_by_tensorrtllm_backend": engines == ["engine"],
    }
