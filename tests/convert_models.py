"""Tiny random Qwen3 / Llama HF checkpoints (plain or DMS) for the conversion tests."""

from __future__ import annotations

from pathlib import Path

import torch
from runtime_models import random_norms


def make_hf(
    path: Path,
    family: str = "qwen3",
    dms: str | None = "borrowed",
    tie: bool = False,
    kv_heads: int = 4,
    window: int = 8,
    seed: int = 0,
) -> Path:
    """Save a 2-layer model (hidden 32, 8 query heads, head_dim 8) to `path`. dms: None (plain),
    "borrowed" or "adapter" (with non-zero adapter weights so they matter)."""
    import transformers

    from dms_core.config import DmsConfig
    from pipeline.dms.checkpoint import save_dms_model
    from pipeline.dms.patch import patch_model

    torch.manual_seed(seed)
    cfg_cls, model_cls = {
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    }[family]
    cfg = cfg_cls(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=kv_heads, head_dim=8, max_position_embeddings=256, tie_word_embeddings=tie,
        rope_theta=1e6,
    )
    cfg.architectures = [model_cls.__name__]
    model = random_norms(model_cls(cfg).eval())
    if dms is None:
        model.save_pretrained(path)
        return path
    settings = DmsConfig(window_size=window, separate_alpha=dms == "adapter", alpha_scale=10.0,
                         initial_alpha_offset=0.0, paged_attention_block_size=4)
    patch_model(model, settings)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "dms_proj_alpha." in name:  # zero-initialised: make decisions depend on the input
                p.normal_(0, 0.5)
    model.config.dms_paged_attention_block_size = 4
    save_dms_model(model, path, target_cr=4.0)
    return path
