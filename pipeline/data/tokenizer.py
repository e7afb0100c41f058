"""The embedded model's tokenizer: a word-level `tokenizers` model trained on generated task text.

The tasks use a closed vocabulary of whitespace-separated words, so one word is one token: lengths are
exact and answers are a few tokens. Saved as a Hugging Face fast tokenizer (`AutoTokenizer` loads it).
"""

from __future__ import annotations

import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from pipeline.data.tasks import TASKS, VOCAB_WORDS, make_item

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0..3 in this order


def train_tokenizer(vocab_size: int = 512, seed: int = 0, n_items: int = 60) -> PreTrainedTokenizerFast:
    """Train the word-level tokenizer on generated items (deterministic in `seed`).

    The closed vocabulary is appended once to the corpus so rare words are never missing; words are
    ordered by frequency in the generated text (ties by the trainer's deterministic order).
    """
    rng = random.Random(f"tokenizer/{seed}")
    corpus = [make_item(TASKS[i % len(TASKS)], 256, rng) for i in range(n_items)]
    lines = [f"{it.prompt} {it.answer}" for it in corpus] + [" ".join(VOCAB_WORDS)]
    needed = len(SPECIAL_TOKENS) + len(set(VOCAB_WORDS))
    if vocab_size < needed:
        raise ValueError(f"pretrain.vocab_size={vocab_size} is too small: the task vocabulary needs {needed}")
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(
        lines, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS))
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    # Word-level decoding joins words with single spaces (WordPiece's decoder without '##' does that).
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        padding_side="left", model_max_length=1 << 16,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    tokenizer.save_pretrained(str(out_dir))
