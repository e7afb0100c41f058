"""HF (DMS) checkpoint -> TensorRT-LLM 1.2.1 checkpoint (config.json + rank{N}.safetensors).

ModelOpt's `export_tensorrt_llm_checkpoint` writes the layout; we then
1. check every tensor it wrote against our own name mapping (`names.hf_to_trtllm`), so the mapping that
   the build stage inverts is proven equal to ModelOpt's on every conversion;
2. write the rank files from that mapping: identical bytes for fp16/bf16, and full precision for a
   float32 card (ModelOpt only exports fp16/bf16 and would round a float32 model to fp16);
3. add the DMS adapter weights (adapter mode), sharded by KV head;
4. add the config fields TensorRT-LLM 1.2.1 reads that ModelOpt leaves out, and the dms_* keys
   (`pipeline.convert.config`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dms_core.config import DmsConfig
from pipeline.convert.config import dms_settings, family_of, model_shape, trtllm_fields
from pipeline.convert.names import ConversionError, check_tp_size, hf_to_trtllm

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Non-weight files a serving stack needs beside the engine (tokenizer, chat template, token ids).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "added_tokens.json",
)


def read_hf_tensors(hf_dir: Path, only: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of an HF directory's safetensors files (all, or those whose name contains `only`)."""
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{hf_dir} has no *.safetensors weights (pickle checkpoints are not read)")
    out = {}
    for file in files:
        with safe_open(file, "pt") as fh:
            for name in fh.keys():
                if only is None or only in name:
                    out[name] = fh.get_tensor(name)
    return out


def convert_checkpoint(
    hf_dir: str | Path, out_dir: str | Path, tp_size: int = 1, dtype: str = "bfloat16", log=print
) -> dict[str, Any]:
    """Write `out_dir/config.json` and `out_dir/rank{0..tp_size-1}.safetensors`; return a summary."""
    import transformers
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    from pipeline.dms.checkpoint import load_config

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not (hf_dir / "config.json").is_file():
        raise ConversionError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    hf = json.loads((hf_dir / "config.json").read_text())
    family = family_of(hf)
    dms = dms_settings(hf)
    adapter = bool(dms.get("dms_separate_alpha", False))
    shape = model_shape(hf, adapter=adapter)
    check_tp_size(shape, tp_size)
    if not DmsConfig.is_dms(hf):
        log(f"[convert] {hf_dir} has no dms_* config keys: a plain model, converted with eviction off "
            "(dms_disable_eviction=true)")
    if tp_size > 1 and dms.get("dms_alpha_per") == "layer" and not dms["dms_disable_eviction"]:
        raise ConversionError(
            "dms_alpha_per='layer' takes one decision per layer from query head 0, which only rank 0 holds "
            "with tp_size > 1; convert with tp_size 1 or retrofit with dms.alpha_per: head"
        )

    torch_dtype = DTYPES[dtype]
    # transformers' own class (never remote code); load_config also reads NVIDIA's qwen3_dms layout.
    config = load_config(hf_dir)
    model_cls = getattr(transformers, config.architectures[0])
    model = model_cls.from_pretrained(hf_dir, config=config, dtype=torch_dtype).eval()
    state = {k: v.to(torch_dtype) for k, v in model.state_dict().items()}
    if adapter:
        adapters = read_hf_tensors(hf_dir, only="dms_proj_alpha")
        if len(adapters) != 2 * shape.num_layers:
            raise ConversionError(
                f"{hf_dir}: dms_separate_alpha is true but {len(adapters)} adapter tensors were found "
                f"(expected dms_proj_alpha and dms_proj_alpha_norm for {shape.num_layers} layers)"
            )
        state |= {k: v.to(torch_dtype) for k, v in adapters.items()}

    out_dir.mkdir(parents=True, exist_ok=True)
    mo_dir = out_dir / ".modelopt"
    mo_dtype = torch_dtype if torch_dtype in (torch.float16, torch.bfloat16) else torch.float16
    decoder = "qwen" if family == "qwen3" else "llama"
    with torch.inference_mode():
        export_tensorrt_llm_checkpoint(
            model, decoder, mo_dtype, export_dir=mo_dir, inference_tensor_parallel=tp_size
        )
    del model
    checked = 0
    for rank in range(tp_size):
        ours = hf_to_trtllm(state, shape, tp_size, rank)
        checked += _check_against_modelopt(ours, mo_dir / f"rank{rank}.safetensors", mo_dtype)
        save_file(ours, out_dir / f"rank{rank}.safetensors", metadata={"format": "pt"})
    cfg = json.loads((mo_dir / "config.json").read_text())
    cfg.pop("rank", None)  # ModelOpt writes the last rank it exported; the mapping section says it all
    cfg |= trtllm_fields(hf, dtype)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    shutil.rmtree(mo_dir)
    return {
        "family": family,
        "tp_size": tp_size,
        "dtype": dtype,
        "dms_eviction": not dms["dms_disable_eviction"],
        "dms_decision": "adapter" if adapter else "borrowed",
        "modelopt_tensors_checked": checked,
    }


def _check_against_modelopt(ours: dict[str, torch.Tensor], mo_file: Path, mo_dtype: torch.dtype) -> int:
    """Every tensor ModelOpt wrote must equal ours (cast to its dtype); adapters are ours alone."""
    with safe_open(mo_file, "pt") as fh:
        mo_names = set(fh.keys())
        plain = {n for n in ours if "dms_proj_alpha" not in n}
        if mo_names != plain:
            raise ConversionError(
                f"ModelOpt's {mo_file.name} and our name mapping disagree: only ModelOpt has "
                f"{sorted(mo_names - plain)[:4]}, only ours has {sorted(plain - mo_names)[:4]}"
            )
        for name in sorted(plain):
            theirs = fh.get_tensor(name)
            mine = ours[name].to(mo_dtype)
            if theirs.shape != mine.shape or not torch.equal(theirs, mine):
                raise ConversionError(f"ModelOpt's {mo_file.name}:{name} differs from our mapping")
    return len(plain)
