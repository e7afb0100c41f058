"""How the host driver runs one engine of the DMS pair: `session.run(inputs) -> outputs`, tensors by name
(plugins/trtllm/engine_io.py). Two implementations:

- `TrtllmSession`: the built TensorRT engine through `tensorrt_llm.runtime.Session` (TensorRT-LLM 1.2.1,
  on the GPU). NEVER RUN: written against TensorRT-LLM's runtime/session.py; plugins/README.md lists it.
- `EmulatedSession`: the same computation on the converted checkpoint's weights in torch, attention
  through the kernels the plugins launch (prefill, pool write, paged decode) on CUDA, and on CPU through
  their torch references, or the kernels themselves under Triton's interpreter with `kernels=True`
  (exact but slow: its reductions run element by element). tests/test_trt_plugin.py holds each kernel
  to its reference. The tests and the CPU Triton server run the driver on it; it is also how to check
  a driver change without a GPU.

Both take the pool tensors as inputs and write the generation phase's new K/V into them in place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from dms_core import rule
from dms_core.config import DmsConfig
from dms_core.rope import rope_inv_freq, rope_scaling_of
from plugins.trtllm import engine_io


class EngineSession(Protocol):
    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


class TrtllmSession:
    """One engine directory (`config.json`, `rank0.engine`) run by TensorRT-LLM's runtime Session."""

    def __init__(self, engine_dir: Path, plugin_library: str | None = None):
        try:
            import tensorrt as trt
            from tensorrt_llm.runtime import Session
        except ImportError as exc:
            raise RuntimeError(
                f"the DMS engine pair needs TensorRT-LLM 1.2.1 in this Python ({exc}): serve the repository "
                "with the tritonserver of NVIDIA's 25.12 TRT-LLM container, or use dms_session 'emulated'"
            ) from None

        from plugins.dms_attention.trt_plugin import register_plugins

        register_plugins()  # the DMS plugins' AOT kernels are in the engine; their creators must exist
        if plugin_library:  # TensorRT-LLM's own plugins (gemm_plugin auto) load with tensorrt_llm
            import ctypes

            ctypes.CDLL(plugin_library)
        engine = Path(engine_dir) / "rank0.engine"
        if not engine.is_file():
            raise FileNotFoundError(f"no {engine}: build the DMS engine pair with `--backend trtllm`")
        self.trt = trt
        self.session = Session.from_serialized_engine(engine.read_bytes())
        e = self.session.engine
        self.inputs = [
            n
            for n in map(e.get_tensor_name, range(e.num_io_tensors))
            if e.get_tensor_mode(n) == trt.TensorIOMode.INPUT
        ]

    def _filler(self, name: str) -> torch.Tensor:
        """A TensorRT-LLM input the DMS layers never read (its own KV-cache bookkeeping): zeros of the
        profile's smallest shape, where the engine wants it (host or device)."""
        from tensorrt_llm._utils import trt_dtype_to_torch

        e = self.session.engine
        shape = tuple(e.get_tensor_profile_shape(name, 0)[0])
        on_host = e.get_tensor_location(name) == self.trt.TensorLocation.HOST
        return torch.zeros(
            shape, dtype=trt_dtype_to_torch(e.get_tensor_dtype(name)), device="cpu" if on_host else "cuda"
        )

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from tensorrt_llm._utils import torch_dtype_to_trt, trt_dtype_to_torch
        from tensorrt_llm.runtime import TensorInfo

        feed = {n: inputs[n].contiguous() if n in inputs else self._filler(n) for n in self.inputs}
        infos = [TensorInfo(n, torch_dtype_to_trt(t.dtype), tuple(t.shape)) for n, t in feed.items()]
        outputs = {
            o.name: torch.empty(tuple(o.shape), dtype=trt_dtype_to_torch(o.dtype), device="cuda")
            for o in self.session.infer_shapes(infos)
        }
        stream = torch.cuda.current_stream()
        if not self.session.run(feed, outputs, stream.cuda_stream):
            raise RuntimeError("TensorRT could not enqueue the engine (see its log above)")
        stream.synchronize()
        return outputs


def read_trtllm_checkpoint(ckpt_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, rank 0's weights) of a TensorRT-LLM checkpoint written by the convert stage."""
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    config = json.loads((ckpt_dir / "config.json").read_text())
    tp = int((config.get("mapping") or {}).get("tp_size", 1))
    if tp != 1:
        raise ValueError(f"{ckpt_dir} is split for tp_size {tp}; the emulated session runs tp_size 1 only")
    return config, load_file(str(ckpt_dir / "rank0.safetensors"))


class EmulatedSession:
    """One phase of the pair ("context" | "generation") computed in torch from a TensorRT-LLM checkpoint,
    as plugins/trtllm/model.py builds it. dtype: the weights are cast to it (float32 on CPU)."""

    def __init__(
        self,
        phase: str,
        config: dict,
        weights: dict[str, torch.Tensor],
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        kernels: bool | None = None,
    ):
        if phase not in engine_io.PHASES:
            raise ValueError(f"phase must be one of {engine_io.PHASES}, got {phase!r}")
        self.phase = phase
        self.kernels = torch.device(device).type == "cuda" if kernels is None else kernels
        self.w = {k: v.to(device, dtype) for k, v in weights.items()}
        c = config
        self.num_layers = c["num_hidden_layers"]
        self.hq, self.hkv = c["num_attention_heads"], c["num_key_value_heads"]
        self.d = c.get("head_size") or c["hidden_size"] // self.hq
        self.eps = c["norm_epsilon"]
        self.qk_norm = c.get("qwen_type") == "qwen3"
        self.dms = DmsConfig.read(c)
        self.scale = self.d**-0.5
        theta, scaling = rope_scaling_of(c)
        self.inv_freq = rope_inv_freq(self.d, theta, scaling).to(device)
        self.keep = (~rule.borrowed_channel_mask(self.hq, self.hkv, self.d, "head")).to(device, dtype)
        if self.dms.separate_alpha:
            self.keep = torch.ones_like(self.keep)
        self.lm_head = self.w.get("lm_head.weight", self.w["transformer.vocab_embedding.weight"])

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        weight = self.w[name]
        return F.rms_norm(x.float(), weight.shape, None, self.eps).to(x.dtype) * weight

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x * cos + x.roll(self.d // 2, dims=-1) * sin  # rotate-half, sin's first half negated

    def project(self, layer: int, x: torch.Tensor, pos: torch.Tensor):
        """DmsAttention.project in torch: x [N, hidden] is the layer's residual-stream input."""
        p = f"transformer.layers.{layer}."
        h = self._norm(x, p + "input_layernorm.weight")
        q, k, v = (h @ self.w[p + "attention.qkv.weight"].T).split(
            [self.hq * self.d, self.hkv * self.d, self.hkv * self.d], dim=-1
        )
        q, k, v = q.view(-1, self.hq, self.d), k.view(-1, self.hkv, self.d), v.view(-1, self.hkv, self.d)
        if self.qk_norm:
            q, k = (
                self._norm(q, p + "attention.q_layernorm.weight"),
                self._norm(k, p + "attention.k_layernorm.weight"),
            )
        if self.dms.separate_alpha:  # the adapter reads the residual stream (before input_layernorm)
            raw = (
                self._norm(x, p + "attention.dms_proj_alpha_norm.weight")
                @ self.w[p + "attention.dms_proj_alpha.weight"].T
            )
        else:
            raw = q[:, :: self.hq // self.hkv, -1]
        logit = rule.scaled_logit(raw, self.dms.alpha_scale, self.dms.initial_alpha_offset).float()
        angles = pos.float()[:, None] * self.inv_freq  # [N, D/2]
        cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None].to(q.dtype)
        sin = torch.cat([-angles.sin(), angles.sin()], -1)[:, None].to(q.dtype)
        q = self._rotate(q * self.keep, cos, sin) * self.keep
        return q, self._rotate(k, cos, sin), v, logit

    def _finish(self, layer: int, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        p = f"transformer.layers.{layer}."
        x = x + attn.reshape(x.shape[0], -1) @ self.w[p + "attention.dense.weight"].T
        h = self._norm(x, p + "post_layernorm.weight")
        gated = F.silu(h @ self.w[p + "mlp.fc.weight"].T) * (h @ self.w[p + "mlp.gate.weight"].T)
        return x + gated @ self.w[p + "mlp.proj.weight"].T

    @torch.inference_mode()
    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from plugins.dms_attention.prefill import PrefillPast

        pos = inputs[engine_io.POSITIONS]
        x = self.w["transformer.vocab_embedding.weight"][inputs["input_ids"].long()]
        k_pool, v_pool = inputs[engine_io.K_POOL], inputs[engine_io.V_POOL]
        out: dict[str, torch.Tensor] = {}
        for li in range(self.num_layers):
            q, k, v, logit = self.project(li, x, pos)
            tables, lens = inputs[engine_io.tables(li)], inputs[engine_io.lens(li)]
            if self.phase == "context":  # as DmsAttention.context_evicted: shift by one, where allowed
                later = rule.shift_by_one(rule.evicts(logit).T, False).T
                evicted = (later & inputs[engine_io.EVICTABLE].bool()[:, None]).int()
                past = PrefillPast(pos, k_pool, v_pool, tables, lens, inputs[engine_io.expiry(li)])
                cu = inputs[engine_io.CU_SEQLENS]
                qkv = (t.contiguous() for t in (q, k, v))
                attn = self._prefill(*qkv, evicted.contiguous(), cu, past)
                out[engine_io.keys(li)], out[engine_io.values(li)] = k, v
            else:
                self._pool_write(k_pool, v_pool, k, v, inputs[engine_io.write_rows(li)])
                attn = self._paged_decode(q.contiguous(), k_pool, v_pool, tables, lens, self.scale, self.hkv)
            out[engine_io.logits(li)] = logit
            x = self._finish(li, x, attn)
        last = inputs["last_token_ids"].long() - 1
        out["logits"] = (self._norm(x[last], "transformer.ln_f.weight") @ self.lm_head.T).float()
        return out

    # The plugins' kernels, or their torch references (see the module docstring).
    def _prefill(self, q, k, v, evicted, cu_seqlens, past):
        from plugins.dms_attention.prefill import dms_prefill_attention, reference_prefill_attention

        window = self.dms.window_size
        if self.kernels:
            return dms_prefill_attention(q, k, v, evicted, cu_seqlens, window, self.scale, past, 16, 16)
        return reference_prefill_attention(q, k, v, evicted, cu_seqlens, window, self.scale, past).to(q.dtype)

    def _pool_write(self, k_pool, v_pool, k, v, rows):
        from plugins.dms_attention.reference import reference_pool_write
        from plugins.dms_attention.trt_plugin import trt_pool_write

        (trt_pool_write if self.kernels else reference_pool_write)(k_pool, v_pool, k, v, rows)

    def _paged_decode(self, q, k_pool, v_pool, tables, lens, scale, num_kv_heads):
        from plugins.dms_attention.reference import reference_paged_decode_attention
        from plugins.dms_attention.trt_plugin import trt_paged_decode

        # the plugin's wrapper calls the runtime's kernel, which the interpreter follows only under
        # TRITON_INTERPRET=1 (set before triton is imported)
        if self.kernels and (q.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
            return trt_paged_decode(q, k_pool, v_pool, tables, lens, scale, num_kv_heads)
        return reference_paged_decode_attention(q, k_pool, v_pool, tables, lens, scale, num_kv_heads)
