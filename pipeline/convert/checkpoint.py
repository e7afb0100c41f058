"""Read a TensorRT-LLM checkpoint directory (config.json + rank{N}.safetensors) and map it back to HF.

The inverse of `pipeline.convert.export`: the build stage's torch backend turns the converted checkpoint
(not the HF one) back into HF parameter names, so every CPU build proves the conversion.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.convert.config import hf_config_from_trtllm, model_shape
from pipeline.convert.names import ConversionError, ModelShape, check_tp_size, trtllm_to_hf
from pipeline.hf_files import generation_ids


@dataclass(frozen=True)
class TrtllmCheckpoint:
    path: Path
    config: dict[str, Any]
    tp_size: int
    shape: ModelShape

    def rank_file(self, rank: int) -> Path:
        return self.path / f"rank{rank}.safetensors"


def read_checkpoint(ckpt_dir: str | Path) -> TrtllmCheckpoint:
    """Validate a checkpoint directory's config and rank files (existence, not contents)."""
    path = Path(ckpt_dir)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ConversionError(
            f"{path} is not a TensorRT-LLM checkpoint: no config.json (run the convert stage)"
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{cfg_path} is not valid JSON ({exc}); re-run the convert stage") from None
    mapping = cfg.get("mapping") or {}
    tp_size = int(mapping.get("tp_size", 1))
    if int(mapping.get("pp_size", 1)) != 1:
        raise ConversionError(
            f"{cfg_path}: pipeline parallelism (pp_size {mapping['pp_size']}) is not supported"
        )
    hf = hf_config_from_trtllm(cfg)
    shape = model_shape(hf, adapter=bool(cfg.get("dms_separate_alpha", False)))
    check_tp_size(shape, tp_size)
    for rank in range(tp_size):
        if not (path / f"rank{rank}.safetensors").is_file():
            raise ConversionError(
                f"{path}: rank{rank}.safetensors is missing (config.json says tp_size {tp_size}); "
                "the checkpoint is incomplete, re-run the convert stage"
            )
    return TrtllmCheckpoint(path=path, config=cfg, tp_size=tp_size, shape=shape)


def load_rank(ckpt: TrtllmCheckpoint, rank: int) -> dict[str, torch.Tensor]:
    file = ckpt.rank_file(rank)
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConversionError(
            f"{file} is not a readable safetensors file ({exc}); it is corrupted or truncated, "
            "re-run the convert stage"
        ) from None


def to_hf(ckpt: TrtllmCheckpoint) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(HF config dict, HF state dict) merged from every rank."""
    ranks = [load_rank(ckpt, r) for r in range(ckpt.tp_size)]
    return hf_config_from_trtllm(ckpt.config), trtllm_to_hf(ranks, ckpt.shape)


def write_hf_dir(ckpt_dir: str | Path, out_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """An HF model directory (config.json, model.safetensors, tokenizer files) from a TRT-LLM checkpoint."""
    ckpt = read_checkpoint(ckpt_dir)
    hf_cfg, state = to_hf(ckpt)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        for file in Path(tokenizer_dir).iterdir():
            if file.is_file():
                shutil.copy2(file, out / file.name)
        hf_cfg |= generation_ids(tokenizer_dir)
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    tensors = {k: v.contiguous() for k, v in state.items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out
