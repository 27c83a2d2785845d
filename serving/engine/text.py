"""Incremental output text of one request: whole UTF-8 characters only, special tokens skipped, stop strings cut.

Text that could still become a stop string is held back until it is known not to be one; when a stop string
appears, it and everything after it are dropped. The bytes become text through `tokenizer.IncrementalDecoder`.
Knows token bytes and strings; nothing of models or HTTP.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

from tokenizer import IncrementalDecoder


class OutputText:
    def __init__(
        self,
        token_bytes: Callable[[int], bytes],
        *,
        special_ids: Collection[int] = (),
        stop: Sequence[str] = (),
    ) -> None:
        self._special = special_ids
        self._stop = tuple(stop)
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        # Byte-level BPE splits characters across tokens: the decoder only emits complete ones.
        self._decoder = IncrementalDecoder(token_bytes)
        self._text = ""
        self._sent = 0
        self.stopped = False

    @property
    def text(self) -> str:
        """All text so far (cut at a matched stop string), including any part still held back."""
        return self._text

    def add(self, token_id: int) -> str:
        """Append one token; return the text that may now be released (possibly ""). Sets `stopped` on a match."""
        if self.stopped:
            return ""
        if token_id not in self._special:
            before = len(self._text)
            self._text += self._decoder.add(token_id)
            self._match_stop(before)
        return self._release(final=self.stopped)

    def finish(self) -> str:
        """Flush (an unfinished character becomes U+FFFD) and release everything still held back."""
        if not self.stopped:
            before = len(self._text)
            self._text += self._decoder.flush()
            self._match_stop(before)
        return self._release(final=True)

    def _match_stop(self, before: int) -> None:
        if not self._stop:
            return
        start = max(0, before - self._longest_stop + 1)
        # The stop string that completes first wins (as if text arrived one character at a time).
        hits = [(i + len(s), i) for s in self._stop if (i := self._text.find(s, start)) >= 0]
        if hits:
            self._text = self._text[: min(hits)[1]]
            self.stopped = True

    def _release(self, *, final: bool) -> str:
        end = len(self._text) if final else len(self._text) - self._held_back()
        if end <= self._sent:
            return ""
        out = self._text[self._sent : end]
        self._sent = end
        return out

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of some stop string."""
        text = self._text
        for k in range(min(self._longest_stop - 1, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0
