"""A small gpt-fast-style Qwen3 / Llama transformer for the inference runtime.

The model knows nothing about the KV pool: the runner drives it layer by layer
(`layer.project` -> attention over the pool -> `layer.finish`), so prefill, decode and every eviction
policy share one set of weights and one code path. Weights use Hugging Face parameter names, so an HF
`model.safetensors` (or an engine directory) loads with `load_state_dict` directly.

DMS decision logits (docs/dms.md section 1) come from `dms_core.rule`: the borrowed query channel
(read after q_norm, before RoPE; the channel is then zeroed) or the adapter (`dms_proj_alpha`, on the
decoder layer's residual-stream input). RoPE is applied at LOGICAL positions, whatever slot a token ends
up in, with `dms_core.rope`'s frequencies.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dms_core import rule
from dms_core.config import DmsConfig
from dms_core.rope import rope_inv_freq as _inv_freq
from dms_core.rope import rope_scaling_of


class ModelConfigError(ValueError):
    """The HF config asks for something this runtime does not implement."""


@dataclass(frozen=True)
class ModelArgs:
    family: str  # "qwen3" | "llama"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # llama3-style scaling, or None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    dms: DmsConfig | None = None  # None: a plain checkpoint (no decision logits at all)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelArgs:
        """Map an HF config.json (Qwen3ForCausalLM / LlamaForCausalLM, optional dms_* keys)."""
        model_type = cfg.get("model_type")
        if model_type not in ("qwen3", "llama"):
            raise ModelConfigError(
                f"model_type {model_type!r} is not supported by the DMS runtime; use a Qwen3 or Llama "
                "checkpoint (config.json model_type 'qwen3' or 'llama')"
            )
        try:
            theta, scaling = rope_scaling_of(cfg)
        except ValueError as exc:
            raise ModelConfigError(str(exc)) from None
        heads = cfg["num_attention_heads"]
        if cfg.get("mlp_bias"):
            raise ModelConfigError("mlp_bias=True is not supported by the DMS runtime")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ModelConfigError(f"hidden_act {cfg.get('hidden_act')!r} is not supported (silu only)")
        return cls(
            family=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            intermediate_size=cfg["intermediate_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            dms=DmsConfig.from_hf_config(cfg),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self)


def rms_norm(x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
    """`norm`'s output without the module call (the decode step calls it 3 times a layer)."""
    if x.dtype == torch.float32:  # one fused op, bit-identical to the formula below in float32
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.eps)
    # HF's order of operations: normalise in float32, then scale in the input dtype.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)
    return norm.weight * xf.to(x.dtype)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    return _inv_freq(args.head_dim, args.rope_theta, args.rope_scaling)


def rope_tables(
    pos: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, signed sin [B, T, 1, D] for logical positions pos [B, T] (computed once per forward). The
    sin's first half is negated, so rotate-half RoPE is x * cos + roll(x, D/2) * sin."""
    freqs = pos.to(torch.float32)[..., None] * inv_freq.to(pos.device)  # [B, T, D/2]
    sin = freqs.sin()
    cos = freqs.cos()
    cos = torch.cat([cos, cos], dim=-1)[:, :, None]
    return cos.to(dtype), torch.cat([-sin, sin], dim=-1)[:, :, None].to(dtype)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate-half RoPE (HF convention: x * cos + cat(-x2, x1) * sin). x: [B, T, H, D]; rope: (cos,
    signed sin) from `rope_tables`."""
    cos, sin = rope
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        h, d = args.hidden_size, args.head_dim
        bias = args.attention_bias
        self.q_proj = nn.Linear(h, args.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(h, args.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(h, args.num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(args.num_heads * d, h, bias=False)
        if args.family == "qwen3":
            self.q_norm = RMSNorm(d, args.rms_norm_eps)
            self.k_norm = RMSNorm(d, args.rms_norm_eps)
        if args.dms is not None and args.dms.separate_alpha:
            self.dms_proj_alpha = nn.Linear(h, args.num_kv_heads, bias=False)
            self.dms_proj_alpha_norm = RMSNorm(h, args.rms_norm_eps)


class Block(nn.Module):
    """One decoder layer, split where the runner's attention goes."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.self_attn = Attention(args)
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.mlp.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.mlp.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def fuse_projections(self) -> None:
        """gpt-fast's wqkv / w13: one matmul for q, k, v and one for gate, up (done at load, after the
        weights are in place). The HF-named weights become views into the fused tensors, so names and
        memory stay as loaded. Qwen3's q_norm and k_norm weights are laid out per head too, so one
        normalisation covers every q and k head of a token."""
        a, att, m = self.args, self.self_attn, self.mlp
        with torch.no_grad():
            qkv = torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight])
            nq, nk = att.q_proj.weight.shape[0], att.k_proj.weight.shape[0]
            att.q_proj.weight = nn.Parameter(qkv[:nq], requires_grad=False)
            att.k_proj.weight = nn.Parameter(qkv[nq : nq + nk], requires_grad=False)
            att.v_proj.weight = nn.Parameter(qkv[nq + nk :], requires_grad=False)
            self._wqkv = qkv
            self._bqkv = (
                torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias]) if a.attention_bias else None
            )
            w13 = torch.cat([m.gate_proj.weight, m.up_proj.weight])
            ni = m.gate_proj.weight.shape[0]
            m.gate_proj.weight = nn.Parameter(w13[:ni], requires_grad=False)
            m.up_proj.weight = nn.Parameter(w13[ni:], requires_grad=False)
            self._w13 = w13
            if a.family == "qwen3":
                self._qk_norm = torch.cat([
                    att.q_norm.weight.expand(a.num_heads, -1), att.k_norm.weight.expand(a.num_kv_heads, -1)
                ])  # fmt: skip
            if a.dms is not None and not a.dms.separate_alpha:  # the borrowed channel, among q and k heads
                q_mask = rule.borrowed_channel_mask(a.num_heads, a.num_kv_heads, a.head_dim, a.dms.alpha_per)
                k_mask = torch.zeros(a.num_kv_heads, a.head_dim, dtype=torch.bool)
                self._qk_borrowed = torch.cat([q_mask, k_mask]).to(qkv.device)

    def project(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], decisions: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x: [B, T, hidden] residual input; rope: (cos, sin) at the tokens' logical positions;
        decisions=False: a policy that ignores them is running, the logits are not computed (None).

        Returns q [B, T, Hq, D], k, v [B, T, Hkv, D] (RoPE applied to q and k) and the DMS decision
        logits [B, Hkv, T] (None for a plain checkpoint).
        """
        a, att = self.args, self.self_attn
        b, t, _ = x.shape
        hq, hkv = a.num_heads, a.num_kv_heads
        qkv = F.linear(rms_norm(x, self.input_layernorm), self._wqkv, self._bqkv)
        qkv = qkv.view(b, t, hq + 2 * hkv, a.head_dim)
        qk, v = qkv[:, :, : hq + hkv], qkv[:, :, hq + hkv :]
        if a.family == "qwen3":  # q_norm and k_norm at once (per-head weights, one normalisation)
            qf = qk if qk.dtype == torch.float32 else qk.float()  # skip two no-op casts a layer in fp32
            qk = F.rms_norm(qf, (a.head_dim,), None, a.rms_norm_eps).to(x.dtype) * self._qk_norm
        logits, dms = None, a.dms
        if dms is not None:
            if not decisions:  # the borrowed channel is still zeroed: the model never reads it
                if not dms.separate_alpha:
                    qk = qk.masked_fill(self._qk_borrowed, 0.0)
            elif dms.separate_alpha:
                projected = att.dms_proj_alpha(att.dms_proj_alpha_norm(x))  # x: the residual stream
                scale, offset = dms.alpha_scale, dms.initial_alpha_offset
                logits = rule.adapter_logits(projected, dms.alpha_per, scale, offset)
            else:
                q = qk[:, :, :hq].transpose(1, 2)  # rule works on [B, Hq, T, D]
                scale, offset = dms.alpha_scale, dms.initial_alpha_offset
                logits = rule.borrowed_logits(q, hkv, dms.alpha_per, scale, offset)
                qk = qk.masked_fill(self._qk_borrowed, 0.0)
        qk = apply_rope(qk, rope)
        if dms is not None and not dms.separate_alpha:  # RoPE mixes channels: zero the borrowed one again
            qk = qk.masked_fill(self._qk_borrowed, 0.0)
        return qk[:, :, :hq], qk[:, :, hq:], v, logits

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """x: [B, T, hidden]; attn: [B, T, Hq, D] attention output. Returns the layer's output."""
        x = x + F.linear(attn.reshape(*attn.shape[:2], -1), self.self_attn.o_proj.weight)
        gate, up = F.linear(rms_norm(x, self.post_attention_layernorm), self._w13).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, self.mlp.down_proj.weight)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = nn.Module()  # HF names: model.embed_tokens, model.layers.N, model.norm
        self.model.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.model.layers = nn.ModuleList(Block(args) for _ in range(args.num_layers))
        self.model.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables for logical positions pos [B, T]."""
        return rope_tables(pos, self.inv_freq, self.model.embed_tokens.weight.dtype)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(tokens)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(x)).float()

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load HF-named weights; a clear error lists missing or unexpected names."""
        state = dict(state)
        if self.args.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        expected = set(self.state_dict())
        if self.args.tie_word_embeddings:
            expected.discard("lm_head.weight")
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            raise ModelConfigError(
                f"weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]} "
                "(is config.json from the same checkpoint as model.safetensors?)"
            )
        self.load_state_dict(state, strict=not self.args.tie_word_embeddings)
        if self.args.tie_word_embeddings:  # re-tie: moving modules (to_empty) may have split them
            self.lm_head.weight = self.model.embed_tokens.weight
        for layer in self.model.layers:
            layer.fuse_projections()


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention with GQA, returning the probabilities too (policies use them).

    q [B, T, Hq, D]; k, v [B, Hkv, L, D]; visible bool [B, Hkv, T, L]. Returns (out [B, T, Hq, D],
    probs [B, Hkv, T, L] summed over each GQA group's query heads).
    """
    b, t, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    qg = q.view(b, t, hkv, g, d).permute(0, 2, 3, 1, 4).float()  # [B, Hkv, G, T, D]
    scores = torch.einsum("bhgtd,bhld->bhgtl", qg, k.float()) * scale
    scores = scores.masked_fill(~visible[:, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhgtl,bhld->bhgtd", probs, v.float())
    out = out.permute(0, 3, 1, 2, 4).reshape(b, t, hq, d).to(q.dtype)
    return out, probs.sum(dim=2)
