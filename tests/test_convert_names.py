"""Our converted checkpoints against the names TensorRT-LLM 1.2.1 reads (tests/fixtures, from its sources)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pipeline.convert.export import convert_checkpoint
from pipeline.convert.names import _LAYER_RULES, _QK_NORM_RULES
from tests.tiny_models import make_hf

torch.set_num_threads(1)
FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "trtllm_1_2_1_names.json").read_text())


def test_fixture_names_its_sources():
    files = FIXTURE["provenance"]["files"]
    for section in ("common", "qwen3", "llama"):
        for src in FIXTURE["config_fields"][section]["source"].split(", "):
            assert src in files, src
    for meta in files.values():
        assert meta["repo"] == "NVIDIA/TensorRT-LLM" and meta["path"].startswith("tensorrt_llm/models/")


@pytest.mark.parametrize("family,dms", [("qwen3", "borrowed"), ("qwen3", "adapter"), ("llama", None)])
def test_config_and_weight_names_are_what_trtllm_reads(tmp_path, family, dms):
    hf = make_hf(tmp_path / "hf", family, dms)
    convert_checkpoint(hf, tmp_path / "ckpt", tp_size=2, dtype="bfloat16", log=lambda *_: None)
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    fields = FIXTURE["config_fields"]
    missing = [f for f in fields["common"]["fields"] + fields[family]["fields"] if f not in cfg]
    assert not missing, f"config.json lacks fields TensorRT-LLM 1.2.1 reads: {missing}"
    assert cfg["architecture"] == fields[family]["architecture"]
    for key, value in fields[family]["values"].items():
        assert cfg[key] == value, key
    assert cfg["rotary_base"] == 1e6  # from rope_theta, not TensorRT-LLM's default
    assert cfg["mapping"]["tp_size"] == 2 and cfg["mapping"]["world_size"] == 2
    for key in FIXTURE["ours_not_trtllm"]["config"]:
        assert (key in cfg) == (dms is not None or key == "dms_disable_eviction"), key

    names = FIXTURE["weight_names"]
    layer = names["layer"]["names"] + (names["qwen3_layer_extra"]["names"] if family == "qwen3" else [])
    if dms == "adapter":
        layer = layer + FIXTURE["ours_not_trtllm"]["layer"]
    expected = set(names["global"]["names"]) | {
        f"transformer.layers.{i}.{n}" for i in range(cfg["num_hidden_layers"]) for n in layer
    }
    for rank in range(2):
        with safe_open(tmp_path / "ckpt" / f"rank{rank}.safetensors", "pt") as fh:
            assert set(fh.keys()) == expected


def test_hf_to_trtllm_mapping_matches_trtllm_sources():
    ours = {hf: trt for hf, trt, _ in _LAYER_RULES + _QK_NORM_RULES}
    theirs = {k: v for k, v in FIXTURE["hf_to_trtllm_layer"].items() if k != "source"}
    assert ours == theirs
