"""HF <-> TensorRT-LLM 1.2.1 weight names, and tensor-parallel sharding and merging (pure tensor code).

TensorRT-LLM's Qwen and Llama checkpoints share one layout (tests/fixtures/trtllm_1_2_1_names.json says
where each name comes from in TensorRT-LLM's sources):

    transformer.vocab_embedding.weight            <- model.embed_tokens.weight     rows split
    transformer.layers.N.input_layernorm.weight   <- input_layernorm.weight        replicated
    transformer.layers.N.attention.qkv.weight     <- cat(q_proj, k_proj, v_proj)   rank r: cat(q_r, k_r, v_r)
    transformer.layers.N.attention.dense.weight   <- self_attn.o_proj.weight       columns split
    transformer.layers.N.attention.{q,k}_layernorm.weight <- self_attn.{q,k}_norm  replicated (Qwen3 only)
    transformer.layers.N.post_layernorm.weight    <- post_attention_layernorm      replicated
    transformer.layers.N.mlp.fc.weight            <- mlp.gate_proj.weight          rows split
    transformer.layers.N.mlp.gate.weight          <- mlp.up_proj.weight            rows split
    transformer.layers.N.mlp.proj.weight          <- mlp.down_proj.weight          columns split
    transformer.ln_f.weight                       <- model.norm.weight             replicated
    lm_head.weight                                <- lm_head.weight (or the tied embedding)  rows split

DMS adds, in adapter mode only, `attention.dms_proj_alpha.weight` [Hkv, hidden] (rows split by KV head,
so each rank computes the decisions of exactly its own KV heads) and `attention.dms_proj_alpha_norm.weight`
(replicated). Borrowed-neuron models need nothing: the neuron is a row of q_proj, and because q heads are
split in whole GQA groups (tp_size divides num_kv_heads) the first q head of each group stays on the rank
that holds the group's KV head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_TP_SIZES = (1, 2, 4, 8)


class ConversionError(ValueError):
    """A checkpoint cannot be converted or read back; the message names the problem and the fix."""


@dataclass(frozen=True)
class ModelShape:
    """What the name mapping needs to know about a decoder-only Qwen3 / Llama model."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    qk_norm: bool  # Qwen3's q_norm / k_norm
    adapter: bool  # DMS adapter weights (dms_separate_alpha)
    tie_word_embeddings: bool = False


# (HF suffix under model.layers.N., TRT-LLM suffix under transformer.layers.N., split dim or None)
_LAYER_RULES: tuple[tuple[str, str, int | None], ...] = (
    ("self_attn.o_proj.weight", "attention.dense.weight", 1),
    ("mlp.gate_proj.weight", "mlp.fc.weight", 0),
    ("mlp.up_proj.weight", "mlp.gate.weight", 0),
    ("mlp.down_proj.weight", "mlp.proj.weight", 1),
    ("input_layernorm.weight", "input_layernorm.weight", None),
    ("post_attention_layernorm.weight", "post_layernorm.weight", None),
)
_QK_NORM_RULES = (
    ("self_attn.q_norm.weight", "attention.q_layernorm.weight", None),
    ("self_attn.k_norm.weight", "attention.k_layernorm.weight", None),
)
_ADAPTER_RULES = (
    ("self_attn.dms_proj_alpha.weight", "attention.dms_proj_alpha.weight", 0),
    ("self_attn.dms_proj_alpha_norm.weight", "attention.dms_proj_alpha_norm.weight", None),
)
_QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")


def layer_rules(shape: ModelShape) -> tuple[tuple[str, str, int | None], ...]:
    rules = _LAYER_RULES
    if shape.qk_norm:
        rules += _QK_NORM_RULES
    if shape.adapter:
        rules += _ADAPTER_RULES
    return rules


def check_tp_size(shape: ModelShape, tp_size: int) -> None:
    """Raise unless `tp_size` shards this model into whole heads and whole GQA groups."""
    if tp_size not in SUPPORTED_TP_SIZES:
        raise ConversionError(
            f"tp_size {tp_size} is not supported: use one of {', '.join(map(str, SUPPORTED_TP_SIZES))} "
            "(build.tp_size in the card)"
        )
    if shape.num_kv_heads % tp_size or shape.num_heads % tp_size:
        raise ConversionError(
            f"tp_size {tp_size} does not divide num_key_value_heads ({shape.num_kv_heads}) and "
            f"num_attention_heads ({shape.num_heads}): each rank must hold whole KV heads so that its "
            f"heads keep their own DMS decisions; pick a tp_size that divides {shape.num_kv_heads}"
        )
    if shape.intermediate_size % tp_size:
        raise ConversionError(
            f"tp_size {tp_size} does not divide intermediate_size {shape.intermediate_size}"
        )


def padded_vocab(vocab_size: int, tp_size: int) -> int:
    """TensorRT-LLM's pad_vocab_size: the vocabulary rounded up to a multiple of tp_size."""
    return -(-vocab_size // tp_size) * tp_size


def _split(t: torch.Tensor, dim: int | None, tp_size: int, rank: int) -> torch.Tensor:
    if dim is None:
        return t
    return t.chunk(tp_size, dim=dim)[rank].contiguous()


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def hf_to_trtllm(
    state: dict[str, torch.Tensor], shape: ModelShape, tp_size: int, rank: int
) -> dict[str, torch.Tensor]:
    """The TensorRT-LLM tensors of one rank from an HF state dict (HF parameter names)."""
    check_tp_size(shape, tp_size)
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise ConversionError(f"the HF checkpoint has no tensor '{name}' (is it a Qwen3/Llama model?)")
        used.add(name)
        return state[name]

    out: dict[str, torch.Tensor] = {}
    vocab_rows = padded_vocab(shape.vocab_size, tp_size)
    embed = take("model.embed_tokens.weight")
    out["transformer.vocab_embedding.weight"] = _split(_pad_rows(embed, vocab_rows), 0, tp_size, rank)
    lm_head = state.get("lm_head.weight", embed) if not shape.tie_word_embeddings else embed
    used.add("lm_head.weight")
    # A tied head is its own tensor in TensorRT-LLM's checkpoint (safetensors refuses shared storage).
    out["lm_head.weight"] = _split(_pad_rows(lm_head, vocab_rows), 0, tp_size, rank).clone()
    out["transformer.ln_f.weight"] = take("model.norm.weight")
    for layer in range(shape.num_layers):
        hf, trt = f"model.layers.{layer}.", f"transformer.layers.{layer}."
        q, k, v = (_split(take(hf + n), 0, tp_size, rank) for n in _QKV)
        out[trt + "attention.qkv.weight"] = torch.cat([q, k, v]).contiguous()
        for hf_name, trt_name, dim in layer_rules(shape):
            out[trt + trt_name] = _split(take(hf + hf_name), dim, tp_size, rank)
    unmapped = sorted(set(state) - used)
    if unmapped:
        raise ConversionError(
            f"the HF checkpoint has tensors with no TensorRT-LLM name: {unmapped[:5]} "
            f"({len(unmapped)} in all); biases and other extras are not supported by this converter"
        )
    return out


def trtllm_names(shape: ModelShape) -> list[str]:
    """Every tensor name a rank file of this model carries."""
    names = ["transformer.vocab_embedding.weight", "lm_head.weight", "transformer.ln_f.weight"]
    for layer in range(shape.num_layers):
        trt = f"transformer.layers.{layer}."
        names.append(trt + "attention.qkv.weight")
        names += [trt + trt_name for _, trt_name, _ in layer_rules(shape)]
    return sorted(names)


def trtllm_to_hf(ranks: list[dict[str, torch.Tensor]], shape: ModelShape) -> dict[str, torch.Tensor]:
    """Merge rank tensors back into one HF state dict (inverse of `hf_to_trtllm` over all ranks)."""
    tp_size = len(ranks)
    check_tp_size(shape, tp_size)
    expected = set(trtllm_names(shape))
    for rank, tensors in enumerate(ranks):
        missing, extra = expected - set(tensors), set(tensors) - expected
        if missing or extra:
            raise ConversionError(
                f"rank{rank}.safetensors does not match the config: missing {sorted(missing)[:4]}, "
                f"unexpected {sorted(extra)[:4]}; re-run the convert stage"
            )

    def merged(name: str, dim: int | None) -> torch.Tensor:
        if dim is None:
            return ranks[0][name]
        return torch.cat([r[name] for r in ranks], dim=dim)

    out: dict[str, torch.Tensor] = {}
    out["model.embed_tokens.weight"] = merged("transformer.vocab_embedding.weight", 0)[: shape.vocab_size]
    if not shape.tie_word_embeddings:
        out["lm_head.weight"] = merged("lm_head.weight", 0)[: shape.vocab_size]
    out["model.norm.weight"] = ranks[0]["transformer.ln_f.weight"]
    q_rows = shape.num_heads * shape.head_dim // tp_size
    kv_rows = shape.num_kv_heads * shape.head_dim // tp_size
    for layer in range(shape.num_layers):
        hf, trt = f"model.layers.{layer}.", f"transformer.layers.{layer}."
        parts = [r[trt + "attention.qkv.weight"].split([q_rows, kv_rows, kv_rows]) for r in ranks]
        for i, name in enumerate(_QKV):
            out[hf + name] = torch.cat([p[i] for p in parts])
        for hf_name, trt_name, dim in layer_rules(shape):
            out[hf + hf_name] = merged(trt + trt_name, dim)
    return out
