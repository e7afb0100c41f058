"""package: a Triton model repository (`<out>/model_repo`) serving the built engine.

Configs are filled from the model_repo/ templates with the engine's limits (see pipeline.serve.repo);
the repository is validated before it is written. A torch engine is served twice from the same
directory: `ensemble` (DMS eviction) and `ensemble_vanilla` (eviction off), so perf measures both.
A DMS TensorRT engine pair is served by its host driver (plugins/trtllm/driver.py) in the same python
model, its eviction-off twin forwarding to it (one copy of the engines); a stock TensorRT engine by
Triton's tensorrtllm C++ backend. The report's `served_engine` says which ("torch", "trtllm-dms-pair",
"trtllm-stock"). The engine stays in the build stage's directory; configs point at it by a path relative
to the repository, so the build tree can move as a whole.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pipeline.card import Card, card_section
from pipeline.stages.api import Options, StageContext

NAME = "package"
DEPENDS: tuple[str, ...] = ("build",)
# 2: served the torch engine beside a DMS TensorRT engine pair; 3: no bytecode is written when served;
# 4 (5 with 3): the pair, by its host driver
VERSION = 5
REPO_DIR = "model_repo"


def templates_hash() -> str:
    """The templates are part of the output: a changed template must re-run this stage."""
    from pipeline.serve.repo import TEMPLATES_DIR

    digest = hashlib.sha256()
    for path in sorted(p for p in TEMPLATES_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(TEMPLATES_DIR)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def settings(card: Card, options: Options) -> dict[str, Any]:
    out = card_section(card, "build")
    out["templates"] = templates_hash()
    out["stream_interval"] = card.serve.stream_interval
    return out


def _tokenizer_dir(engine_dir: Path, build_dir: Path, report: dict[str, Any]) -> Path:
    if (engine_dir / "tokenizer_config.json").is_file() or (engine_dir / "tokenizer.json").is_file():
        return engine_dir
    if report.get("tokenizer_dir"):
        return build_dir / report["tokenizer_dir"]
    raise FileNotFoundError(
        f"no tokenizer files in the engine directory {engine_dir} and no tokenizer_dir in the build report; "
        "rebuild the engine (`make engine ARGS='--force build'`)"
    )


def run(ctx: StageContext) -> dict[str, Any]:
    from pipeline.serve.repo import RepoSpec, write_repository

    build = ctx.reports["build"]
    build_dir = ctx.inputs["build"]
    backend, engine_dir = build["backend"], build_dir / build["engine_dir"]
    tokenizer_dir = _tokenizer_dir(engine_dir, build_dir, build)
    limits = dict(card_section(ctx.card, "build")["build"])
    served = "torch"
    if backend == "trtllm" and build.get("servable_by_tensorrtllm_backend"):
        engine_dir, served = build_dir / build["trtllm_engines"]["engine"], "trtllm-stock"
    elif backend == "trtllm":  # the DMS pair: its per-head pool is engine I/O, which the driver feeds
        backend, served = "dms_pair", "trtllm-dms-pair"
        built = json.loads((engine_dir / "dms_build.json").read_text())["limits"]  # what the engines take
        names = ("max_batch_size", "max_input_len", "max_output_len", "kv_pool_tokens")
        limits |= {k: built[k] for k in names}
        print("[package] the DMS TensorRT engine pair, served by its host driver (plugins/trtllm/driver.py)")
    if backend == "torch":  # the engine's own limits are the truth for what it accepts
        limits.update(json.loads((engine_dir / "engine.json").read_text())["limits"])
    repo = ctx.out_dir / REPO_DIR
    # Relative to the repository: the final directory sits beside this temporary one, at the same depth.
    rel = lambda p: os.path.relpath(Path(p).resolve(), repo.resolve())
    spec = RepoSpec(
        engine_dir=rel(engine_dir),
        tokenizer_dir=rel(tokenizer_dir),
        backend=backend,
        max_batch_size=int(limits["max_batch_size"]),
        max_input_len=int(limits["max_input_len"]),
        max_output_len=int(limits["max_output_len"]),
        kv_pool_tokens=int(limits["kv_pool_tokens"]),
        with_vanilla=backend in ("torch", "dms_pair"),
        stream_interval=ctx.card.serve.stream_interval,
    )
    configs = write_repository(spec, repo)
    print(f"[package] {len(configs)} models in {REPO_DIR}/: {', '.join(sorted(configs))}")
    return {
        "model_repo": REPO_DIR,
        "backend": backend,  # what the repository serves; `build.backend` says what was built
        "built_backend": build["backend"],
        "served_engine": served,
        "models": sorted(configs),
        "engine_dir": spec.engine_dir,
        "max_input_len": spec.max_input_len,
        "max_output_len": spec.max_output_len,
        "max_tokens_in_paged_kv_cache": spec.kv_pool_tokens,
        "batch_scheduler_policy": spec.batch_scheduler_policy,
    }
