"""Passkey retrieval in long filler text, for real models with their own tokenizer (e.g. smollm2-135m).

The classic long-context probe (Mohtashami & Jaggi 2023): a five-digit key is stated once at a random
depth inside repetitive filler; the prompt ends by asking for it. Held-out by construction: the keys and
depths come from the seed given, and the filler says nothing about them.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n"
)
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyItem:
    prompt: str
    answer: str  # the five digits
    length: int  # the target prompt length in tokens (the length bucket)
    task: str = "passkey"
    max_new_tokens: int = 12  # digits may be one token each, after a space or a quote

    @property
    def question_offset(self) -> int:
        """Where the question starts: the context before it is compressed first (eval protocol)."""
        return self.prompt.rindex(QUESTION)


def make_passkey_item(tokenizer, length_tokens: int, rng: random.Random) -> PasskeyItem:
    """A prompt of about `length_tokens` tokens (under `tokenizer`) hiding a random key at a random depth."""
    key = str(rng.randint(10000, 99999))
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    fixed = len(tokenizer.encode(INTRO + needle + QUESTION, add_special_tokens=False))
    per_filler = len(tokenizer.encode(FILLER * 8, add_special_tokens=False)) / 8
    n_filler = max(2, int((length_tokens - fixed) / per_filler))
    depth = rng.randint(1, n_filler - 1)
    prompt = INTRO + FILLER * depth + needle + FILLER * (n_filler - depth) + QUESTION
    return PasskeyItem(prompt=prompt, answer=key, length=length_tokens)


def passkey_correct(generated: str, answer: str) -> bool:
    """Exact match on the first run of digits the model produces."""
    found = re.search(r"\d+", generated)
    return found is not None and found.group(0) == answer
