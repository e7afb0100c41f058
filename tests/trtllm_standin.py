"""A torch stand-in for the handful of TensorRT, TensorRT-LLM functions and layers that
plugins/trtllm/model.py's projection math uses, so that code runs on CPU.

TensorRT-LLM 1.2.1 cannot be installed on these machines (plugins/README.md): this is a stand-in for
code that cannot run here, not a mock of something that could. Each function does on torch tensors what
its TensorRT-LLM namesake adds to a TensorRT network (tensorrt_llm/functional.py, layers/, module.py of
the 1.x line); shape tensors are plain ints and lists. Only what the model class calls is here: anything
else it starts to use fails loudly (AttributeError at import), which is the point.

    with standin_modules():
        from plugins.trtllm import model
"""

from __future__ import annotations

import builtins
import contextlib
import importlib
import sys
import types

import numpy as np
import torch
import torch.nn.functional as F

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int32": torch.int32,
}


# -- tensorrt_llm.functional ------------------------------------------------------------------------
Tensor = torch.Tensor


def shape(x: torch.Tensor, dim: int | None = None):
    return list(x.shape) if dim is None else x.shape[dim]


def concat(inputs, dim: int = 0):
    """Tensors are concatenated; a list of ints (TensorRT-LLM's shape tensors) stays a shape."""
    if all(isinstance(i, int) for i in inputs):
        return [int(i) for i in inputs]
    return torch.cat([i if isinstance(i, torch.Tensor) else torch.tensor([i]) for i in inputs], dim=dim)


def view(x: torch.Tensor, new_shape) -> torch.Tensor:
    return x.reshape(list(new_shape))


def slice(x: torch.Tensor, starts, sizes, strides=None) -> torch.Tensor:  # noqa: A001 (TensorRT-LLM's name)
    strides = strides or [1] * x.dim()
    index = tuple(builtins.slice(s, s + n * st, st) for s, n, st in zip(starts, sizes, strides, strict=True))
    return x[index]


def split(x: torch.Tensor, split_size_or_sections, dim: int = 0):
    return list(torch.split(x, split_size_or_sections, dim=dim))


def constant(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array).copy())


def cast(x: torch.Tensor, dtype) -> torch.Tensor:
    return x.to(_DTYPES[dtype] if isinstance(dtype, str) else dtype)


cos, sin = torch.cos, torch.sin


def _create_tensor(*args, **kwargs):
    raise NotImplementedError("the stand-in runs no TensorRT network (plugins are not emulated here)")


default_trtnet = _create_tensor


# -- tensorrt_llm.module / parameter / layers -------------------------------------------------------
class Parameter:
    def __init__(self, shape, dtype=None):
        self.value = torch.zeros(shape, dtype=_DTYPES.get(dtype, torch.float32))


class Module:
    """TensorRT-LLM's Module: Parameters and Modules set as attributes are registered by name."""

    def __init__(self) -> None:
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "_parameters", {})

    def __setattr__(self, name, value) -> None:
        self.__dict__.pop(name, None)
        self._modules.pop(name, None)
        self._parameters.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name):
        for store in ("_parameters", "_modules"):
            if name in self.__dict__.get(store, {}):
                return self.__dict__[store][name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def named_parameters(self, prefix: str = ""):
        for name, p in self._parameters.items():
            yield prefix + name, p
        for name, m in self._modules.items():
            yield from m.named_parameters(f"{prefix}{name}.")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


class ColumnLinear(Module):
    def __init__(
        self, in_features, out_features, bias=True, dtype=None, tp_group=None, tp_size=1, gather_output=True
    ):
        super().__init__()
        assert not bias, "the DMS layers have no biases"
        self.weight = Parameter((out_features // tp_size, in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.value.T


class RowLinear(Module):
    def __init__(self, in_features, out_features, bias=True, dtype=None, tp_group=None, tp_size=1):
        super().__init__()
        self.weight = Parameter((out_features, in_features // tp_size), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.value.T


class RmsNorm(Module):
    def __init__(self, normalized_shape, eps=1e-6, dtype=None):
        super().__init__()
        self.weight = Parameter((normalized_shape,), dtype)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.value
        return F.rms_norm(x.float(), w.shape, None, self.eps).to(x.dtype) * w


class _DecoderModel(Module):
    """QWenForCausalLM / LLaMAForCausalLM: only their names are needed (the classes are subclassed)."""


@contextlib.contextmanager
def standin_modules():
    """tensorrt, tensorrt.plugin and the tensorrt_llm modules the model class imports, backed by this
    file, for the duration of the block; plugins.trtllm.model is imported afresh inside it and dropped
    after."""
    this = sys.modules[__name__]
    fakes = {
        name: types.ModuleType(name)
        for name in (
            "tensorrt",
            "tensorrt.plugin",
            "tensorrt_llm",
            "tensorrt_llm._common",
            "tensorrt_llm.functional",
            "tensorrt_llm.layers",
            "tensorrt_llm.module",
            "tensorrt_llm.models",
            "tensorrt_llm.models.llama",
            "tensorrt_llm.models.llama.model",
            "tensorrt_llm.models.qwen",
            "tensorrt_llm.models.qwen.model",
        )
    }
    for name in ("float32", "float16", "bfloat16", "int32"):
        setattr(fakes["tensorrt"], name, _DTYPES[name])
    fakes["tensorrt"].plugin = fakes["tensorrt.plugin"]
    fakes["tensorrt_llm._common"].default_trtnet = default_trtnet
    for name in (
        "Tensor",
        "_create_tensor",
        "cast",
        "concat",
        "constant",
        "cos",
        "shape",
        "sin",
        "slice",
        "split",
        "view",
    ):
        setattr(fakes["tensorrt_llm.functional"], name, getattr(this, name))
    for name in ("ColumnLinear", "RmsNorm", "RowLinear"):
        setattr(fakes["tensorrt_llm.layers"], name, getattr(this, name))
    fakes["tensorrt_llm.module"].Module = Module
    fakes["tensorrt_llm.models.llama.model"].LLaMAForCausalLM = type("LLaMAForCausalLM", (_DecoderModel,), {})
    fakes["tensorrt_llm.models.qwen.model"].QWenForCausalLM = type("QWenForCausalLM", (_DecoderModel,), {})
    saved = {name: sys.modules.get(name) for name in [*fakes, "plugins.trtllm.model"]}
    sys.modules.update(fakes)
    sys.modules.pop("plugins.trtllm.model", None)
    try:
        yield importlib.import_module("plugins.trtllm.model")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
