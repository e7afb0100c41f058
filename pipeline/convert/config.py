"""The TensorRT-LLM 1.2.1 config.json fields our checkpoints carry, and the way back to an HF config.

ModelOpt's export writes the common PretrainedConfig fields (architecture, dtype, sizes, mapping,
quantization, ...). What TensorRT-LLM 1.2.1's QWenConfig / LLaMAConfig and the model classes read but the
export leaves out is added here (sources: tests/fixtures/trtllm_1_2_1_names.json):

- Qwen: `qwen_type` (QWenDecoderLayer turns on q/k layernorm only for "qwen3"), `rotary_base` (from
  rope_theta; QWenConfig's default is 10000, Qwen3 uses 1e6), `rotary_scaling`, `attn_bias`
  (QWenConfig defaults to True, Qwen3 has none), `mlp_bias`, `seq_length` (read by QWenDecoderLayer),
  `use_logn_attn`, `moe_intermediate_size`, `moe_shared_expert_intermediate_size`, `tie_word_embeddings`.
- Llama: `rotary_base`, `rotary_scaling`, `attn_bias`, `mlp_bias`, `residual_mlp`, `tie_word_embeddings`.
- Both: the dms_* keys (docs/dms.md section 7, dms_core.config.DmsConfig), stored under the same names;
  PretrainedConfig keeps unknown keys as attributes, so TensorRT-LLM's loaders accept them and our model
  class reads them.
  A plain model (no dms_* keys) gets only `dms_disable_eviction: true`.
"""

from __future__ import annotations

from typing import Any

from dms_core.config import DmsConfig
from dms_core.rope import rope_scaling_of
from pipeline.convert.names import ConversionError, ModelShape

# family -> (TensorRT-LLM architecture, HF architecture)
FAMILIES = {
    "qwen3": ("QWenForCausalLM", "Qwen3ForCausalLM"),
    "llama": ("LlamaForCausalLM", "LlamaForCausalLM"),
}


def family_of(hf: dict[str, Any]) -> str:
    """qwen3 or llama, also for NVIDIA's DMS layout (model_type "qwen3_dms", Qwen3DMSForCausalLM)."""
    names = " ".join([str(hf.get("model_type", "")), *map(str, hf.get("architectures") or [])]).lower()
    for family in FAMILIES:
        if family in names:
            return family
    raise ConversionError(
        f"model_type {hf.get('model_type')!r} / architectures {hf.get('architectures')} cannot be "
        "converted: supported are Qwen3ForCausalLM and LlamaForCausalLM"
    )


def rope_of(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope theta, TensorRT-LLM rotary_scaling or None) from an HF config (transformers 4 or 5 layout)."""
    try:
        theta, scaling = rope_scaling_of(hf)
    except ValueError as exc:
        raise ConversionError(str(exc)) from None
    if scaling is None:
        return theta, None
    params = {k: v for k, v in scaling.items() if k != "rope_theta"}
    rope_type = params.get("rope_type", params.get("type"))
    # TensorRT-LLM reads rotary_scaling["type"]; HF writes "rope_type".
    return theta, {**params, "type": rope_type, "rope_type": rope_type}


def dms_settings(hf: dict[str, Any]) -> dict[str, Any]:
    """The dms_* keys of an HF config with defaults filled in. A plain model gets only
    `dms_disable_eviction: true`: no window and no borrowed channel, so every runtime runs it as the
    plain model it is (DmsConfig.is_dms keys on dms_window_size), and the config still says eviction is
    off."""
    dms = DmsConfig.from_hf_config(hf)
    return {"dms_disable_eviction": True} if dms is None else dms.to_hf_config()


def model_shape(hf: dict[str, Any], adapter: bool) -> ModelShape:
    heads = hf["num_attention_heads"]
    return ModelShape(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        intermediate_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        qk_norm=family_of(hf) == "qwen3",
        adapter=adapter,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def trtllm_fields(hf: dict[str, Any], dtype: str) -> dict[str, Any]:
    """Fields to add to (or correct in) ModelOpt's config.json for TensorRT-LLM 1.2.1."""
    family = family_of(hf)
    theta, scaling = rope_of(hf)
    out: dict[str, Any] = {
        "architecture": FAMILIES[family][0],
        "dtype": dtype,  # ModelOpt writes float16 for anything that is not fp16/bf16
        "logits_dtype": "float32",
        "rotary_base": theta,
        "rotary_scaling": scaling,
        "attn_bias": bool(hf.get("attention_bias", False)),
        "mlp_bias": bool(hf.get("mlp_bias", False)),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "max_position_embeddings": hf["max_position_embeddings"],
        "norm_epsilon": hf["rms_norm_eps"],
        "head_size": model_shape(hf, False).head_dim,
    }
    if family == "qwen3":
        out |= {
            "qwen_type": "qwen3",
            "seq_length": hf.get("seq_length", 8192),  # QWenConfig.from_hugging_face's default
            "use_logn_attn": False,
            "moe_intermediate_size": 0,
            "moe_shared_expert_intermediate_size": 0,
        }
    else:
        out["residual_mlp"] = False
    return out | dms_settings(hf)


def hf_config_from_trtllm(cfg: dict[str, Any]) -> dict[str, Any]:
    """An HF config.json (transformers 5 layout) rebuilt from a TensorRT-LLM config alone."""
    arch = cfg.get("architecture")
    if arch == "QWenForCausalLM":
        if cfg.get("qwen_type") != "qwen3":
            raise ConversionError(
                f"config.json: qwen_type is {cfg.get('qwen_type')!r}; only 'qwen3' checkpoints are supported"
            )
        family = "qwen3"
    elif arch == "LlamaForCausalLM":
        family = "llama"
    else:
        raise ConversionError(
            f"config.json: architecture {arch!r} is not QWenForCausalLM or LlamaForCausalLM; "
            "convert a Qwen3 or Llama model"
        )
    missing = [k for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size",
                           "intermediate_size", "rotary_base", "mapping") if k not in cfg]
    if missing:
        raise ConversionError(f"config.json lacks {missing}: not a checkpoint written by the convert stage")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg["rotary_base"]}
    if cfg.get("rotary_scaling"):
        scaling = {k: v for k, v in cfg["rotary_scaling"].items() if k != "type"}
        rope = {**scaling, "rope_theta": cfg["rotary_base"]}
    hf: dict[str, Any] = {
        "architectures": [FAMILIES[family][1]],
        "model_type": family,
        "vocab_size": cfg["vocab_size"],
        "hidden_size": cfg["hidden_size"],
        "intermediate_size": cfg["intermediate_size"],
        "num_hidden_layers": cfg["num_hidden_layers"],
        "num_attention_heads": cfg["num_attention_heads"],
        "num_key_value_heads": cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        "head_dim": cfg.get("head_size") or cfg["hidden_size"] // cfg["num_attention_heads"],
        "hidden_act": cfg.get("hidden_act", "silu"),
        "max_position_embeddings": cfg["max_position_embeddings"],
        "rms_norm_eps": cfg["norm_epsilon"],
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "attention_bias": bool(cfg.get("attn_bias", False)),
        "rope_parameters": rope,
        "dtype": cfg["dtype"],
    }
    if family == "llama":
        hf["mlp_bias"] = bool(cfg.get("mlp_bias", False))
    return hf | {k: cfg[k] for k in DmsConfig().to_hf_config() if k in cfg}
