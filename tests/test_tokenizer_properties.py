"""Hypothesis round-trips over arbitrary Unicode, and the lone-surrogate rule.

The rule (tokenizer/gpt2_tokenizer.py): every surrogate code point U+D800..U+DFFF in a str is encoded
as U+FFFD, so decode(encode(s)) == s for s without surrogates, and s with each one replaced otherwise.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenizer import GPT2Tokenizer

TOK = GPT2Tokenizer.from_pretrained("gpt2")

# Characters that byte-level BPE splits across tokens, or that the pattern treats specially.
TRICKY = [
    "🎉",
    "👍🏽",
    "👨‍👩‍👧‍👦",
    "🇯🇵",
    "❤️",
    "1️⃣",
    "𪚥",
    "𠀋",
    "日本語",
    "한국어",
    "ｶﾀｶﾅ",
    "é",
    "e\u0301",
    "ß",
    "ﬁ",
    "Ω",
    "'s",
    "'ll",
    "'S",
    " ",
    "  ",
    "\t",
    "\n",
    "\r\n",
    "\u00a0",
    "\u3000",
    "\x85",
    "\u2028",
    "\x00",
    "\ufeff",
    "\ufffd",
    "123",
    "１２３",
    "Ⅻ",
    "<|endoftext|>",
    "<|",
    "|>",
]
SURROGATES = st.integers(0xD800, 0xDFFF).map(chr)
# Any code point but a surrogate; surrogates get their own strategy.
CHARACTERS = st.characters(exclude_categories=("Cs",))
TEXT = st.lists(st.one_of(CHARACTERS, st.sampled_from(TRICKY)), max_size=40).map("".join)
TEXT_WITH_SURROGATES = st.lists(st.one_of(CHARACTERS, st.sampled_from(TRICKY), SURROGATES), max_size=40).map("".join)

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def replace_surrogates(text: str) -> str:
    return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)


@PROPERTY
@given(TEXT)
def test_round_trip_without_surrogates(text: str) -> None:
    ids = TOK.encode(text, disallowed_special=())
    assert all(0 <= i < TOK.vocab_size for i in ids)
    assert TOK.decode(ids, errors="strict") == text
    assert TOK.decode_bytes(ids) == text.encode("utf-8")


@PROPERTY
@given(TEXT_WITH_SURROGATES)
def test_round_trip_with_lone_surrogates(text: str) -> None:
    ids = TOK.encode(text, disallowed_special=())
    assert TOK.decode(ids, errors="strict") == replace_surrogates(text)
    assert ids == TOK.encode(replace_surrogates(text), disallowed_special=())


@PROPERTY
@given(st.lists(st.one_of(TEXT, st.just("<|endoftext|>")), max_size=6))
def test_round_trip_with_allowed_special(parts: list[str]) -> None:
    text = "".join(parts)
    ids = TOK.encode(text, allowed_special="all")
    assert TOK.decode(ids) == text
    assert ids.count(TOK.eos_token_id) == text.count("<|endoftext|>")


@PROPERTY
@given(TEXT)
def test_same_ids_as_tiktoken(text: str) -> None:
    assert TOK.encode(text, disallowed_special=()) == _tiktoken().encode_ordinary(text)


@PROPERTY
@given(st.lists(st.one_of(TEXT_WITH_SURROGATES, st.just("<|endoftext|>")), max_size=6).map("".join))
def test_max_token_bytes_bounds_the_token_count(text: str) -> None:
    # What lets a server refuse a text before tokenizing it: N ids cover at most N * max_token_bytes
    # bytes, and a character is at least one byte (a lone surrogate three, as U+FFFD).
    ids = TOK.encode(text, allowed_special="all")
    assert len(ids) * TOK.max_token_bytes >= len(text.encode("utf-8", "surrogatepass")) >= len(text)


def test_surrogate_examples() -> None:
    assert TOK.decode(TOK.encode("a\ud800b")) == "a\ufffdb"
    # A high + low pair in a str is still two surrogate code points, so two replacement characters.
    assert TOK.decode(TOK.encode("\ud83d\ude00")) == "\ufffd\ufffd"
    assert TOK.encode("x\udfff") == TOK.encode("x\ufffd")


_TIKTOKEN = []


def _tiktoken():
    if not _TIKTOKEN:
        tiktoken = pytest.importorskip("tiktoken")
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks

        from tokenizer.gpt2_tokenizer import PRETRAINED_VOCABULARIES

        data = PRETRAINED_VOCABULARIES["gpt2"]
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(data / "vocab.bpe"), encoder_json_file=str(data / "encoder.json")
        )
        pattern = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
        _TIKTOKEN.append(
            tiktoken.Encoding(name="gpt2-shipped", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        )
    return _TIKTOKEN[0]
