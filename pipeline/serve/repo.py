"""Fill the model-repository templates in model_repo/ from a card and an engine, validate, then write.

Templates use `${name}` placeholders (the TensorRT-LLM backend's fill_template.py convention). The
repository holds, for a torch engine:

    ensemble                text in, text out, over the DMS engine (what clients call)
    ensemble_vanilla        the same over the same engine with eviction off (the perf baseline)
    preprocessing           tokenizer (python)
    postprocessing          detokenizer (python)
    tensorrt_llm            the DMS engine (python backend running pipeline.runtime; decoupled)
    tensorrt_llm_vanilla    the same engine directory, eviction policy "none"
    tensorrt_llm_bls        streaming text interface (decoupled, BLS)

For a stock trtllm engine the engine model uses the TensorRT-LLM C++ backend's config instead. For the DMS
TensorRT engine pair (backend "dms_pair") the engine model is the same python model running the pair's
host driver (config from tensorrt_llm_dms/), and tensorrt_llm_vanilla forwards to it with eviction off
(tensorrt_llm_dms_vanilla/): one copy of the engines and of the pool serves both.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Literal

TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "model_repo"
PLACEHOLDER = re.compile(r"\$\{(\w+)\}")
KV_STATS_MARK = "# kv-stats"
VERSION = "1"
PYCACHE_BLOCKER = "__pycache__"


class RepoError(ValueError):
    """A template or a generated repository is invalid; the message names the model and the problem."""


@dataclass(frozen=True)
class RepoSpec:
    """What the repository is generated from (the card's build limits and the build stage's engine)."""

    engine_dir: str  # absolute, or relative to the repository root
    tokenizer_dir: str  # absolute, or relative to the repository root
    backend: Literal["torch", "trtllm", "dms_pair"] = "torch"
    max_batch_size: int = 8
    max_input_len: int = 1024
    max_output_len: int = 1024
    kv_pool_tokens: int = 65536
    # The torch engine's scheduler admits optimistically and preempts (TensorRT-LLM's max_utilization).
    batch_scheduler_policy: Literal["guaranteed_no_evict", "max_utilization"] = "max_utilization"
    with_vanilla: bool = True  # also serve the same engine with eviction off (perf's baseline)
    device: str = "auto"  # torch backend: auto | cpu | cuda
    dms_session: str = "trtllm"  # dms_pair: how the driver runs the engines (trtllm | emulated)
    stream_interval: int = 1  # tokens per streamed response (card serve.stream_interval)


def fill_template(text: str, values: Mapping[str, object], where: str = "template") -> str:
    """Substitute `${key}`; every placeholder must have a value (a missing one names the key)."""
    missing = sorted(set(PLACEHOLDER.findall(text)) - set(values))
    if missing:
        raise RepoError(f"{where}: no value for placeholder(s) {', '.join(f'${{{m}}}' for m in missing)}")
    return Template(text).substitute({k: str(v) for k, v in values.items()})


def _read(path: Path) -> str:
    if not path.is_file():
        raise RepoError(f"template {path} is missing (the model_repo/ templates ship with the package)")
    return path.read_text()


def render_repository(spec: RepoSpec, templates: Path = TEMPLATES_DIR) -> dict[str, str | Path]:
    """Relative path -> file text (str) or a file to copy (Path), for the whole repository."""
    common = {
        "triton_max_batch_size": spec.max_batch_size,
        "tokenizer_dir": spec.tokenizer_dir,
        "engine_dir": spec.engine_dir,
        "max_input_len": spec.max_input_len,
        "max_output_len": spec.max_output_len,
        "max_tokens_in_paged_kv_cache": spec.kv_pool_tokens,
        "batch_scheduler_policy": spec.batch_scheduler_policy,
        "device": spec.device,
        "dms_session": spec.dms_session,
        "stream_interval": spec.stream_interval,
        "add_special_tokens": "true",
        "skip_special_tokens": "true",
        "preprocessing_instance_count": 1,
        "postprocessing_instance_count": 1,
    }
    files: dict[str, str | Path] = {}

    def add(model: str, template_model: str, config_name: str = "config.pbtxt", code_from: str | None = None,
            **extra) -> None:  # fmt: skip
        src = templates / template_model
        text = fill_template(_read(src / config_name), {**common, "model_name": model, **extra}, str(src))
        if spec.backend == "trtllm":  # the C++ backend reports no per-request KV statistics
            text = "\n".join(line for line in text.splitlines() if KV_STATS_MARK not in line) + "\n"
        files[f"{model}/config.pbtxt"] = text
        version_dir = templates / (code_from or template_model) / VERSION
        for file in sorted(version_dir.rglob("*")) if version_dir.is_dir() else []:
            if file.is_file() and "__pycache__" not in file.parts:
                files[f"{model}/{VERSION}/{file.relative_to(version_dir)}"] = file
        files.setdefault(f"{model}/{VERSION}/.keep", "")  # the version directory must exist
        if f"{model}/{VERSION}/model.py" in files:
            # A file where Python would make its bytecode directory: serving must not write into a stage
            # output (its manifest would stop matching), and the python backend's stub interpreter writes
            # __pycache__ next to model.py whatever PYTHONDONTWRITEBYTECODE says. Python skips writing
            # bytecode it cannot place, and loads model.py from source.
            files[f"{model}/{VERSION}/{PYCACHE_BLOCKER}"] = ""

    engines = {"tensorrt_llm": "dms"}
    if spec.with_vanilla:
        engines["tensorrt_llm_vanilla"] = "none"
    for engine_model, policy in engines.items():
        ensemble = "ensemble" if policy == "dms" else "ensemble_vanilla"
        add(ensemble, "ensemble", engine_model=engine_model)
        if spec.backend == "torch":
            add(engine_model, "tensorrt_llm", eviction_policy=policy)
        elif spec.backend == "dms_pair" and policy == "dms":
            add(engine_model, "tensorrt_llm_dms", code_from="tensorrt_llm", eviction_policy=policy)
        elif spec.backend == "dms_pair":
            add(engine_model, "tensorrt_llm_dms_vanilla", engine_model="tensorrt_llm")
        else:
            add(engine_model, "tensorrt_llm", "config_trtllm.pbtxt", eviction_policy=policy)
            files = {k: v for k, v in files.items() if not k.startswith(f"{engine_model}/{VERSION}/model")}
    add("preprocessing", "preprocessing")
    add("postprocessing", "postprocessing")
    add("tensorrt_llm_bls", "tensorrt_llm_bls", engine_model="tensorrt_llm")
    return files


def validate_repository(files: Mapping[str, str | Path]) -> dict[str, object]:
    """Check the generated files as Triton will: parse each config; return {model: ModelConfig}.

    Every model has a config.pbtxt whose name matches its directory and a version directory; python
    models have `<version>/model.py`; ensemble steps name models of this repository and map only
    inputs/outputs those models declare; no placeholder is left unfilled.
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    models = sorted({path.split("/", 1)[0] for path in files})
    configs: dict[str, object] = {}
    for model in models:
        text = files.get(f"{model}/config.pbtxt")
        if not isinstance(text, str):
            raise RepoError(f"model '{model}' has no config.pbtxt")
        if not any(p.startswith(f"{model}/{VERSION}/") for p in files):
            raise RepoError(f"model '{model}' has no version directory '{VERSION}/'")
        left = PLACEHOLDER.findall(text)
        if left:
            raise RepoError(f"model '{model}': config.pbtxt still has placeholder ${{{left[0]}}}")
        try:
            config = text_format.Parse(text, model_config_pb2.ModelConfig())
        except text_format.ParseError as exc:
            raise RepoError(f"model '{model}': config.pbtxt does not parse: {exc}") from None
        if config.name != model:
            raise RepoError(f"model '{model}': config name is '{config.name}', must equal the directory name")
        if config.backend == "python" and f"{model}/{VERSION}/model.py" not in files:
            raise RepoError(f"model '{model}' uses the python backend but has no {VERSION}/model.py")
        configs[model] = config
    for model, config in configs.items():
        if config.platform != "ensemble":
            continue
        for step in config.ensemble_scheduling.step:
            target = configs.get(step.model_name)
            if target is None:
                raise RepoError(
                    f"ensemble '{model}' calls '{step.model_name}', which is not in the repository"
                )
            declared_in = {t.name for t in target.input}
            declared_out = {t.name for t in target.output}
            for key in step.input_map:
                if key not in declared_in:
                    raise RepoError(f"ensemble '{model}': '{step.model_name}' has no input '{key}'")
            for key in step.output_map:
                if key not in declared_out:
                    raise RepoError(f"ensemble '{model}': '{step.model_name}' has no output '{key}'")
    return configs


def write_repository(spec: RepoSpec, dest: Path, templates: Path = TEMPLATES_DIR) -> dict[str, object]:
    """Render, validate, then write `dest` whole (a temporary sibling renamed into place)."""
    files = render_repository(spec, templates)
    configs = validate_repository(files)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for rel, content in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Path):
                shutil.copy2(content, path)
            else:
                path.write_text(content)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return configs


# Parameters that name a path, relative to the repository unless absolute.
PATH_PARAMETERS = ("gpt_model_path", "tokenizer_dir")


def resized_copy(src: Path, dest: Path, kv_pool_tokens: int, max_num_sequences: int) -> Path:
    """Copy a torch-engine repository to `dest`, its engine models given a pool of `kv_pool_tokens` slots
    per (layer, KV head) and room for `max_num_sequences` running requests (perf's equal-memory
    workload: one pool size for the DMS and the vanilla engine, which memory alone limits). Paths the
    configs give relative to the repository become absolute, so the copy may live anywhere."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    src = Path(src).resolve()
    engines = 0
    for model_dir in sorted(p for p in src.iterdir() if (p / "config.pbtxt").is_file()):
        shutil.copytree(model_dir, dest / model_dir.name, ignore=shutil.ignore_patterns("__pycache__"))
        config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        params = config.parameters
        for key in PATH_PARAMETERS:
            if key in params and not Path(params[key].string_value).is_absolute():
                params[key].string_value = str((src / params[key].string_value).resolve())
        if "max_tokens_in_paged_kv_cache" in params and config.backend == "python":
            params["max_tokens_in_paged_kv_cache"].string_value = str(kv_pool_tokens)
            params["max_num_sequences"].string_value = str(max_num_sequences)
            engines += 1
        (dest / model_dir.name / "config.pbtxt").write_text(text_format.MessageToString(config))
    if not engines:
        raise RepoError(f"{src} has no torch engine model (python backend with a KV pool) to resize")
    return dest
