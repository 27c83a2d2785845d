"""IncrementalDecoder: token ids in, text out, one token at a time, for streaming responses.

A byte-level BPE token can hold part of a UTF-8 character (a CJK character or an emoji is often split
over two or three tokens). ``add`` therefore returns only whole characters and keeps the bytes of an
unfinished one until the tokens that complete it arrive. Bytes that can never become valid UTF-8 are
replaced by U+FFFD as soon as that is certain, and ``flush`` replaces what is still held back at the
end. The pieces ``add`` and ``flush`` return, joined, always equal ``tokenizer.decode(ids)``.

This module knows a tokenizer's ``token_bytes`` and UTF-8. It does not know when a stream ends (the
caller calls ``flush``) nor anything about special tokens: ``<|endoftext|>`` decodes to its text.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from typing import Protocol


class _HasTokenBytes(Protocol):
    def token_bytes(self, token_id: int) -> bytes: ...


class IncrementalDecoder:
    """Decode one stream of token ids piece by piece; make one per stream (it holds state)."""

    def __init__(self, tokenizer: _HasTokenBytes | Callable[[int], bytes]) -> None:
        """``tokenizer``: anything with ``token_bytes(id)``, or that function itself."""
        self._token_bytes = getattr(tokenizer, "token_bytes", tokenizer)
        # Python's own incremental UTF-8 decoder: it holds back an incomplete trailing sequence and
        # replaces invalid bytes exactly as one-shot bytes.decode(errors="replace") does.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        """The text that ``token_id`` completes: possibly "", never half a character.

        Raises ValueError (naming the id) for an id outside the vocabulary; the state is unchanged.
        """
        return self._utf8.decode(self._token_bytes(token_id))

    def flush(self) -> str:
        """End the stream: whatever bytes are still held back, each invalid part as U+FFFD. Resets."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text

    def reset(self) -> None:
        """Drop held-back bytes and start a new stream."""
        self._utf8.reset()

    @property
    def pending_bytes(self) -> bytes:
        """The bytes held back because they do not yet form a whole character."""
        return self._utf8.getstate()[0]
