"""Text <-> token ids for the Triton models (preprocessing, postprocessing, the streaming BLS model).

Plain Python and numpy, no Triton import, so every check here is unit-testable. Each rejection raises
`RequestError` with a message a client can act on; the models turn it into an error response.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from pipeline.hf_files import load_tokenizer
from pipeline.runtime.detokenize import IncrementalDecoder


class RequestError(ValueError):
    """A request the server refuses; the message names the input and what is allowed."""


def as_text(value: object, name: str = "text_input") -> str:
    """A request's string tensor element (bytes from Triton) as text; refuses empty and non-UTF-8."""
    if isinstance(value, bytes | np.bytes_):
        try:
            text = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(
                f"{name} is not valid UTF-8 (byte {exc.start}: {bytes(value)[exc.start : exc.start + 1]!r}); "
                "send UTF-8 encoded text"
            ) from None
    elif isinstance(value, str):
        text = value
    else:
        raise RequestError(f"{name} must be a string, got {type(value).__name__}")
    if not text.strip():
        raise RequestError(f"{name} is empty; send a non-empty prompt")
    return text


def check_max_tokens(value: int, max_output_len: int) -> int:
    value = int(value)
    if value < 1 or value > max_output_len:
        raise RequestError(
            f"max_tokens is {value}; it must be between 1 and {max_output_len} (this engine's max_output_len)"
        )
    return value


@dataclass
class TextCodec:
    """Encode prompts and decode outputs with one tokenizer and the engine's limits."""

    tokenizer: object
    max_input_len: int
    max_output_len: int
    add_special_tokens: bool = True
    skip_special_tokens: bool = True

    @classmethod
    def from_dir(cls, tokenizer_dir: str | Path, max_input_len: int, max_output_len: int, **kw) -> TextCodec:
        return cls(load_tokenizer(tokenizer_dir), int(max_input_len), int(max_output_len), **kw)

    @property
    def end_id(self) -> int:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return int(eos) if eos is not None else -1

    @property
    def pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad) if pad is not None else self.end_id

    @cached_property
    def max_prompt_bytes(self) -> int:
        """Bytes beyond which a prompt cannot fit in max_input_len tokens: no token of this tokenizer
        spans more than its longest vocabulary entry (UTF-8 of the entry: never fewer bytes than the text
        it stands for), times 4 for normalizers that compose characters (NFC: up to 3 input characters
        into 1). Checked before tokenizing, so a 20 MiB prompt costs nothing."""
        vocab = self.tokenizer.get_vocab()
        longest = max((len(token.encode("utf-8")) for token in vocab), default=1)
        return self.max_input_len * longest * 4

    def check_size(self, value: object, name: str = "text_input") -> None:
        """RequestError when `value` (bytes or str) is longer than max_prompt_bytes, before any decoding."""
        size = len(value) if isinstance(value, bytes | np.bytes_) else len(str(value).encode("utf-8"))
        if size > self.max_prompt_bytes:
            raise RequestError(
                f"{name} is {size} bytes; no prompt over {self.max_prompt_bytes} bytes fits in this engine's "
                f"max_input_len of {self.max_input_len} tokens: shorten the prompt"
            )

    def encode(self, text: object) -> np.ndarray:
        """Prompt -> int32 ids [n]; refuses over-long (by bytes first), empty and non-UTF-8 prompts."""
        self.check_size(text)
        prompt = as_text(text)
        ids = self.tokenizer.encode(prompt, add_special_tokens=self.add_special_tokens)
        if not ids:
            raise RequestError("text_input tokenizes to no tokens; send a non-empty prompt")
        if len(ids) > self.max_input_len:
            raise RequestError(
                f"text_input is {len(ids)} tokens; this engine accepts at most {self.max_input_len} "
                "(max_input_len): shorten the prompt"
            )
        return np.asarray(ids, dtype=np.int32)

    def stop_words_ids(self, words: Sequence[object]) -> np.ndarray:
        """TensorRT-LLM's stop-word layout [2, n]: row 0 the concatenated ids, row 1 end offsets (-1 pad)."""
        flat: list[int] = []
        offsets: list[int] = []
        self.check_size(b"".join(w if isinstance(w, bytes) else str(w).encode() for w in words), "stop_words")
        for word in words:
            text = as_text(word, "stop_words") if not isinstance(word, str) else word
            if not text:
                continue
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if ids:
                flat.extend(ids)
                offsets.append(len(flat))
        if not flat:
            return np.array([[0], [-1]], dtype=np.int32)
        pad = len(flat) - len(offsets)
        return np.array([flat, offsets + [-1] * pad], dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(map(int, ids)), skip_special_tokens=self.skip_special_tokens)


def split_stop_words(stop_words_ids: np.ndarray) -> list[list[int]]:
    """Inverse of `TextCodec.stop_words_ids`: [2, n] -> the id sequences."""
    arr = np.asarray(stop_words_ids).reshape(2, -1)
    out, start = [], 0
    for end in arr[1]:
        if end < 0:
            break
        if end > start:
            out.append([int(t) for t in arr[0, start:end]])
        start = int(end)
    return out


def incremental_decoder(codec: TextCodec) -> IncrementalDecoder:
    """Text of a growing id sequence, piece by piece, at a constant cost per piece (holds back an
    incomplete UTF-8 character): pipeline.runtime.detokenize over this codec's decode."""
    return IncrementalDecoder(codec.decode)
