"""TensorRT-LLM 1.2.1 model classes for DMS checkpoints, for `trtllm-build --model_cls_file
plugins/trtllm/model.py --model_cls_name DmsQWenForCausalLM` (or DmsLLaMAForCausalLM).

NEVER BUILT: TensorRT-LLM cannot be installed where this was written (plugins/README.md). The projection
math and the context phase's decisions run on CPU in tests/test_trt_model_class.py through a torch
stand-in for the few TensorRT-LLM functions they use. Imports TensorRT-LLM, dms_core and this
repository's plugins/ only, never `pipeline`.

TensorRT-LLM's own QWenForCausalLM / LLaMAForCausalLM with each decoder layer's `attention` replaced by
`DmsAttention`, which keeps the checkpoint's parameter names (`attention.qkv`, `attention.dense`,
`attention.{q,k}_layernorm`; adapter mode `attention.dms_proj_alpha{,_norm}`), so `from_checkpoint` loads
what pipeline/convert wrote. Per layer (docs/dms.md sections 1 and 2, `dms_core.rule`): q, k, v; the
decision logit per token and KV head, from the borrowed query channel or from the adapter on the decoder
layer's RESIDUAL-stream input (each layer's input_layernorm hands its input over, `_tap_residual`); the
borrowed channel zeroed before and after RoPE; RoPE at the logical positions with the checkpoint's
`rotary_base` / `rotary_scaling` (`dms_core.rope`); then the DMS plugins (plugins/dms_attention/
trt_plugin.py). Two engines are built from one checkpoint (build_engine.py sets DMS_TRTLLM_PHASE); their
I/O is plugins/trtllm/engine_io.py's, which the host driver (plugins/trtllm/driver.py) feeds:

- context: `dms::prefill` over packed chunks (chunked prefill: each chunk also reads what its streams
  already store, through the pool). Outputs per layer `dms_k_L`, `dms_v_L` [N, Hkv, D] and `dms_logit_L`
  [N, Hkv]: the host keeps each stream's survivors and writes them into the per-head pool.
- generation: `dms::pool_write` puts each stream's new K/V at the row the host chose (an evicted slot
  reused in place, or the next free one), then `dms::paged_decode` reads each stream's live slots; the
  pool is one tensor, threaded through the layers in place. Output `dms_logit_L` [S, Hkv] (the new
  token's decision, which decides the previous token's fate).

TensorRT-LLM's KV cache is not used (built with --paged_kv_cache disable --gpt_attention_plugin
disable): plugins/trtllm/pool.py sizes the per-head pool, the only KV memory.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from pathlib import Path

import numpy as np
import tensorrt as trt
import tensorrt.plugin as trtp
from tensorrt_llm._common import default_trtnet
from tensorrt_llm.functional import (
    Tensor,
    _create_tensor,
    cast,
    concat,
    constant,
    cos,
    shape,
    sin,
    slice,
    split,
    view,
)
from tensorrt_llm.layers import ColumnLinear, RmsNorm, RowLinear
from tensorrt_llm.models.llama.model import LLaMAForCausalLM
from tensorrt_llm.models.qwen.model import QWenForCausalLM
from tensorrt_llm.module import Module

# trtllm-build imports this file by path: make the repository's dms_core and plugins/ importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from dms_core import rule  # noqa: E402
from dms_core.config import DmsConfig  # noqa: E402
from dms_core.rope import rope_inv_freq, rope_scaling_of  # noqa: E402
from plugins.dms_attention.trt_plugin import register_plugins  # noqa: E402
from plugins.trtllm import engine_io  # noqa: E402

PHASE = os.environ.get("DMS_TRTLLM_PHASE", "generation")


def _plugin(op, *tensors: Tensor, **attrs) -> list[Tensor]:
    # The plugins define only an AOT implementation, which TensorRT then picks (tensorrt.plugin._lib).
    layer = default_trtnet().add_plugin(op(*[t.trt_tensor for t in tensors], **attrs))
    return [_create_tensor(layer.get_output(i), layer) for i in range(layer.num_outputs)]


class DmsAttention(Module):
    """Drop-in for TensorRT-LLM's Attention in a Qwen3 / Llama decoder layer (same weight names)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        tp = config.mapping.tp_size
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads // tp
        self.num_kv_heads = config.num_key_value_heads // tp
        self.head_dim = config.head_size
        self.group = self.num_heads // self.num_kv_heads
        self.dms = DmsConfig.read(config)
        if self.dms.alpha_per != "head":
            raise NotImplementedError("dms_alpha_per='layer' is not supported by the TensorRT-LLM class")
        self.adapter = self.dms.separate_alpha
        q_out = config.num_attention_heads * self.head_dim
        kv_out = config.num_key_value_heads * self.head_dim
        group, dtype = config.mapping.tp_group, config.dtype
        self.qkv = ColumnLinear(
            config.hidden_size,
            q_out + 2 * kv_out,
            bias=False,
            dtype=dtype,
            tp_group=group,
            tp_size=tp,
            gather_output=False,
        )
        self.dense = RowLinear(q_out, config.hidden_size, bias=False, dtype=dtype, tp_group=group, tp_size=tp)
        self.qk_norm = getattr(config, "qwen_type", None) == "qwen3"
        if self.qk_norm:
            self.q_layernorm = RmsNorm(self.head_dim, eps=config.norm_epsilon, dtype=dtype)
            self.k_layernorm = RmsNorm(self.head_dim, eps=config.norm_epsilon, dtype=dtype)
        if self.adapter:  # rows sharded by KV head in the checkpoint: each rank decides for its own heads
            self.dms_proj_alpha = ColumnLinear(
                config.hidden_size,
                config.num_key_value_heads,
                bias=False,
                dtype=dtype,
                tp_group=group,
                tp_size=tp,
                gather_output=False,
            )
            self.dms_proj_alpha_norm = RmsNorm(config.hidden_size, eps=config.norm_epsilon, dtype=dtype)
        self.scale = 1.0 / math.sqrt(self.head_dim)
        keep = np.ones((self.num_heads, self.head_dim), dtype=np.float32)
        if not self.adapter:
            mask = rule.borrowed_channel_mask(self.num_heads, self.num_kv_heads, self.head_dim, "head")
            keep[mask.numpy()] = 0.0
        self.channel_keep = keep
        theta, scaling = rope_scaling_of(
            {"rotary_base": config.rotary_base, "rotary_scaling": getattr(config, "rotary_scaling", None)}
        )
        self.inv_freq = rope_inv_freq(self.head_dim, theta, scaling).numpy()[None, :]  # [1, D/2] float32
        self.residual: dict[str, Tensor] = {}  # the decoder layer's input, handed over by its input_layernorm
        self.io: dict[str, Tensor] = {}  # this step's DMS inputs, set by the model's forward

    def _heads(self, x: Tensor, heads: int) -> Tensor:
        return view(x, concat([shape(x, 0), heads, self.head_dim]))

    def _rope_tables(self, position_ids: Tensor, dtype) -> tuple[Tensor, Tensor]:
        """cos and signed sin [N, 1, D] at positions [N], computed as the runtime does (float32 angles)."""
        n, half = shape(position_ids, 0), self.head_dim // 2
        angles = view(cast(position_ids, "float32"), concat([n, 1])) * constant(self.inv_freq)  # [N, D/2]
        c, s = cos(angles), sin(angles)
        cos_t, sin_t = (
            concat([c, c], dim=1),
            concat([s * -1.0, s], dim=1),
        )  # rotate-half: sin's first half negated
        return tuple(cast(view(t, concat([n, 1, 2 * half])), dtype) for t in (cos_t, sin_t))

    def _rotate(self, x: Tensor, cos_t: Tensor, sin_t: Tensor) -> Tensor:
        half = self.head_dim // 2
        x1, x2 = split(x, [half, half], dim=2)
        return x * cos_t + concat([x2, x1], dim=2) * sin_t

    def project(self, hidden_states: Tensor, position_ids: Tensor):
        """hidden_states [N, hidden]: input_layernorm's output. Returns q [N, Hq, D], k, v [N, Hkv, D]
        (RoPE applied) and the decision logits float32 [N, Hkv]."""
        q_w, kv_w = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = split(self.qkv(hidden_states), [q_w, kv_w, kv_w], dim=1)
        q = self._heads(q, self.num_heads)
        k, v = self._heads(k, self.num_kv_heads), self._heads(v, self.num_kv_heads)
        if self.qk_norm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        n = shape(q, 0)
        if self.adapter:  # on the residual stream, as trained (the layer's input, before input_layernorm)
            raw = self.dms_proj_alpha(self.dms_proj_alpha_norm(self.residual["input"]))
        else:  # q[:, ::G, -1] as a strided slice over heads
            picked = slice(
                q,
                starts=[0, 0, self.head_dim - 1],
                sizes=concat([n, self.num_kv_heads, 1]),
                strides=[1, self.group, 1],
            )
            raw = view(picked, concat([n, self.num_kv_heads]))
        logit = cast(rule.scaled_logit(raw, self.dms.alpha_scale, self.dms.initial_alpha_offset), "float32")
        keep = cast(constant(self.channel_keep), q.dtype)
        cos_t, sin_t = self._rope_tables(position_ids, q.dtype)
        q = (
            self._rotate(q * keep, cos_t, sin_t) * keep
        )  # RoPE mixes the zeroed channel back in: zero it again
        return q, self._rotate(k, cos_t, sin_t), v, logit

    def context_evicted(self, logit: Tensor, evictable: Tensor) -> Tensor:
        """int32 [N, Hkv]: token t is evicted by token t+1's decision (shift by one), where `evictable`
        [N] allows it (the host sets 0 on each sequence's last token, whose decision comes later, and on
        every token of a request served with eviction off)."""
        n = shape(logit, 0)
        later = concat(
            [
                slice(logit, [1, 0], concat([n - 1, self.num_kv_heads])),
                constant(np.zeros((1, self.num_kv_heads), dtype=np.float32)),
            ]
        )
        return cast(rule.evicts(later), "int32") * view(evictable, concat([n, 1]))

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        io, li = self.io, self.layer_idx
        q, k, v, logit = self.project(hidden_states, io[engine_io.POSITIONS])
        if PHASE == "context":
            evicted = self.context_evicted(logit, io[engine_io.EVICTABLE])
            (out,) = _plugin(
                trtp.op.dms.prefill,
                q,
                k,
                v,
                evicted,
                io[engine_io.CU_SEQLENS],
                io[engine_io.POSITIONS],
                io[engine_io.K_POOL],
                io[engine_io.V_POOL],
                io[engine_io.tables(li)],
                io[engine_io.lens(li)],
                io[engine_io.expiry(li)],
                scale=self.scale,
                window=self.dms.window_size,
            )
            k.mark_output(engine_io.keys(li), k.dtype)
            v.mark_output(engine_io.values(li), v.dtype)
        else:
            k_pool, v_pool = _plugin(
                trtp.op.dms.pool_write,
                io[engine_io.K_POOL],
                io[engine_io.V_POOL],
                k,
                v,
                io[engine_io.write_rows(li)],
            )
            # One pool for every layer, written in place: the next layer writes into this layer's result.
            io[engine_io.K_POOL], io[engine_io.V_POOL] = k_pool, v_pool
            (out,) = _plugin(
                trtp.op.dms.paged_decode,
                q,
                k_pool,
                v_pool,
                io[engine_io.tables(li)],
                io[engine_io.lens(li)],
                scale=self.scale,
                num_kv_heads=self.num_kv_heads,
            )
        logit.mark_output(engine_io.logits(li), trt.float32)
        return self.dense(view(out, concat([shape(out, 0), self.num_heads * self.head_dim])))


@functools.cache
def _tapped(norm_class: type) -> type:
    """`norm_class` whose forward first hands its input to the attention of its layer (same weights and
    names: only the instance's class changes)."""

    class Tapped(norm_class):
        def forward(self, hidden_states, *args, **kwargs):
            self.dms_residual["input"] = hidden_states
            return super().forward(hidden_states, *args, **kwargs)

    Tapped.__name__ = Tapped.__qualname__ = norm_class.__name__
    return Tapped


def _tap_residual(layer) -> None:
    """Make `layer.input_layernorm` hand the decoder layer's residual-stream input to its DmsAttention
    (TensorRT-LLM's decoder layer passes the attention only the normalised hidden states)."""
    norm = layer.input_layernorm
    norm.__class__ = _tapped(type(norm))
    norm.dms_residual = layer.attention.residual


class _DmsMixin:
    """Swap in DmsAttention; add the DMS inputs to prepare_inputs and route them in forward."""

    def _swap_attention(self) -> None:
        for idx, layer in enumerate(self.transformer.layers):
            layer.attention = DmsAttention(self.config, getattr(layer, "layer_idx", idx))
            _tap_residual(layer)

    def prepare_inputs(self, *args, **kwargs):
        inputs = super().prepare_inputs(*args, **kwargs)
        c = self.config
        tp = c.mapping.tp_size
        shapes = engine_io.Shapes.from_env(
            os.environ,
            num_layers=c.num_hidden_layers,
            kv_heads=c.num_key_value_heads // tp,
            head_dim=c.head_size,
            max_batch=int(kwargs.get("max_batch_size", 1)),
            max_tokens=int(kwargs.get("max_num_tokens") or 8192),
        )
        dtype = trt.bfloat16 if c.dtype == "bfloat16" else trt.float16
        trt_types = {"int32": trt.int32, "pool": dtype}
        for name, (kind, dims) in engine_io.inputs(PHASE, shapes).items():
            inputs[name] = Tensor(name, trt_types[kind], [-1] * len(dims), dims)
        return inputs

    def forward(self, *args, **kwargs):
        io = {name: kwargs.pop(name) for name in list(kwargs) if name.startswith(engine_io.PREFIX)}
        for layer in self.transformer.layers:
            layer.attention.io = io
        kwargs["use_cache"] = False  # no TensorRT-LLM KV cache: the DMS pool is the engine's I/O
        return super().forward(*args, **kwargs)


class DmsQWenForCausalLM(_DmsMixin, QWenForCausalLM):
    """Qwen3 with DMS attention (config.json from pipeline/convert: qwen_type qwen3 and dms_* keys)."""

    def __init__(self, config):
        register_plugins()
        super().__init__(config)
        self._swap_attention()


class DmsLLaMAForCausalLM(_DmsMixin, LLaMAForCausalLM):
    """Llama with DMS attention."""

    def __init__(self, config):
        register_plugins()
        super().__init__(config)
        self._swap_attention()
