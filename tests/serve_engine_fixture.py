"""A tiny random DMS Qwen3 engine directory with its own byte-level BPE tokenizer (serving tests).

The tokenizer is trained here with `tokenizers` (no hub) and the model's vocabulary matches it, so real
text goes through preprocessing, the engine and postprocessing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

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
    import transformers

    from pipeline.runtime.engine_dir import EngineLimits, write_engine_dir

    tok_dir = make_tokenizer(path.parent / f"{path.name}-tokenizer")
    vocab = len(json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]) + 1
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        initializer_range=0.2,
        bos_token_id=None,
        eos_token_id=None,
    )
    cfg.architectures = ["Qwen3ForCausalLM"]
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    config = cfg.to_dict()
    config.update(
        dms_window_size=window,
        dms_paged_attention_block_size=block,
        dms_alpha_scale=10.0,
        dms_initial_alpha_offset=0.0,
        dms_separate_alpha=False,
        dms_alpha_per="head",
        dms_disable_eviction=False,
        dms_cr=4,
        dms_tau=0.1,
    )
    limits = EngineLimits(
        max_batch_size=max_batch_size,
        max_input_len=max_input_len,
        max_output_len=max_output_len,
        kv_block_size=block,
        kv_pool_tokens=kv_pool_tokens,
    )
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    return write_engine_dir(path, config=config, state_dict=state, limits=limits, tokenizer_dir=tok_dir)
