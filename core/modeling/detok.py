"""Incremental detokenization and stop-sequence search, constant work per token.

Decoding a row's whole output after every token (to find a stop sequence, or the text a
streamed token adds) costs time that grows with the square of its length. Here each token
decodes only a short window (the previous token or two as context, so leading spaces and
byte-level merges come out as in a full decode), and a stop sequence is looked for only in
the tail of the text that the new piece could have completed.

The window method is TGI's and vLLM's: text is released only once the window decodes to
more than its context without ending in U+FFFD (a multi-byte character still incomplete).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"


class Detokenizer:
    """Text of a growing token sequence, one piece per pushed token.

    `text` is what has been released so far; pieces add up to it. A token that completes
    no character releases "" (its bytes come out with a later token). `flush()` releases
    what is left (an incomplete character as U+FFFD, as a full decode writes it).
    """

    __slots__ = ("_prefix", "_read", "_special", "_tok", "ids", "text")

    def __init__(self, tokenizer: Any, special: frozenset[int] | None = None) -> None:
        self._tok = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # end of the tokens whose text was released
        self.text = ""
        self._special = special if special is not None else special_ids(tokenizer)

    def push(self, token: int) -> str:
        """Add one token; returns the text it releases (skips special tokens)."""
        if token in self._special:
            return ""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            piece = after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
            self.text += piece
            return piece
        return ""

    def flush(self) -> str:
        """Release the held-back tail (an incomplete character decodes to U+FFFD)."""
        if self._read == len(self.ids):
            return ""
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        piece = after[len(before) :]
        self._prefix = self._read = len(self.ids)
        self.text += piece
        return piece

    def _decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        text: str = self._tok.decode(ids, skip_special_tokens=True)
        return text


def special_ids(tokenizer: Any) -> frozenset[int]:
    return frozenset(int(i) for i in tokenizer.all_special_ids)


class StopFinder:
    """Whether a stop sequence has appeared in a text fed piece by piece.

    Each check looks only at the new piece plus the `longest - 1` characters before it
    (a stop sequence split across tokens is still found), so it costs the same at token
    ten and token ten thousand.
    """

    __slots__ = ("_keep", "_stops", "_tail")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._keep = max((len(s) for s in self._stops), default=1) - 1
        self._tail = ""

    def feed(self, piece: str) -> bool:
        if not piece or not self._stops:
            return False
        window = self._tail + piece
        found = any(s in window for s in self._stops)
        self._tail = window[-self._keep :] if self._keep else ""
        return found
