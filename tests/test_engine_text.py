"""Incremental output text: whole UTF-8 characters only, special tokens skipped, stop strings held back and cut."""

from hypothesis import given, settings
from hypothesis import strategies as st

from serving.engine.text import OutputText

SPECIAL = 256


def token_bytes(t: int) -> bytes:
    return b"<|endoftext|>" if t == SPECIAL else bytes([t])


def feed(tokens, stop=()):
    ot = OutputText(token_bytes, special_ids={SPECIAL}, stop=stop)
    pieces = []
    for t in tokens:
        pieces.append(ot.add(t))
        if ot.stopped:
            break
    pieces.append(ot.finish())
    return ot, pieces


def test_multibyte_characters_are_released_whole():
    data = "é😀".encode()
    ot, pieces = feed(list(data))
    assert pieces == ["", "é", "", "", "", "😀", ""]
    assert ot.text == "é😀"


def test_unfinished_character_becomes_replacement_at_the_end():
    ot, pieces = feed(list("a😀".encode())[:-1])
    assert "".join(pieces) == "a\ufffd" == ot.text


def test_special_tokens_are_skipped():
    ot, pieces = feed([104, SPECIAL, 105])
    assert ot.text == "hi" and "".join(pieces) == "hi"


def test_stop_string_prefix_is_held_back_then_released():
    ot, pieces = feed(list(b"ab-x"), stop=("-stop",))
    assert pieces == ["a", "b", "", "-x", ""]
    assert not ot.stopped


def test_stop_string_is_cut_with_everything_after_it():
    ot, pieces = feed(list(b"hello ENDworld"), stop=("END",))
    assert "".join(pieces) == "hello " == ot.text and ot.stopped


def test_the_stop_string_completing_first_wins():
    ot, _ = feed(list(b"xabcd"), stop=("abcd", "c"))
    assert ot.text == "xab"


def _reference(text: str, stops) -> str:
    for end in range(1, len(text) + 1):
        found = [(text.find(s), len(s)) for s in stops if text.find(s) >= 0]
        hits = [(i + n, i) for i, n in found if i + n <= end]
        if hits:
            return text[: min(hits)[1]]
    return text


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet="ab\u00e9\U0001F600 ", max_size=30),
    st.lists(st.text(alphabet="ab\u00e9 ", min_size=1, max_size=4), max_size=3),
)
def test_streamed_text_equals_the_cut_text_and_never_contains_a_stop(text, stops):
    ot, pieces = feed(list(text.encode()), stop=tuple(stops))
    streamed = "".join(pieces)
    assert streamed == ot.text == _reference(text, stops)
    acc = ""
    for p in pieces:
        acc += p
        assert not any(s in acc for s in stops)
