"""Tiny random Qwen3 / Llama HF checkpoints (plain or DMS) for the runtime tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def random_norms(model):
    """Non-uniform RMSNorm weights: with the all-ones init, RMSNorm(input_layernorm(x)) equals
    RMSNorm(x), so a DMS adapter fed the wrong one of the two would go unnoticed."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def make_tiny_hf(
    path: Path,
    family: str = "qwen3",
    dms: str | None = None,
    window: int = 8,
    block: int = 4,
    seed: int = 0,
    tie: bool = True,
    offset: float = 0.0,
    llama3_rope: bool = False,
    vocab_size: int = 96,
    max_positions: int = 1024,
) -> Path:
    """Save a 2-layer model (hidden 64, 4 query / 2 KV heads, head_dim 16, vocab 96) to `path`.

    Weights use a large init (std 0.2) so greedy decoding does not collapse onto one token.
    dms: None (plain), "borrowed" or "adapter" (random adapter weights); the decision logits use
    alpha_scale 10 and `offset`, so random weights evict roughly half the tokens.
    """
    import transformers

    torch.manual_seed(seed)
    cfg_cls, model_cls = {
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    }[family]
    cfg = cfg_cls(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie,
        initializer_range=0.2,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    if llama3_rope:  # Llama 3's frequency-dependent RoPE scaling (short original length: it matters)
        cfg.rope_parameters = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }
    cfg.architectures = [model_cls.__name__]
    model = random_norms(model_cls(cfg).eval())
    model.save_pretrained(path)
    if dms is None:
        return path
    config = json.loads((path / "config.json").read_text())
    config.update(
        dms_window_size=window,
        dms_paged_attention_block_size=block,
        dms_alpha_scale=10.0,
        dms_initial_alpha_offset=offset,
        dms_separate_alpha=dms == "adapter",
        dms_alpha_per="head",
        dms_disable_eviction=False,
        dms_cr=4,
        dms_tau=0.1,
    )
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if dms == "adapter":
        from safetensors.torch import load_file, save_file

        state = load_file(str(path / "model.safetensors"))
        for i in range(cfg.num_hidden_layers):
            state[f"model.layers.{i}.self_attn.dms_proj_alpha.weight"] = torch.randn(2, 64) * 0.1
            state[f"model.layers.{i}.self_attn.dms_proj_alpha_norm.weight"] = torch.ones(64)
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path
