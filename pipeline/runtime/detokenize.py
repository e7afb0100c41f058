"""Incremental detokenisation: the text a growing token sequence adds, at a cost that does not grow with
its length (text-generation servers' prefix/read offsets).

Each push decodes only the tokens since the last emitted piece plus the one before them (a lookback, so
tokenizers that attach a leading space to a word still decode it right) and holds back a piece that ends
in an incomplete UTF-8 character.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class IncrementalDecoder:
    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self._prefix = 0  # start of the lookback window
        self._read = 0  # tokens whose text was emitted

    def push(self, new_ids: Sequence[int]) -> str:
        """The text that `new_ids` add ("" while a character is incomplete)."""
        self.ids.extend(int(t) for t in new_ids)
        before = self.decode(self.ids[self._prefix : self._read])
        text = self.decode(self.ids[self._prefix :])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(before) :]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        before = self.decode(self.ids[self._prefix : self._read])
        text = self.decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return text[len(before) :] if len(text) > len(before) else ""
