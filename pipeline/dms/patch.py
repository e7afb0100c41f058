"""Turn a Hugging Face Qwen3 / Llama causal LM into a DMS model in place (docs/dms.md sections 1-3).

No copy of transformers' modeling files: each attention module keeps its own projections and norms and
gets a new `forward` (our function, bound to the instance) that computes the decision logits, applies
the shift by one and runs the soft-mask attention. Anything with the same layout (q/k/v/o_proj, optional
q_norm/k_norm, rotary `position_embeddings` from the decoder layer) can be patched.

    settings = DmsConfig.from_hf_config(config)     # or card.dms_config()
    patch_model(model, settings)                     # adds adapters in adapter mode, rebinds forwards
    with dms_mode(model, "train", generator=g) as rec:   # noisy decisions; rec.hard has the decisions
        logits = model(input_ids).logits
    with dms_mode(model, "teacher"):                 # the base model: no eviction, no channel zeroing
        ...
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from dms_core import rule
from dms_core.config import DmsConfig
from pipeline.dms.attention import flex_attention_dms, hard_attention, reference_attention

# The HF architectures whose attention layout we know (config.architectures[0]).
SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "LlamaForCausalLM")

class UnsupportedModelError(ValueError):
    """The model's architecture or attention layout is not one we can patch."""


@dataclass
class DmsRecorder:
    """What one forward pass produced, per layer in order: hard decisions [B, Hkv, T] (straight-through
    in "train" mode, 0/1 otherwise; already shifted by one, last position 0) and the raw decision
    logits [B, Hkv, T] before noise and shift (detached; not recorded in "teacher" mode)."""

    hard: list[torch.Tensor] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)

    def stacked(self) -> torch.Tensor:
        """[L, B, Hkv, T]."""
        return torch.stack(self.hard)


@dataclass
class _Runtime:
    """Per-forward switches shared by every patched attention module of one model."""

    mode: Literal["train", "hard", "teacher"] = "hard"
    generator: torch.Generator | None = None
    recorder: DmsRecorder | None = None
    use_flex: bool = False
    logit_clip: float | None = None  # train mode: see rule.gumbel_sigmoid


def check_architecture(config: Any) -> str:
    """The architecture name, or a clear error when we cannot patch it."""
    archs = list(getattr(config, "architectures", None) or [])
    arch = archs[0] if archs else type(config).__name__.replace("Config", "ForCausalLM")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"cannot retrofit DMS onto architecture '{arch}': supported are "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (and models with the same attention layout); "
            "pick a card whose model is one of these"
        )
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    if heads % kv:
        raise UnsupportedModelError(
            f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"
        )
    return arch


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    mods = [m for name, m in model.named_modules() if name.endswith("self_attn")]
    for m in mods:
        for needed in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim"):
            if not hasattr(m, needed):
                raise UnsupportedModelError(f"attention module {type(m).__name__} has no '{needed}'")
    if not mods:
        raise UnsupportedModelError(f"{type(model).__name__} has no `self_attn` modules to patch")
    return mods


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Qwen3 and Llama share this rotary form; cos/sin: [B, T, D].
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def _dms_attention_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    past_key_values: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The patched attention forward. hidden_states [B, T, hidden] -> ([B, T, hidden], None)."""
    s: DmsConfig = self.dms_settings
    rt: _Runtime = self.dms_runtime
    b, t, _ = hidden_states.shape
    shape = (b, t, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(shape)
    k = self.k_proj(hidden_states).view(shape)
    v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
    if getattr(self, "q_norm", None) is not None:
        q, k = self.q_norm(q), self.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, D]
    hkv = k.shape[1]
    teacher = rt.mode == "teacher"
    # The adapter reads the decoder layer's residual-stream input (before input_layernorm), as NVIDIA's
    # code and our engine do; HF hands attention only the normed states, so a pre-hook on the layer left
    # the residual here (`_stash_residual`). Taken in every mode, so no forward keeps it alive.
    residual = self.__dict__.pop("_dms_residual", None)

    logit = None
    if not teacher:
        if s.separate_alpha:
            if residual is None or residual.shape != hidden_states.shape:
                raise RuntimeError("DMS adapter: the decoder layer's residual input was not captured")
            projected = self.dms_proj_alpha(self.dms_proj_alpha_norm(residual))  # [B, T, Hkv]
            logit = rule.adapter_logits(projected, s.alpha_per, s.alpha_scale, s.initial_alpha_offset)
        else:
            logit = rule.borrowed_logits(q, hkv, s.alpha_per, s.alpha_scale, s.initial_alpha_offset)
            q = rule.zero_borrowed_channel(q, hkv, s.alpha_per)
    cos, sin = position_embeddings
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    if logit is not None and not s.separate_alpha:
        q = rule.zero_borrowed_channel(q, hkv, s.alpha_per)  # RoPE mixes channel -1 back in

    if past_key_values is not None:
        k, v = past_key_values.update(k, v, self.layer_idx)
        if k.shape[2] != t and logit is not None and not s.disable_eviction:
            raise NotImplementedError(
                "the patched HF model evicts only within one forward pass; decode with a KV cache through "
                "pipeline.runtime (or load with dms_disable_eviction=True)"
            )

    if logit is not None and rt.recorder is not None:
        rt.recorder.logits.append(logit.detach())
    key_logit = None
    if logit is not None and not s.disable_eviction:
        if rt.mode == "train":
            noisy, hard = rule.gumbel_sigmoid(
                logit.float(), s.tau, generator=rt.generator, clip=rt.logit_clip
            )
        else:
            noisy = logit.float()
            hard = rule.evicts(noisy).float()
        # Shift by one: the decision at t decides key t-1; the last key has no decision and is kept.
        key_logit = rule.shift_by_one(noisy, rule.KEEP_LOGIT)
        if rt.recorder is not None:
            rt.recorder.hard.append(rule.shift_by_one(hard, 0.0))
    elif rt.recorder is not None:
        rt.recorder.hard.append(torch.zeros(b, hkv, t, device=q.device))

    if k.shape[2] != t:  # cached decode with eviction off: plain attention over the cache
        out = reference_attention_offset(q, k, v, self.scaling)
    elif rt.mode == "hard" and key_logit is not None:
        out = hard_attention(q, k, v, rule.evicts(key_logit), s.window_size, self.scaling)
    elif rt.use_flex:
        out = flex_attention_dms(q, k, v, key_logit, s.window_size, self.scaling)
    else:
        out = reference_attention(q, k, v, key_logit, s.window_size, self.scaling)
    out = out.transpose(1, 2).reshape(b, t, -1)
    return self.o_proj(out), None


def reference_attention_offset(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Causal attention of T new queries over Tk >= T keys (the last T are the new ones)."""
    t, tk = q.shape[2], k.shape[2]
    qpos = torch.arange(tk - t, tk, device=q.device)
    mask = rule.causal(qpos, torch.arange(tk, device=q.device))
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True
    )


def _stash_residual(layer: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a decoder layer: hand its residual-stream input to the adapter."""
    layer.self_attn._dms_residual = args[0] if args else kwargs["hidden_states"]


def patch_model(model: nn.Module, settings: DmsConfig | None = None) -> nn.Module:
    """Make `model` a DMS model in place and write the dms_* keys into its config. Adapter mode adds
    `self_attn.dms_proj_alpha` (Linear hidden -> Hkv, no bias, zero-initialised) and
    `self_attn.dms_proj_alpha_norm` (RMSNorm over hidden) unless they already exist."""
    config = model.config
    check_architecture(config)
    settings = settings or DmsConfig.read(config)
    runtime = _Runtime()
    hidden = config.hidden_size
    eps = getattr(config, "rms_norm_eps", 1e-6)
    for attn in _attention_modules(model):
        if settings.separate_alpha and not hasattr(attn, "dms_proj_alpha"):
            ref = attn.q_proj.weight
            attn.dms_proj_alpha = nn.Linear(
                hidden, config.num_key_value_heads, bias=False, device=ref.device, dtype=ref.dtype
            )
            nn.init.zeros_(attn.dms_proj_alpha.weight)
            attn.dms_proj_alpha_norm = nn.RMSNorm(hidden, eps=eps, device=ref.device, dtype=ref.dtype)
        attn.dms_settings = settings
        attn.dms_runtime = runtime
        attn.forward = types.MethodType(_dms_attention_forward, attn)
    if settings.separate_alpha:
        for layer in model.modules():
            if isinstance(getattr(layer, "self_attn", None), nn.Module) and not hasattr(layer, "_dms_stash"):
                layer._dms_stash = layer.register_forward_pre_hook(_stash_residual, with_kwargs=True)
    model.dms_runtime = runtime
    model.dms_settings = settings
    for key, value in settings.to_hf_config().items():
        setattr(config, key, value)
    return model


@contextlib.contextmanager
def dms_mode(
    model: nn.Module,
    mode: Literal["train", "hard", "teacher"],
    generator: torch.Generator | None = None,
    use_flex: bool = False,
    logit_clip: float | None = None,
) -> Iterator[DmsRecorder]:
    """Run the patched model's forwards in one mode; restores the previous mode on exit.

    train: Gumbel-sigmoid noise (on logits clipped to +-logit_clip when given), soft mask,
    straight-through hard decisions recorded;
    hard: inference decisions (logit > 0), evicted keys beyond the window masked out;
    teacher: the base model (no eviction, borrowed channel NOT zeroed, adapters unused).
    """
    rt: _Runtime = model.dms_runtime
    saved = (rt.mode, rt.generator, rt.recorder, rt.use_flex, rt.logit_clip)
    recorder = DmsRecorder()
    rt.mode, rt.generator, rt.recorder, rt.use_flex, rt.logit_clip = (
        mode, generator, recorder, use_flex, logit_clip
    )
    try:
        yield recorder
    finally:
        rt.mode, rt.generator, rt.recorder, rt.use_flex, rt.logit_clip = saved


def warm_start_borrowed(model: nn.Module) -> int:
    """Make every borrowed decision logit start at exactly -initial_alpha_offset ("keep"), as the paper's
    DMC-style neuron zeroing does before the CR ramp: the q_proj rows (and bias entries) that compute
    the borrowed channel are set to zero. Returns how many rows were zeroed.

    Without it the first training step already evicts whatever the channel's pretrained values decide
    (SmolLM2-135M: ~45% of tokens, KL ~2 to the teacher). On Llama the student is otherwise unchanged:
    the channel is zeroed before QK^T anyway. On Qwen3, q_norm comes after q_proj, so a zero row still
    gives a zero normed channel (the logit is exact), but the RMS of that head's other channels no
    longer counts it, which rescales them slightly (measured in tests/test_dms_patch.py).
    Works on FSDP2-sharded (DTensor) parameters: every process calls it; each zeroes its own rows.
    """
    s: DmsConfig = model.dms_settings
    if s.separate_alpha:
        raise ValueError("warm_start_borrowed: this model uses adapter decisions (they start at -offset)")
    hkv = model.config.num_key_value_heads
    zeroed = 0
    with torch.no_grad():
        for attn in _attention_modules(model):
            hq = attn.q_proj.out_features // attn.head_dim
            heads = [0] if s.alpha_per == "layer" else range(0, hq, hq // hkv)
            rows = [h * attn.head_dim + attn.head_dim - 1 for h in heads]
            for param in (attn.q_proj.weight, attn.q_proj.bias):
                if param is not None:
                    _zero_rows_(param, rows)
            zeroed += len(rows)
    return zeroed


def _zero_rows_(param: torch.Tensor, rows: list[int]) -> None:
    """param[rows] = 0 in place, for a plain tensor or a DTensor sharded over rows (FSDP2)."""
    keep = torch.ones(param.shape[0], *([1] * (param.dim() - 1)), dtype=param.dtype)
    keep[rows] = 0
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        keep = distribute_tensor(keep.to(param.to_local().device), param.device_mesh, param.placements)
    else:
        keep = keep.to(param.device)
    param.mul_(keep)


def dms_parameter_names(model: nn.Module) -> list[str]:
    """Parameters that DMS training updates: the adapters (adapter mode) or the attention layers'
    weights (borrowed mode: the decision neuron lives in q_proj, and the layer learns to do without it)."""
    if model.dms_settings.separate_alpha:
        return [n for n, _ in model.named_parameters() if ".dms_proj_alpha" in n]
    return [n for n, _ in model.named_parameters() if ".self_attn." in n]
