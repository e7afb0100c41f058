"""Exact-match scoring of generated answers.

The synthetic tasks' answers are whitespace-separated words (`42`, `7 + 5 = 12 + 2 = 14`, a whole
trace). A generation is correct when its first words are exactly the answer's words and, if it goes on,
the next thing is an end of answer (the end-of-sequence token, already stripped by the decoder, or a
stop word). Everything after the answer is the model's business, exactly as lm-eval's `until` stop
sequences treat it; nothing else is forgiven (no case folding, no partial credit for the written steps
of arithmetic or a trace).
"""

from __future__ import annotations

# Words that end an answer: a prompt statement ends with "." and questions start with "?".
STOP_WORDS = (".", "?")


def exact_match(generated: str, answer: str) -> bool:
    """True when the generation starts with exactly the answer's words and then ends (or a stop word
    follows). A trace answer holds stop words itself (`k5 k40 17 k5 18 . ...`): all of it must match.

    Words beyond the answer's length count as wrong unless a stop word comes first: a model that writes
    `7 + 5 = 12 + 2 = 14 + 1` has not answered `7 + 5 = 12 + 2 = 14`.
    """
    want = answer.split()
    if not want:
        raise ValueError("exact_match: the reference answer is empty")
    words = generated.split()
    return words[: len(want)] == want and (len(words) == len(want) or words[len(want)] in STOP_WORDS)


def max_answer_tokens(answer: str, slack: int = 2) -> int:
    """Tokens to generate for an item: its answer's length (one word = one token) plus slack."""
    return len(answer.split()) + slack
