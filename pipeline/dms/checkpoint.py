"""DMS checkpoints: HF directories with NVIDIA's `dms_*` config keys (docs/dms.md section 7), and the
training state for resume.

Both layouts load with plain transformers classes plus `patch_model`, never `trust_remote_code`:
- ours: `architectures: ["Qwen3ForCausalLM"]` (or Llama) with the dms_* keys added;
- NVIDIA's: `model_type: "qwen3_dms"`, `architectures: ["Qwen3DMSForCausalLM"]`, an `auto_map` to
  their remote code; the same weight names (+ `self_attn.dms_proj_alpha{,_norm}.weight` in adapter mode).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from dms_core.config import DmsConfig
from pipeline.dms.distributed import SINGLE_PROCESS, Dist
from pipeline.dms.patch import UnsupportedModelError, patch_model

_FAMILIES = {"qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "llama": ("LlamaConfig", "LlamaForCausalLM")}


def _family(raw: dict[str, Any], where: Path) -> str:
    names = " ".join([str(raw.get("model_type", "")), *map(str, raw.get("architectures") or [])]).lower()
    for family in _FAMILIES:
        if family in names:
            return family
    raise UnsupportedModelError(
        f"{where}: architecture {raw.get('architectures')} / model_type {raw.get('model_type')!r} is not one "
        f"we can patch for DMS (supported: Qwen3ForCausalLM, LlamaForCausalLM)"
    )


def load_config(model_dir: str | Path):
    """A plain transformers config for an HF or DMS directory (ours or NVIDIA's layout)."""
    import transformers

    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); restore the model's config.json") from None
    family = _family(raw, model_dir)
    config_cls_name, model_cls_name = _FAMILIES[family]
    clean = {k: v for k, v in raw.items() if k not in ("model_type", "auto_map", "architectures")}
    config = getattr(transformers, config_cls_name)(**clean)
    config.architectures = [model_cls_name]
    return config


def load_dms_model(
    model_dir: str | Path, dtype: torch.dtype | None = None, settings: DmsConfig | None = None
) -> nn.Module:
    """Open a DMS (or plain) HF checkpoint with transformers' own class and patch it for DMS.

    Adapter weights (`model.layers.N.self_attn.dms_proj_alpha{,_norm}.weight`) are read from the
    safetensors files after the base weights; a missing adapter in adapter mode is an error.
    """
    import transformers

    model_dir = Path(model_dir)
    config = load_config(model_dir)
    cls = getattr(transformers, config.architectures[0])
    # transformers reports the adapter weights as UNEXPECTED (its class has no adapters); they are
    # loaded just below, so keep that alarming table out of the user's log.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model = cls.from_pretrained(model_dir, config=config, dtype=dtype or torch.float32)
    finally:
        transformers.logging.set_verbosity(verbosity)
    patch_model(model, settings or DmsConfig.read(config))
    if model.dms_settings.separate_alpha:
        adapters = {}
        for file in sorted(model_dir.glob("*.safetensors")):
            adapters.update({k: v for k, v in load_file(file).items() if ".dms_proj_alpha" in k})
        expected = {n for n, _ in model.named_parameters() if ".dms_proj_alpha" in n}
        missing = expected - set(adapters)
        if missing:
            raise ValueError(
                f"{model_dir}: config says dms_separate_alpha=true but {len(missing)} adapter weights are "
                f"missing (e.g. {sorted(missing)[0]}); the checkpoint is incomplete"
            )
        model.load_state_dict(adapters, strict=False)
    return model.eval()


def save_dms_model(
    model: nn.Module, out_dir: str | Path, tokenizer: Any = None, target_cr: float = 8.0,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a DMS checkpoint: safetensors weights, config.json with every dms_* key, the tokenizer.

    `state_dict`: the weights to write when the model's own are sharded (`distributed.full_state_dict`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model.config
    for key, value in DmsConfig.read(config).to_hf_config().items():
        setattr(config, key, value)  # every dms_* key, defaults filled in
    config.dms_cr = int(target_cr) if float(target_cr).is_integer() else float(target_cr)
    # A model imported from GGUF carries `gguf_file`, which makes save_pretrained refuse; the weights are
    # plain float tensors by now.
    if hasattr(config, "gguf_file"):
        del config.gguf_file
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and "gguf" in str(quantizer.quantization_config.quant_method).lower():
        model.hf_quantizer = None  # GGUF weights are dequantized to float at load: nothing to keep
        config.quantization_config = None
        del config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


# ---- training state (resume) ----


def save_training_state(
    state_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
    d: Dist = SINGLE_PROCESS,
) -> None:
    """Trainable weights (safetensors), optimizer state (tensors only) and loop counters (JSON).

    Both are gathered whole (unsharded, by parameter name) onto rank 0, which alone writes: a run can
    resume on any number of processes. All ranks must call this (it is a collective under FSDP).
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    weights, optim = get_state_dict(model, optimizer, options=options)
    if not d.is_main:
        return
    state_dir = Path(state_dir)
    tmp = state_dir.with_name(state_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({n: t.detach().contiguous() for n, t in weights.items()}, str(tmp / "trainable.safetensors"))
    torch.save(optim, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    if state_dir.exists():
        shutil.rmtree(state_dir)
    tmp.rename(state_dir)


def load_training_state(
    state_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, d: Dist = SINGLE_PROCESS
) -> dict[str, Any]:
    """Restore what `save_training_state` wrote (every rank reads it); returns the loop counters."""
    state_dir = Path(state_dir)
    weights = load_file(str(state_dir / "trainable.safetensors"))
    optim = torch.load(state_dir / "optimizer.pt", weights_only=True)
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim, options=options)
    return json.loads((state_dir / "state.json").read_text())
