"""The tests' one factory of tiny random Qwen3 / Llama models, in memory or saved as (DMS) HF checkpoints.

A saved DMS checkpoint goes through the product's own path (`patch_model`, `save_dms_model`), so the
tests read exactly what a retrofit writes. Norm weights are random by default: with the all-ones init,
RMSNorm(input_layernorm(x)) equals RMSNorm(x), so a DMS adapter fed the wrong one of the two would go
unnoticed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# The runtime tests' shape: 2 layers, hidden 64, 4 query / 2 KV heads of 16 channels, vocab 96.
RUNTIME_SHAPE = dict(
    vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, tie_word_embeddings=True,
    initializer_range=0.2,  # large: greedy decoding does not collapse onto one token
    bos_token_id=None, eos_token_id=None, pad_token_id=None,
)  # fmt: skip
LLAMA3_ROPE = {  # Llama 3's frequency-dependent RoPE scaling (a short original length: it matters)
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
}  # fmt: skip


def random_norms(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def tiny_model(family: str = "qwen3", *, seed: int = 0, norms: bool = True, llama3_rope: bool = False,
               **config: Any):
    """An HF causal LM in eval mode: `config` keys over the runtime shape."""
    import transformers

    torch.manual_seed(seed)
    cfg_cls, model_cls = {
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    }[family]
    cfg = cfg_cls(**(RUNTIME_SHAPE | config))
    if llama3_rope:
        cfg.rope_parameters = dict(LLAMA3_ROPE)
    cfg.architectures = [model_cls.__name__]
    model = model_cls(cfg).eval()
    return random_norms(model) if norms else model


def save_tiny(
    path: Path,
    family: str = "qwen3",
    dms: str | None = None,
    *,
    window: int = 8,
    block: int = 4,
    alpha_scale: float = 10.0,
    offset: float = 0.0,
    adapter_std: float = 0.1,
    seed: int = 0,
    llama3_rope: bool = False,
    **config: Any,
) -> Path:
    """Save a tiny model to `path`. dms: None (plain), "borrowed" or "adapter" (random adapter weights);
    alpha_scale 10 and offset 0 make random weights evict roughly half the tokens."""
    from dms_core.config import DmsConfig
    from pipeline.dms.checkpoint import save_dms_model
    from pipeline.dms.patch import patch_model

    model = tiny_model(family, seed=seed, llama3_rope=llama3_rope, **config)
    if dms is None:
        model.save_pretrained(path)
        return path
    patch_model(model, DmsConfig(
        window_size=window, separate_alpha=dms == "adapter", alpha_scale=alpha_scale,
        initial_alpha_offset=offset, paged_attention_block_size=block, cr=4,
    ))  # fmt: skip
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "dms_proj_alpha." in name:  # zero-initialised: make decisions depend on the input
                p.normal_(0, adapter_std)
    save_dms_model(model, path, target_cr=4.0)
    return path


def make_tiny_hf(path: Path, family: str = "qwen3", dms: str | None = None, window: int = 8, block: int = 4,
                 seed: int = 0, tie: bool = True, offset: float = 0.0, llama3_rope: bool = False,
                 vocab_size: int = 96, max_positions: int = 1024) -> Path:
    """The runtime tests' checkpoint (the runtime shape)."""
    return save_tiny(path, family, dms, window=window, block=block, offset=offset, seed=seed,
                     llama3_rope=llama3_rope, tie_word_embeddings=tie, vocab_size=vocab_size,
                     max_position_embeddings=max_positions)


def make_hf(path: Path, family: str = "qwen3", dms: str | None = "borrowed", tie: bool = False,
            kv_heads: int = 4, window: int = 8, seed: int = 0) -> Path:
    """The conversion tests' checkpoint: hidden 32, 8 query heads of 8 channels (so tp 2 and 4 split)."""
    return save_tiny(path, family, dms, window=window, adapter_std=0.5, seed=seed, tie_word_embeddings=tie,
                     vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=8,
                     num_key_value_heads=kv_heads, head_dim=8, max_position_embeddings=256, rope_theta=1e6,
                     initializer_range=0.02)
