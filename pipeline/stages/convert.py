"""convert: the retrofit's product (the target-CR HF DMS checkpoint) -> a TensorRT-LLM 1.2.1 checkpoint.

Writes `<out>/trtllm_ckpt/` (config.json + rank{N}.safetensors, see pipeline/convert) and
`<out>/tokenizer/` (the tokenizer files, which a TensorRT-LLM checkpoint does not carry), then proves
the conversion: the torch engine built from `trtllm_ckpt` (ranks merged back) must give the HF DMS
model's logits (`roundtrip_max_abs_diff`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pipeline.card import Card, card_section
from pipeline.stages.api import Options, StageContext, cr_label

NAME = "convert"
DEPENDS: tuple[str, ...] = ("retrofit",)
VERSION = 1
CKPT_DIR = "trtllm_ckpt"
TOKENIZER_DIR = "tokenizer"


def settings(card: Card, options: Options) -> dict[str, Any]:
    out = card_section(card, "family", "dms")
    out["build"] = {k: getattr(card.build, k) for k in ("tp_size", "dtype", "kv_block_size")}
    return out


# float32 end to end, so only summation order differs (1e-5 on the tiny model); a wrong weight, mask or
# decision shows up as 1e-1 and more. Half-precision checkpoints are compared and reported, not gated.
ROUNDTRIP_TOLERANCE = 1e-3


def product_dir(ctx: StageContext) -> Path:
    """The retrofit checkpoint at the card's target CR."""
    checkpoints = ctx.reports.get("retrofit", {}).get("checkpoints") or {}
    label = cr_label(ctx.card.dms.target_cr)
    if label not in checkpoints:
        raise RuntimeError(
            f"retrofit reported no checkpoint for the target CR {label} (it has {sorted(checkpoints)}); "
            f"add {ctx.card.dms.target_cr} to retrofit.checkpoint_crs in {ctx.card.path}"
        )
    return ctx.inputs["retrofit"] / checkpoints[label]


def run(ctx: StageContext) -> dict[str, Any]:
    from pipeline.convert.export import TOKENIZER_FILES, convert_checkpoint
    from pipeline.convert.roundtrip import roundtrip_max_abs_diff

    card = ctx.card
    hf_dir = product_dir(ctx)
    ckpt = ctx.out_dir / CKPT_DIR
    summary = convert_checkpoint(hf_dir, ckpt, tp_size=card.build.tp_size, dtype=card.build.dtype)
    tok = ctx.out_dir / TOKENIZER_DIR
    tok.mkdir()
    for name in TOKENIZER_FILES:
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, tok / name)
    # Long enough that keys leave the window and evictions take effect (prefill half, decode half).
    num_tokens = min(card.dms.window + 2 * card.build.kv_block_size, 2 * card.build.max_input_len)
    diff = roundtrip_max_abs_diff(hf_dir, ckpt, num_tokens, card.build.kv_block_size)
    print(f"[convert] engine(converted checkpoint) vs HF DMS model: max |logit diff| {diff:.3g}")
    if summary["dtype"] == "float32" and diff > ROUNDTRIP_TOLERANCE:
        raise RuntimeError(
            f"convert: the engine built from the converted checkpoint disagrees with the HF model "
            f"(max |logit diff| {diff:.3g} > {ROUNDTRIP_TOLERANCE:g} in float32): a conversion or engine "
            "bug, not a setting; DMS_DEBUG=1 and tests/test_convert.py narrow it down"
        )
    return {
        "checkpoint_dir": CKPT_DIR,  # relative to this stage's directory
        "tokenizer_dir": TOKENIZER_DIR,
        "tp_size": summary["tp_size"],
        "dtype": summary["dtype"],
        "dms_eviction": summary["dms_eviction"],
        "dms_decision": summary["dms_decision"],
        "modelopt_tensors_checked": summary["modelopt_tensors_checked"],
        "roundtrip_max_abs_diff": diff,
        "roundtrip_tokens": num_tokens,
    }
