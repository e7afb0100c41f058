"""The torch-backend engine directory: `engine.json` + `model.safetensors` (HF names) + tokenizer files.

engine.json:
    {"format": "dms-torch-engine", "version": 1, "dtype": "float32",
     "limits": {max_batch_size, max_input_len, max_output_len, kv_block_size, kv_pool_tokens},
     "hf_config": {... the HF config.json, dms_* keys included ...},
     "model": {... ModelArgs as read from hf_config, for humans ...}, "extra": {...}}
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.runtime.limits import EngineLimits, LimitsError
from pipeline.runtime.model import ModelArgs

ENGINE_FORMAT = "dms-torch-engine"
ENGINE_VERSION = 1
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.jinja",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EngineDirError(LimitsError):
    """An engine or checkpoint directory is incomplete or malformed."""


def load_hf_checkpoint(hf_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config dict, state dict) of an HF directory: config.json + model.safetensors (or shards)."""
    hf_dir = Path(hf_dir)
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise EngineDirError(f"{hf_dir}: no config.json; point at a Hugging Face model directory")
    config = json.loads(cfg_path.read_text())
    single = hf_dir / "model.safetensors"
    index = hf_dir / "model.safetensors.index.json"
    if single.is_file():
        state = load_file(str(single))
    elif index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(str(hf_dir / shard)))
    else:
        raise EngineDirError(
            f"{hf_dir}: no model.safetensors (or model.safetensors.index.json); weights are read only "
            "from safetensors: re-save the model with save_pretrained(safe_serialization=True)"
        )
    return config, state


def write_engine_dir(
    out_dir: str | Path,
    *,
    config: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    limits: EngineLimits,
    tokenizer_dir: str | Path | None = None,
    dtype: str = "float32",
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write an engine directory atomically (temp dir, then rename). Weights keep HF names.

    config: the HF config.json as a dict (dms_* keys included for a DMS model).
    """
    if dtype not in DTYPES:
        raise EngineDirError(f"dtype {dtype!r} not supported; use one of {sorted(DTYPES)}")
    args = ModelArgs.from_hf_config(config)
    limits.validate()
    if args.dms is not None and limits.kv_block_size >= args.dms.window_size:
        raise EngineDirError(
            f"kv_block_size ({limits.kv_block_size}) must be smaller than dms_window_size "
            f"({args.dms.window_size})"
        )
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tensors = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / name
                if src.is_file():
                    shutil.copy2(src, tmp / name)
        meta = {
            "format": ENGINE_FORMAT,
            "version": ENGINE_VERSION,
            "dtype": dtype,
            "limits": asdict(limits),
            "hf_config": config,
            "model": args.to_dict(),
            "extra": extra or {},
        }
        (tmp / "engine.json").write_text(json.dumps(meta, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def write_engine_dir_from_hf(
    out_dir: str | Path, hf_dir: str | Path, limits: EngineLimits, dtype: str = "float32"
) -> Path:
    """An engine directory from an HF (DMS) checkpoint directory."""
    config, state = load_hf_checkpoint(hf_dir)
    return write_engine_dir(
        out_dir, config=config, state_dict=state, limits=limits, tokenizer_dir=hf_dir, dtype=dtype
    )


def read_engine_dir(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], EngineLimits, str]:
    """(hf config, state dict, limits, dtype) of an engine directory; clear errors for missing files."""
    path = Path(path)
    if not path.is_dir():
        raise EngineDirError(f"engine directory {path} does not exist; build one with `make engine`")
    meta_path, weights = path / "engine.json", path / "model.safetensors"
    for f in (meta_path, weights):
        if not f.is_file():
            raise EngineDirError(
                f"engine directory {path} is incomplete: {f.name} is missing; rebuild it "
                "(`make engine`, or write_engine_dir)"
            )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise EngineDirError(f"{meta_path}: not valid JSON ({exc}); rebuild the engine directory") from None
    if meta.get("format") != ENGINE_FORMAT:
        raise EngineDirError(f"{meta_path}: format {meta.get('format')!r} is not {ENGINE_FORMAT!r}")
    if meta.get("version") != ENGINE_VERSION:
        raise EngineDirError(
            f"{meta_path}: version {meta.get('version')} unsupported (want {ENGINE_VERSION})"
        )
    return (
        meta["hf_config"],
        load_file(str(weights)),
        EngineLimits.from_mapping(meta["limits"]),
        meta["dtype"],
    )
