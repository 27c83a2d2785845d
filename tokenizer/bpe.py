"""GPT-2's byte-level BPE: the byte-to-unicode table, the pre-tokenisation pattern and the merge loop.

How GPT-2 turns ordinary text into ids (openai/gpt-2 ``encoder.py``):

1. split the text into pre-tokens ("words") with ``GPT2_PATTERN``;
2. encode each word as UTF-8, one symbol per byte (the files spell byte b as the printable
   character ``BYTE_TO_CHAR[b]``, so the vocabulary and merges have no spaces or control characters);
3. repeatedly take the adjacent pair of symbols with the lowest rank (its line in ``vocab.bpe``)
   and merge all its non-overlapping occurrences, left to right, until no adjacent pair has a rank;
4. the remaining symbols are the tokens; their ids come from the encoder.

Here steps 2-4 run on ids rather than strings (same result, less work), one merge at a time in
tiktoken's order: the lowest-ranked pair, the leftmost of equals. (Merging every occurrence at once,
as step 3 says, gives the same ids whenever each token comes from one merge, ranked below every merge
that uses it, as in GPT-2's vocab.bpe.) Short words, nearly all of real text, take a plain loop over a list of ranks,
O(n^2) in the word's length; longer ones a heap over a linked list, O(n log n), so a 100,000-letter
word takes 0.1 s instead of 25 s. Since words repeat a lot in real text, the ids of each word of up
to ``MAX_CACHED_WORD_BYTES`` bytes are kept in a bounded LRU cache per instance.

This module knows bytes, merge ranks and the ids of ordinary text. It does not know files, special
tokens such as ``<|endoftext|>``, padding or tensors: see ``vocab_files.py`` and ``gpt2_tokenizer.py``.
"""

from __future__ import annotations

import functools
import heapq
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

# An entry holds the word and its ids, so it is as large as the word: with no bound, a client could
# fill the 65,536 entries with 2 MB words (130 GB). Real words are short (99.95% of the test corpus's
# are at most 48 bytes) and a long word rarely repeats, so longer words skip the cache. A full cache of
# 256-byte words holds about 160 MB (measured: 65,536 words of 64 random CJK Extension B characters,
# 255 ids each), and re-encoding such a word costs about 0.1-0.2 ms.
MAX_CACHED_WORD_BYTES = 256

# Words of at most this many bytes take the plain merge loop, longer ones the heap. Measured on the
# words of tests/data/tokenizer_corpus and on random ones, the plain loop wins up to about 24 bytes,
# the two are even at 24-48, and the heap wins from 48 (2x at 128 bytes, 4x at 256).
SMALL_WORD_BYTES = 32

# The replacement character that lone surrogates become (see `_encode_word_uncached`).
REPLACEMENT_CHARACTER = "\ufffd"
_SURROGATE = regex.compile(r"[\ud800-\udfff]")

# Rank of a pair that never merges; larger than any real rank.
_NO_RANK = 1 << 62

# A word of at most this many characters (4 UTF-8 bytes at most each) needs no byte count to be cached.
_ALWAYS_CACHEABLE_CHARS = MAX_CACHED_WORD_BYTES // 4


class _LongWord(Exception):
    """A word over MAX_CACHED_WORD_BYTES, refused by the cached function so that it is not cached."""


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

    ``max_token_bytes`` is the byte length of the longest token ``encode`` can produce, so a text of
    more than ``N * max_token_bytes`` UTF-8 bytes (or characters) has more than N ids. ``cache_info()``
    is the word cache's ``functools`` statistics.
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
        # Every token the merge loop can produce is a single byte or a merge result, whose symbols
        # are one byte each in BYTE_TO_CHAR spelling.
        self.max_token_bytes = max((len(first) + len(second) for first, second in merges), default=1)
        self._pattern = regex.compile(GPT2_PATTERN)
        # Per instance (not a module-level cache), so two vocabularies never share entries.
        self._cached_word = functools.lru_cache(maxsize=cache_size)(self._encode_cacheable_word)
        self.cache_info = self._cached_word.cache_info

    def encode(self, text: str) -> list[int]:
        """Ids of ordinary text (special-token text gets no special treatment here)."""
        ids: list[int] = []
        extend = ids.extend
        cached_word = self._cached_word
        for word in self._pattern.findall(text):
            # The cached function refuses long words on a miss, rather than a length check here,
            # which would cost 5% on cached text; `try` costs nothing until something raises.
            try:
                extend(cached_word(word))
            except _LongWord:
                extend(self._encode_word_uncached(word))
        return ids

    def encode_word(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-token; cached when its UTF-8 form has at most MAX_CACHED_WORD_BYTES bytes."""
        try:
            return self._cached_word(word)
        except _LongWord:
            return self._encode_word_uncached(word)

    def split(self, text: str) -> list[str]:
        """GPT-2's pre-tokens ("words") of ``text``."""
        return self._pattern.findall(text)

    def _encode_cacheable_word(self, word: str) -> tuple[int, ...]:
        # Called on a cache miss only; lru_cache keeps no result when this raises.
        if len(word) > _ALWAYS_CACHEABLE_CHARS and (
            len(word) > MAX_CACHED_WORD_BYTES
            # "surrogatepass" spells a lone surrogate in 3 bytes, as its replacement U+FFFD takes.
            or (not word.isascii() and len(word.encode("utf-8", "surrogatepass")) > MAX_CACHED_WORD_BYTES)
        ):
            raise _LongWord
        return self._encode_word_uncached(word)

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

        Repeatedly merges the lowest-ranked adjacent pair, the leftmost of equal ones, until no
        adjacent pair has a rank (tiktoken's order). Words longer than SMALL_WORD_BYTES go to
        ``_merge_heap``, which gives the same ids (tests/test_tokenizer_long_words.py).
        """
        if len(data) > SMALL_WORD_BYTES:
            return self._merge_heap(data)
        # O(n^2) in the word's length, but the fewest Python steps per merge (min() and index() run
        # in C), which makes it the faster loop for short words.
        byte_ids = self._byte_ids
        ids = [byte_ids[byte] for byte in data]
        get_rank = self._pair_ranks.get
        rank_to_id = self._rank_to_id
        # ranks[i] is the rank of (ids[i], ids[i + 1]); a merge changes only its two neighbours, so
        # they are updated in place instead of re-ranking the whole word each round.
        ranks = [get_rank(pair, _NO_RANK) for pair in itertools.pairwise(ids)]
        while ranks:
            best = min(ranks)
            if best == _NO_RANK:
                break
            i = ranks.index(best)
            merged = ids[i] = rank_to_id[best]
            del ids[i + 1]
            del ranks[i]
            if i > 0:
                ranks[i - 1] = get_rank((ids[i - 1], merged), _NO_RANK)
            if i < len(ranks):
                ranks[i] = get_rank((merged, ids[i + 1]), _NO_RANK)
        return ids

    def _merge_heap(self, data: bytes) -> list[int]:
        # The same merges in O(n log n): symbols form a linked list indexed by the position of
        # their first byte, and a heap holds (rank, position) of the candidate pairs, packed into
        # one int so that the heap compares ints. A merge changes the pairs on its two sides; their
        # old heap entries are not removed but skipped when popped, because ranks[position] no
        # longer matches.
        n = len(data)
        byte_ids = self._byte_ids
        ids = [byte_ids[byte] for byte in data]
        get_rank = self._pair_ranks.get
        rank_to_id = self._rank_to_id
        heappush, heappop = heapq.heappush, heapq.heappop
        shift = n.bit_length()
        mask = (1 << shift) - 1
        # ranks[p]: rank of the pair that starts at symbol p (_NO_RANK for none, or a merged-away p).
        ranks = [get_rank(pair, _NO_RANK) for pair in itertools.pairwise(ids)]
        ranks.append(_NO_RANK)
        heap = [rank << shift | position for position, rank in enumerate(ranks) if rank != _NO_RANK]
        heapq.heapify(heap)
        # next_[p] / prev[p]: the neighbouring live symbols (n past the end, -1 before the start).
        next_ = list(range(1, n + 1))
        prev = list(range(-1, n - 1))
        while heap:
            entry = heappop(heap)
            position = entry & mask
            rank = entry >> shift
            if ranks[position] != rank:
                continue
            merged = rank_to_id[rank]
            ids[position] = merged
            right = next_[position]
            ranks[right] = _NO_RANK
            after = next_[right]
            next_[position] = after
            if after < n:
                prev[after] = position
                new_rank = ranks[position] = get_rank((merged, ids[after]), _NO_RANK)
                if new_rank != _NO_RANK:
                    heappush(heap, new_rank << shift | position)
            else:
                ranks[position] = _NO_RANK
            left = prev[position]
            if left >= 0:
                new_rank = ranks[left] = get_rank((ids[left], merged), _NO_RANK)
                if new_rank != _NO_RANK:
                    heappush(heap, new_rank << shift | left)
        result: list[int] = []
        position = 0
        while position < n:
            result.append(ids[position])
            position = next_[position]
        return result
