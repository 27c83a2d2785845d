"""IncrementalDecoder: pieces that join to the full text and never hold half a character."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenizer import GPT2Tokenizer, IncrementalDecoder

TOK = GPT2Tokenizer.from_pretrained("gpt2")

# Rare CJK, emoji and ZWJ sequences: byte-level BPE splits their UTF-8 bytes across tokens.
SPLIT_TEXT = "𪚥𠀋 龘 👨‍👩‍👧‍👦 🫠 🇯🇵 naïve 日本語 Ω"


def stream(ids: list[int]) -> list[str]:
    decoder = IncrementalDecoder(TOK)
    return [decoder.add(i) for i in ids] + [decoder.flush()]


def test_characters_really_are_split_across_tokens() -> None:
    ids = TOK.encode(SPLIT_TEXT)
    partial = [i for i in ids if _is_incomplete_utf8(TOK.token_bytes(i))]
    assert len(partial) >= 5


def test_stream_emits_the_full_text_without_broken_characters() -> None:
    ids = TOK.encode(SPLIT_TEXT)
    pieces = stream(ids)
    assert "".join(pieces) == SPLIT_TEXT
    assert not any("\ufffd" in piece for piece in pieces)
    assert "" in pieces  # some tokens completed no character
    # Each piece is exactly the text completed so far: the decoded prefix minus held-back bytes.
    emitted = ""
    decoder = IncrementalDecoder(TOK)
    for n, token_id in enumerate(ids, start=1):
        emitted += decoder.add(token_id)
        prefix = TOK.decode_bytes(ids[:n])
        assert emitted.encode() + decoder.pending_bytes == prefix
        assert len(decoder.pending_bytes) <= 3


def test_flush_replaces_an_unfinished_character_and_resets() -> None:
    ids = TOK.encode("🎉")
    decoder = IncrementalDecoder(TOK)
    assert decoder.add(ids[0]) == ""
    assert decoder.flush() == "\ufffd"
    assert decoder.pending_bytes == b""
    assert [decoder.add(i) for i in ids] == ["", "", "🎉"]
    assert decoder.flush() == ""


def test_reset_drops_held_bytes() -> None:
    decoder = IncrementalDecoder(TOK)
    decoder.add(TOK.encode("🎉")[0])
    decoder.reset()
    assert decoder.add(TOK.encode("a")[0]) == "a"


def test_bad_id_is_refused_and_keeps_the_state() -> None:
    ids = TOK.encode("🎉")
    decoder = IncrementalDecoder(TOK)
    decoder.add(ids[0])
    with pytest.raises(ValueError, match="token id 99999"):
        decoder.add(99999)
    assert decoder.add(ids[1]) + decoder.add(ids[2]) == "🎉"


def test_special_token_streams_as_its_text() -> None:
    assert stream([31373, 50256]) == ["hello", "<|endoftext|>", ""]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(st.characters(exclude_categories=("Cs",)), st.sampled_from(["🎉", "👨‍👩‍👧‍👦", "𪚥", "日本", "é"])),
        max_size=40,
    ).map("".join)
)
def test_stream_of_any_text(text: str) -> None:
    pieces = stream(TOK.encode(text, disallowed_special=()))
    assert "".join(pieces) == text
    if "\ufffd" not in text:
        assert not any("\ufffd" in piece for piece in pieces)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, TOK.vocab_size - 1), max_size=40))
def test_stream_of_any_ids_equals_decode(ids: list[int]) -> None:
    # Arbitrary ids need not be valid UTF-8; the stream replaces exactly as decode() does.
    assert "".join(stream(ids)) == TOK.decode(ids)


def _is_incomplete_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False
