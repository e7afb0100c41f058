"""A Hugging Face model directory's tokenizer and generation settings, read in one place.

Everything that opens a tokenizer (the engine, the Triton pre/postprocessing models, evaluation, the
embedded model's training) and everything that needs the end-of-sequence ids goes through here, so they
cannot disagree. Never `trust_remote_code`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def has_tokenizer(model_dir: str | Path) -> bool:
    return any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(model_dir: str | Path) -> Any:
    """The directory's tokenizer. With a tokenizer.json the fast class is loaded directly (it avoids
    importing torch through AutoTokenizer: seconds per Triton model process)."""
    path = Path(model_dir)
    if (path / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(path))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def generation_ids(model_dir: str | Path | None) -> dict[str, Any]:
    """bos/eos/pad token ids of the directory's generation_config.json ({} without one)."""
    gen = Path(model_dir) / "generation_config.json" if model_dir is not None else None
    if gen is None or not gen.is_file():
        return {}
    ids = json.loads(gen.read_text())
    return {k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in ids}


def read_eos_ids(config: dict[str, Any], model_dir: str | Path | None = None) -> tuple[int, ...]:
    """The ids that end a generation: generation_config.json's (chat models keep their end-of-turn ids
    there), else config.json's eos_token_id."""
    eos = generation_ids(model_dir).get("eos_token_id", config.get("eos_token_id"))
    if eos is None:
        return ()
    return tuple(int(e) for e in eos) if isinstance(eos, list) else (int(eos),)
