"""TensorRT-LLM 1.2.1 model classes for DMS checkpoints, for `trtllm-build --model_cls_file
plugins/trtllm/model.py --model_cls_name DmsQWenForCausalLM` (or DmsLLaMAForCausalLM).

NEVER BUILT OR RUN: TensorRT-LLM cannot be installed where this was written (plugins/README.md says what
that leaves unproven). Imports TensorRT-LLM and this repository's plugins/ only, never `pipeline`.

TensorRT-LLM's own QWenForCausalLM / LLaMAForCausalLM with each decoder layer's `attention` replaced by
`DmsAttention`, which keeps the checkpoint's parameter names (`attention.qkv`, `attention.dense`,
`attention.{q,k}_layernorm`; adapter mode `attention.dms_proj_alpha{,_norm}`), so `from_checkpoint` loads
what pipeline/convert wrote. Per layer: q, k, v; the decision logit per token and KV head (borrowed
channel or adapter, docs/dms.md section 1); the borrowed channel zeroed before and after RoPE; RoPE at the
logical positions; then the DMS plugins (plugins/dms_attention/trt_plugin.py). Two engines are built from
one checkpoint (build_engine.py sets DMS_TRTLLM_PHASE):

- context: `dms::prefill` over the packed prompt tokens. Extra inputs `dms_position_ids` [N],
  `dms_cu_seqlens` [B+1], `dms_last_token` [N] (1 on each sequence's last token, which has no decision
  yet). Outputs per layer `dms_k_L`, `dms_v_L` [N, Hkv, D] and `dms_logit_L` [N, Hkv]: the host keeps each
  stream's survivors (in the window, or not evicted) and writes them into the per-head pool.
- generation: `dms::pool_write` puts each stream's new K/V at the row the host chose (an evicted slot
  reused in place, or the next free one; the host knows it before the step), then `dms::paged_decode`
  reads each stream's live slots. Extra inputs per layer `dms_k_pool_L`, `dms_v_pool_L`
  [num_blocks, block_size, D], `dms_block_tables_L` [S*Hkv, max_blocks], `dms_stream_lens_L` [S*Hkv]
  (counting the new token), `dms_write_rows_L` [S*Hkv]; output `dms_logit_L` [S, Hkv] (the new token's
  decision, which decides the previous token's fate).

TensorRT-LLM's KV cache is not used (built with --paged_kv_cache disable --gpt_attention_plugin
disable): plugins/trtllm/pool.py sizes the per-head pool, the only KV memory.
"""

from __future__ import annotations

import math
import os
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import tensorrt as trt
import tensorrt.plugin as trtp
from tensorrt_llm._common import default_trtnet
from tensorrt_llm.functional import (
    PositionEmbeddingType,
    RopeEmbeddingUtils,
    Tensor,
    _create_tensor,
    cast,
    concat,
    constant,
    embedding,
    shape,
    slice,
    split,
    view,
)
from tensorrt_llm.layers import ColumnLinear, RmsNorm, RowLinear
from tensorrt_llm.models.llama.model import LLaMAForCausalLM
from tensorrt_llm.models.qwen.model import QWenForCausalLM
from tensorrt_llm.module import Module

# trtllm-build imports this file by path: make the repository's plugins/ package importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from plugins.dms_attention.trt_plugin import register_plugins  # noqa: E402

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
        self.window = int(config.dms_window_size)
        self.alpha_scale = float(config.dms_alpha_scale)
        self.alpha_offset = float(config.dms_initial_alpha_offset)
        self.adapter = bool(config.dms_separate_alpha)
        self.eviction = not bool(config.dms_disable_eviction)
        if config.dms_alpha_per != "head":
            raise NotImplementedError("dms_alpha_per='layer' is not supported by the TensorRT-LLM class")
        q_out = config.num_attention_heads * self.head_dim
        kv_out = config.num_key_value_heads * self.head_dim
        group, dtype = config.mapping.tp_group, config.dtype
        self.qkv = ColumnLinear(config.hidden_size, q_out + 2 * kv_out, bias=False, dtype=dtype,
                                tp_group=group, tp_size=tp, gather_output=False)
        self.dense = RowLinear(q_out, config.hidden_size, bias=False, dtype=dtype, tp_group=group, tp_size=tp)
        self.qk_norm = getattr(config, "qwen_type", None) == "qwen3"
        if self.qk_norm:
            self.q_layernorm = RmsNorm(self.head_dim, eps=config.norm_epsilon, dtype=dtype)
            self.k_layernorm = RmsNorm(self.head_dim, eps=config.norm_epsilon, dtype=dtype)
        if self.adapter:  # rows sharded by KV head in the checkpoint: each rank decides for its own heads
            self.dms_proj_alpha = ColumnLinear(config.hidden_size, config.num_key_value_heads, bias=False,
                                               dtype=dtype, tp_group=group, tp_size=tp, gather_output=False)
            self.dms_proj_alpha_norm = RmsNorm(config.hidden_size, eps=config.norm_epsilon, dtype=dtype)
        self.scale = 1.0 / math.sqrt(self.head_dim)
        keep = np.ones((self.num_heads, self.head_dim), dtype=np.float32)
        if not self.adapter:
            keep[:: self.group, -1] = 0.0  # the borrowed channel: last of each GQA group's first head
        self.channel_keep = keep
        inv_freq = 1.0 / (float(config.rotary_base) ** (np.arange(0, self.head_dim, 2) / self.head_dim))
        angles = np.arange(config.max_position_embeddings)[:, None] * inv_freq[None, :]
        self.rope_cos_sin = np.concatenate([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
        self.io: dict[str, Tensor] = {}  # this step's DMS inputs, set by the model's forward
        register_plugins()

    def _heads(self, x: Tensor, heads: int) -> Tensor:
        return view(x, concat([shape(x, 0), heads, self.head_dim]))

    def project(self, hidden_states: Tensor, position_ids: Tensor):
        """hidden [N, hidden] -> q [N, Hq, D], k, v [N, Hkv, D] (RoPE applied), logit float32 [N, Hkv]."""
        q_w, kv_w = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = split(self.qkv(hidden_states), [q_w, kv_w, kv_w], dim=1)
        q = self._heads(q, self.num_heads)
        k, v = self._heads(k, self.num_kv_heads), self._heads(v, self.num_kv_heads)
        if self.qk_norm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        n = shape(q, 0)
        if self.adapter:
            logit = self.dms_proj_alpha(self.dms_proj_alpha_norm(hidden_states))
        else:  # q[:, ::G, -1] as a strided slice over heads
            picked = slice(q, starts=[0, 0, self.head_dim - 1], sizes=concat([n, self.num_kv_heads, 1]),
                           strides=[1, self.group, 1])
            logit = view(picked, concat([n, self.num_kv_heads]))
        logit = cast(logit, "float32") * self.alpha_scale - self.alpha_offset
        keep = cast(constant(self.channel_keep), q.dtype)
        q = q * keep
        cos_sin = embedding(position_ids, constant(self.rope_cos_sin))  # [N, D]
        cos, sin = split(cast(cos_sin, q.dtype), [self.head_dim // 2, self.head_dim // 2], dim=1)
        cos, sin = (view(concat([t, t], dim=1), concat([n, 1, self.head_dim])) for t in (cos, sin))
        rope = PositionEmbeddingType.rope_gpt_neox
        q = RopeEmbeddingUtils.apply_rotary_pos_emb(q, [cos, sin], rope)
        k = RopeEmbeddingUtils.apply_rotary_pos_emb(k, [cos, sin], rope)
        return q * keep, k, v, logit  # RoPE mixes the zeroed channel back in: zero it again

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        io, li = self.io, self.layer_idx
        q, k, v, logit = self.project(hidden_states, io["dms_position_ids"])
        if PHASE == "context":
            # Shift by one: token t's fate is decided at t+1; each sequence's last token is kept.
            n = shape(logit, 0)
            nxt = concat([slice(logit, [1, 0], concat([n - 1, self.num_kv_heads])),
                          constant(np.zeros((1, self.num_kv_heads), dtype=np.float32))])
            evicted = cast(nxt > 0.0, "int32") * (1 - view(io["dms_last_token"], concat([n, 1])))
            if not self.eviction:
                evicted = evicted * 0
            (out,) = _plugin(trtp.op.dms.prefill, q, k, v, evicted, io["dms_cu_seqlens"],
                             scale=self.scale, window=self.window)
            k.mark_output(f"dms_k_{li}", k.dtype)
            v.mark_output(f"dms_v_{li}", v.dtype)
        else:
            k_pool, v_pool = _plugin(trtp.op.dms.pool_write, io[f"dms_k_pool_{li}"], io[f"dms_v_pool_{li}"],
                                     k, v, io[f"dms_write_rows_{li}"])
            (out,) = _plugin(trtp.op.dms.paged_decode, q, k_pool, v_pool, io[f"dms_block_tables_{li}"],
                             io[f"dms_stream_lens_{li}"], scale=self.scale, num_kv_heads=self.num_kv_heads)
        logit.mark_output(f"dms_logit_{li}", trt.float32)
        return self.dense(view(out, concat([shape(out, 0), self.num_heads * self.head_dim])))


def _dms_inputs(config, max_tokens: int, max_batch: int, pool_blocks: int, max_blocks: int) -> dict:
    """The extra engine inputs of this phase (one optimisation profile)."""
    tp = config.mapping.tp_size
    kv_heads, head_dim = config.num_key_value_heads // tp, config.head_size
    block = int(os.environ.get("DMS_TRTLLM_BLOCK_SIZE", "64"))
    dtype = trt.bfloat16 if config.dtype == "bfloat16" else trt.float16
    tokens = OrderedDict([("num_tokens", [(1, max(1, max_tokens // 2), max_tokens)])])
    ins = {"dms_position_ids": Tensor("dms_position_ids", trt.int32, [-1], tokens)}
    if PHASE == "context":
        ins["dms_cu_seqlens"] = Tensor("dms_cu_seqlens", trt.int32, [-1],
                                       OrderedDict([("batch_plus_one", [(2, 2, max_batch + 1)])]))
        ins["dms_last_token"] = Tensor("dms_last_token", trt.int32, [-1], tokens)
        return ins
    streams = OrderedDict([("streams", [(kv_heads, kv_heads, max_batch * kv_heads)])])
    for li in range(config.num_hidden_layers):
        pool = OrderedDict([("pool_blocks", [(1, pool_blocks, pool_blocks)]), ("block", [(block,) * 3]),
                            ("head_dim", [(head_dim,) * 3])])
        ins[f"dms_k_pool_{li}"] = Tensor(f"dms_k_pool_{li}", dtype, [-1, block, head_dim], pool)
        ins[f"dms_v_pool_{li}"] = Tensor(f"dms_v_pool_{li}", dtype, [-1, block, head_dim], pool)
        table = OrderedDict(list(streams.items()) + [("max_blocks", [(1, max_blocks, max_blocks)])])
        ins[f"dms_block_tables_{li}"] = Tensor(f"dms_block_tables_{li}", trt.int32, [-1, -1], table)
        ins[f"dms_stream_lens_{li}"] = Tensor(f"dms_stream_lens_{li}", trt.int32, [-1], streams)
        ins[f"dms_write_rows_{li}"] = Tensor(f"dms_write_rows_{li}", trt.int32, [-1], streams)
    return ins


class _DmsMixin:
    """Swap in DmsAttention; add the DMS inputs to prepare_inputs and route them in forward."""

    def _swap_attention(self) -> None:
        for idx, layer in enumerate(self.transformer.layers):
            layer.attention = DmsAttention(self.config, getattr(layer, "layer_idx", idx))

    def prepare_inputs(self, *args, **kwargs):
        inputs = super().prepare_inputs(*args, **kwargs)
        pool_blocks = int(os.environ.get("DMS_TRTLLM_POOL_BLOCKS", "1024"))
        max_blocks = int(os.environ.get("DMS_TRTLLM_MAX_BLOCKS_PER_STREAM", "64"))
        max_tokens = int(kwargs.get("max_num_tokens") or 8192)
        inputs.update(_dms_inputs(self.config, max_tokens, int(kwargs.get("max_batch_size", 1)),
                                  pool_blocks, max_blocks))
        return inputs

    def forward(self, *args, **kwargs):
        io = {name: kwargs.pop(name) for name in list(kwargs) if name.startswith("dms_")}
        for layer in self.transformer.layers:
            layer.attention.io = io
        kwargs["use_cache"] = False  # no TensorRT-LLM KV cache: the DMS pool is the engine's I/O
        return super().forward(*args, **kwargs)


class DmsQWenForCausalLM(_DmsMixin, QWenForCausalLM):
    """Qwen3 with DMS attention (config.json from pipeline/convert: qwen_type qwen3 and dms_* keys)."""

    def __init__(self, config):
        super().__init__(config)
        self._swap_attention()


class DmsLLaMAForCausalLM(_DmsMixin, LLaMAForCausalLM):
    """Llama with DMS attention."""

    def __init__(self, config):
        super().__init__(config)
        self._swap_attention()
