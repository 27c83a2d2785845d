"""Long words: the two merge loops agree, long words cost linear-ish time, and stay out of the cache.

``BytePairEncoding.encode_bytes`` takes a plain O(n^2) loop for words up to ``SMALL_WORD_BYTES`` and a
heap for longer ones. Both must give the ids of the rule "merge the lowest-ranked adjacent pair, the
leftmost of equals, until none is left", written out here as ``reference_encode``. The comparison
with tiktoken on long words is in test_tokenizer_reference.py.
"""

from __future__ import annotations

import itertools
import random
import string
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import tokenizer.bpe as bpe_module
from tokenizer import GPT2Tokenizer
from tokenizer.bpe import BYTE_TO_CHAR, MAX_CACHED_WORD_BYTES, SMALL_WORD_BYTES, BytePairEncoding

TOK = GPT2Tokenizer.from_pretrained("gpt2")
ENCODER = TOK._encoder
MERGES = TOK._merges
CORPUS = Path(__file__).parent / "data" / "tokenizer_corpus"

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference_encode(encoder: dict[str, int], merges: list[tuple[str, str]], data: bytes) -> list[int]:
    """The rule itself, one merge per scan of the whole word (as tiktoken's _educational.py)."""
    ranks: dict[tuple[str, str], int] = {}
    for rank, pair in enumerate(merges):
        ranks.setdefault(pair, rank)
    symbols = [BYTE_TO_CHAR[byte] for byte in data]
    while True:
        candidates = [(ranks[pair], i) for i, pair in enumerate(zip(symbols, symbols[1:])) if pair in ranks]
        if not candidates:
            return [encoder[symbol] for symbol in symbols]
        _, i = min(candidates)
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]


def plain_loop(bpe: BytePairEncoding, data: bytes) -> list[int]:
    """encode_bytes with the short-word loop forced on for any length."""
    with mock.patch.object(bpe_module, "SMALL_WORD_BYTES", sys.maxsize):
        return bpe.encode_bytes(data)


# Words as they come: random bytes, UTF-8 text, runs of a few likely pieces, and long repeats of a
# short unit ("aaaa...", "ababab...", "    ..."), where many merges share one rank.
BYTE_WORDS = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=100).map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.lists(
        st.sampled_from([b"a", b"aa", b"b", b" ", b"\n", b"the", b"0", b"!", b"=", b"\xf0\x9f\x8e\x89", b"\xc3\xa9"]),
        max_size=300,
    ).map(b"".join),
    st.builds(lambda unit, count: unit * count, st.binary(min_size=1, max_size=3), st.integers(1, 700)),
)


@PROPERTY
@given(BYTE_WORDS)
@example(b"a" * 2000)
@example(b" " * 2000)
@example(b"ab" * 1000)
@example(b"0" * 1000 + b"1" * 1000)
@example("🎉".encode() * 500)
def test_heap_and_plain_loop_agree_on_gpt2(data: bytes) -> None:
    bpe = TOK._bpe
    heap = bpe._merge_heap(data)
    assert heap == plain_loop(bpe, data)
    assert heap == bpe.encode_bytes(data)
    if len(data) <= 300:
        assert heap == reference_encode(ENCODER, MERGES, data)
    assert b"".join(map(TOK.token_bytes, heap)) == data


@st.composite
def small_vocabularies(draw: st.DrawFn) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Merges over "ab" or "abc" in any rank order, so a merge may use a token that only a later merge
    makes, and one token may come from several merges: the cases where merge order matters most."""
    alphabet, longest = draw(st.sampled_from([("ab", 4), ("abc", 3)]))
    tokens = [
        "".join(letters) for size in range(2, longest + 1) for letters in itertools.product(alphabet, repeat=size)
    ]
    splits = [(token[:cut], token[cut:]) for token in tokens for cut in range(1, len(token))]
    # Most of the possible merges, shuffled: sparse random lists rarely hit an order that matters.
    merges = draw(st.permutations(splits))[: draw(st.integers(len(splits) // 2, len(splits)))]
    encoder = {char: byte for byte, char in BYTE_TO_CHAR.items()}
    for token in tokens:
        encoder[token] = len(encoder)
    return encoder, merges


ABC_WORDS = st.one_of(
    st.text(alphabet="abc", max_size=150).map(str.encode),
    st.builds(lambda unit, count: unit * count, st.sampled_from([b"a", b"ab", b"abc", b"aab"]), st.integers(1, 60)),
)


@PROPERTY
@given(small_vocabularies(), ABC_WORDS)
def test_heap_and_plain_loop_agree_on_any_merge_order(
    vocabulary: tuple[dict[str, int], list[tuple[str, str]]], data: bytes
) -> None:
    encoder, merges = vocabulary
    bpe = BytePairEncoding(encoder=encoder, merges=merges, cache_size=0)
    expected = reference_encode(encoder, merges, data)
    assert bpe._merge_heap(data) == expected
    assert plain_loop(bpe, data) == expected


def test_long_words_take_the_heap_and_short_ones_the_plain_loop() -> None:
    bpe = TOK._bpe
    with mock.patch.object(BytePairEncoding, "_merge_heap", side_effect=AssertionError("heap")):
        bpe.encode_bytes(b"x" * SMALL_WORD_BYTES)
        with pytest.raises(AssertionError, match="heap"):
            bpe.encode_bytes(b"x" * (SMALL_WORD_BYTES + 1))


# -- the word cache ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "cached"),
    [
        pytest.param("a" * MAX_CACHED_WORD_BYTES, True, id="ascii-at-bound"),
        pytest.param("a" * (MAX_CACHED_WORD_BYTES + 1), False, id="ascii-over"),
        pytest.param("é" * (MAX_CACHED_WORD_BYTES // 2), True, id="2-byte-at-bound"),
        pytest.param("é" * (MAX_CACHED_WORD_BYTES // 2 + 1), False, id="2-byte-over"),
        pytest.param("🎉" * (MAX_CACHED_WORD_BYTES // 4), True, id="4-byte-at-bound"),
        pytest.param("🎉" * (MAX_CACHED_WORD_BYTES // 4 + 1), False, id="4-byte-over"),
        # A lone surrogate is encoded as U+FFFD: 3 bytes.
        pytest.param("\ud800" * (MAX_CACHED_WORD_BYTES // 3), True, id="surrogates-at-bound"),
        pytest.param("\ud800" * (MAX_CACHED_WORD_BYTES // 3 + 1), False, id="surrogates-over"),
        pytest.param("x" * 100_000, False, id="100k"),
    ],
)
def test_only_words_up_to_max_cached_word_bytes_are_cached(word: str, cached: bool) -> None:
    tok = GPT2Tokenizer.from_pretrained("gpt2")
    assert len(tok._bpe.split(word)) == 1
    ids = tok.encode(word)
    assert tok._bpe.cache_info().currsize == int(cached)
    assert tok.encode(word) == ids
    assert tok._bpe.cache_info().hits == int(cached)
    assert ids == list(TOK._bpe._encode_word_uncached(word))


# -- max_token_bytes --------------------------------------------------------------------------------


def test_max_token_bytes_is_the_longest_token() -> None:
    longest = max(len(TOK.token_bytes(token_id)) for token_id in range(TOK.vocab_size))
    assert TOK.max_token_bytes == longest == 128
    assert TOK._bpe.max_token_bytes == 128
    # The bound is tight: N copies of the longest token are N * max_token_bytes bytes in N ids.
    longest_token = next(token for token in map(TOK.token_bytes, range(TOK.vocab_size)) if len(token) == 128)
    assert len(TOK.encode((longest_token * 3).decode("utf-8"))) == 3


# -- time -----------------------------------------------------------------------------------------

LENGTH = 100_000
# Measured (a shared 2-core machine, process time, best of 3, cache off): every input below takes
# 0.2-2.2x the time of Hamlet's first 100,000 characters (0.11 s); the old O(n^2) merge loop took
# 17-160x at 10,000 characters, and 24 s (220x) for 100,000 random letters.
MAX_RATIO = 10


def _random(alphabet: str | list[str]) -> str:
    rng = random.Random(0)
    return "".join(rng.choice(alphabet) for _ in range(LENGTH))


# Single words for the merge loop, and runs that the pre-tokeniser's pattern must cross in linear time
# (spaces before a letter, one punctuation character, digits, emoji, combining marks): measured, the
# pattern alone takes 10x as long for 100,000 characters as for 10,000 on each of them.
HOSTILE = {
    "random letters": lambda: _random(string.ascii_letters),
    "one letter": lambda: "a" * LENGTH,
    "spaces then a letter": lambda: " " * LENGTH + "a",
    "one punctuation character": lambda: "!" * LENGTH,
    "random punctuation": lambda: _random("!#$%&()*+,-./:;<=>?@[]^_`{|}~"),
    "random digits": lambda: _random(string.digits),
    "random emoji": lambda: _random([chr(c) for c in range(0x1F300, 0x1F650)]),
    "combining marks": lambda: "\u0301" * LENGTH,
    "random CJK": lambda: _random([chr(c) for c in range(0x4E00, 0xA000)]),
}


def _seconds(bpe: BytePairEncoding, text: str, *, tries: int) -> float:
    """Best process time of a few encodes (process time: other processes on the machine do not count)."""
    best = float("inf")
    for _ in range(tries):
        start = time.process_time()
        bpe.encode(text)
        best = min(best, time.process_time() - start)
    return best


@pytest.fixture(scope="module")
def uncached() -> BytePairEncoding:
    # No cache, so English pays for every word as a hostile input does: the ratio compares merge work.
    return BytePairEncoding(encoder=ENCODER, merges=MERGES, cache_size=0)


@pytest.fixture(scope="module")
def english_seconds(uncached: BytePairEncoding) -> float:
    text = (CORPUS / "shakespeare_hamlet.txt").read_text(encoding="utf-8")[:LENGTH]
    assert len(text) == LENGTH
    return _seconds(uncached, text, tries=3)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_input_costs_about_as_much_as_english(
    name: str, uncached: BytePairEncoding, english_seconds: float
) -> None:
    text = HOSTILE[name]()
    assert len(text) >= LENGTH
    bound = MAX_RATIO * english_seconds
    seconds = _seconds(uncached, text, tries=1)
    if bound < seconds < 3 * bound:
        # Near the bound: maybe a noisy run, so take the best of three.
        seconds = min(seconds, _seconds(uncached, text, tries=2))
    assert seconds <= bound, (
        f"{name}: {seconds:.3f} s for {len(text)} characters, {seconds / english_seconds:.1f}x "
        f"English text of the same length ({english_seconds:.3f} s); the bound is {MAX_RATIO}x"
    )
