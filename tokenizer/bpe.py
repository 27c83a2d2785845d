"""GPT-2's byte-level BPE: the byte-to-unicode table, the pre-tokenisation pattern and the merge loop.

How GPT-2 turns ordinary text into ids (openai/gpt-2 ``encoder.py``):

1. split the text into pre-tokens ("words") with ``GPT2_PATTERN``;
2. encode each word as UTF-8, one symbol per byte (the files spell byte b as the printable
   character ``BYTE_TO_CHAR[b]``, so the vocabulary and merges have no spaces or control characters);
3. repeatedly take the adjacent pair of symbols with the lowest rank (its line in ``vocab.bpe``)
   and merge all its non-overlapping occurrences, left to right, until no adjacent pair has a rank;
4. the remaining symbols are the tokens; their ids come from the encoder.

Here steps 2-4 run on ids rather than strings (same result, less work), and since words repeat a
lot in real text, each word's ids are kept in a bounded LRU cache per instance.

This module knows bytes, merge ranks and the ids of ordinary text. It does not know files, special
tokens such as ``<|endoftext|>``, padding or tensors: see ``vocab_files.py`` and ``gpt2_tokenizer.py``.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping, Sequence

import regex

# GPT-2's pre-tokeniser, exactly as in openai/gpt-2 encoder.py: contractions, optionally
# space-prefixed runs of letters / digits / other symbols, then whitespace. `\s+(?!\S)` leaves
# the last space of a run to prefix the following word, which is why " world" is one token.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Enough for the distinct words of a large working set; an LRU, so a long-running server that
# sees endless new words (ids, hashes, numbers) stays at this size instead of growing.
DEFAULT_CACHE_SIZE = 1 << 16

# The replacement character that lone surrogates become (see `_encode_word_uncached`).
REPLACEMENT_CHARACTER = "\ufffd"
_SURROGATE = regex.compile(r"[\ud800-\udfff]")

# Rank of a pair that never merges; larger than any real rank.
_NO_RANK = 1 << 62


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the other 68 (control characters, space, and a few
    Latin-1 gaps) map to U+0100 onwards in byte order, e.g. space (0x20) -> 'Ġ' (U+0120).
    """
    printable = {
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    }
    table: dict[int, str] = {}
    extra = 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR: dict[int, str] = bytes_to_unicode()
CHAR_TO_BYTE: dict[str, int] = {char: byte for byte, char in BYTE_TO_CHAR.items()}


def symbols_to_bytes(symbols: str) -> bytes:
    """The raw bytes a vocabulary string (in BYTE_TO_CHAR spelling) stands for."""
    return bytes(CHAR_TO_BYTE[char] for char in symbols)


class BytePairEncoding:
    """Ordinary text -> token ids with GPT-2's rank-ordered merges and a bounded word cache.

    ``encoder`` maps vocabulary strings (BYTE_TO_CHAR spelling) to ids; ``merges`` lists the symbol
    pairs in rank order (line order of ``vocab.bpe``). The merge loop works on ids, not strings: a
    pair of ids has a rank, and a rank says which id the pair becomes. Safe to share between threads:
    the cache is ``functools.lru_cache``, and nothing else changes after construction.
    """

    def __init__(
        self,
        *,
        encoder: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        missing = [byte for byte, char in BYTE_TO_CHAR.items() if char not in encoder]
        if missing:
            raise ValueError(
                f"the encoder lacks single-byte tokens for bytes {missing[:8]}"
                f"{'...' if len(missing) > 8 else ''}: a byte-level BPE vocabulary needs all 256"
            )
        self._byte_ids = [encoder[BYTE_TO_CHAR[byte]] for byte in range(256)]
        self._pair_ranks: dict[tuple[int, int], int] = {}
        self._rank_to_id: list[int] = []
        for rank, (first, second) in enumerate(merges):
            for symbol in (first, second, first + second):
                if symbol not in encoder:
                    raise ValueError(
                        f"merge #{rank} ({first!r}, {second!r}) needs {symbol!r}, which is not in the "
                        "encoder: the merges and the vocabulary do not belong together"
                    )
            # A repeated pair keeps its first (lowest) rank, as a rank lookup by pair would.
            self._pair_ranks.setdefault((encoder[first], encoder[second]), rank)
            self._rank_to_id.append(encoder[first + second])
        self._pattern = regex.compile(GPT2_PATTERN)
        # Per instance (not a module-level cache), so two vocabularies never share entries.
        self.encode_word = functools.lru_cache(maxsize=cache_size)(self._encode_word_uncached)

    def encode(self, text: str) -> list[int]:
        """Ids of ordinary text (special-token text gets no special treatment here)."""
        ids: list[int] = []
        extend = ids.extend
        encode_word = self.encode_word
        for word in self._pattern.findall(text):
            extend(encode_word(word))
        return ids

    def split(self, text: str) -> list[str]:
        """GPT-2's pre-tokens ("words") of ``text``."""
        return self._pattern.findall(text)

    def _encode_word_uncached(self, word: str) -> tuple[int, ...]:
        try:
            data = word.encode("utf-8")
        except UnicodeEncodeError:
            # Lone surrogates (U+D800..U+DFFF) have no UTF-8 form; each becomes U+FFFD. Doing it per
            # word equals doing it on the whole text first, because both a surrogate and U+FFFD fall
            # in the pattern's `[^\s\p{L}\p{N}]` class, so the split is the same either way.
            data = _SURROGATE.sub(REPLACEMENT_CHARACTER, word).encode("utf-8")
        return tuple(self.encode_bytes(data))

    def encode_bytes(self, data: bytes) -> list[int]:
        """The merge loop: ids of one word's bytes.

        Each round takes the lowest-ranked adjacent pair and merges every non-overlapping occurrence
        of it, left to right (openai/gpt-2 encoder.py's ``bpe``), until no adjacent pair has a rank.
        """
        byte_ids = self._byte_ids
        ids = [byte_ids[byte] for byte in data]
        get_rank = self._pair_ranks.get
        # ranks[i] is the rank of (ids[i], ids[i + 1]); a merge changes only its two neighbours, so
        # they are updated in place instead of re-ranking the whole word each round.
        ranks = [get_rank(pair, _NO_RANK) for pair in itertools.pairwise(ids)]
        while ranks:
            best = min(ranks)
            if best == _NO_RANK:
                break
            merged = self._rank_to_id[best]
            i = ranks.index(best)
            while True:
                ids[i : i + 2] = [merged]
                del ranks[i]
                if i > 0:
                    ranks[i - 1] = get_rank((ids[i - 1], merged), _NO_RANK)
                if i < len(ranks):
                    ranks[i] = get_rank((merged, ids[i + 1]), _NO_RANK)
                # A rank names one pair, and both new pairs contain `merged`, so any `best` left is
                # a later occurrence of the same pair that does not overlap this one.
                if best not in ranks:
                    break
                i = ranks.index(best, i + 1)
        return ids
