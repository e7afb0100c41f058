"""A tiny random DMS Qwen3 engine directory with its own byte-level BPE tokenizer (serving tests).

The tokenizer is trained here with `tokenizers` (no hub) and the model's vocabulary matches it, so real
text goes through preprocessing, the engine and postprocessing.
"""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny model served by triton",
    "dynamic memory sparsification evicts tokens from the kv cache",
    "numbers 0 1 2 3 4 5 6 7 8 9 and punctuation . , ; : ! ?",
]


def make_tokenizer(path: Path, vocab_size: int = 320) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(str(path))
    return path


def make_engine_dir(
    path: Path,
    *,
    window: int = 8,
    block: int = 4,
    max_input_len: int = 256,
    max_output_len: int = 64,
    kv_pool_tokens: int = 8192,
    max_batch_size: int = 8,
    seed: int = 0,
) -> Path:
    """A 2-layer DMS Qwen3 (hidden 64, 4 query / 2 KV heads) engine dir; about half the tokens evicted."""
    from safetensors.torch import load_file

    from pipeline.runtime.engine_dir import EngineLimits, write_engine_dir
    from tests.tiny_models import make_tiny_hf

    tok_dir = make_tokenizer(path.parent / f"{path.name}-tokenizer")
    vocab = len(json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]) + 1
    hf_dir = make_tiny_hf(
        path.parent / f"{path.name}-hf", dms="borrowed", window=window, block=block, seed=seed,
        vocab_size=vocab, max_positions=2048,
    )
    config = json.loads((hf_dir / "config.json").read_text())
    limits = EngineLimits(
        max_batch_size=max_batch_size,
        max_input_len=max_input_len,
        max_output_len=max_output_len,
        kv_block_size=block,
        kv_pool_tokens=kv_pool_tokens,
    )
    state = {k: v for k, v in load_file(str(hf_dir / "model.safetensors")).items() if k != "lm_head.weight"}
    return write_engine_dir(path, config=config, state_dict=state, limits=limits, tokenizer_dir=tok_dir)
