"""GPT2Tokenizer: golden ids, special tokens, decoding, errors, the padding call, loading and saving."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tokenizer import ENDOFTEXT, GPT2Tokenizer
from tokenizer.gpt2_tokenizer import PRETRAINED_VOCABULARIES

DATA = PRETRAINED_VOCABULARIES["gpt2"]


@pytest.fixture(scope="module")
def tok() -> GPT2Tokenizer:
    return GPT2Tokenizer.from_pretrained("gpt2")


# Ids from GPT-2's vocabulary, as OpenAI's encoder, tiktoken and Hugging Face all produce them.
GOLDEN = [
    ("hello world", [31373, 995]),
    ("Hello world", [15496, 995]),
    (" Hello world", [18435, 995]),
    ("Hello, world!", [15496, 11, 995, 0]),
    ("The quick brown fox jumps over the lazy dog.", [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]),
    ("I'm sure you're right, they'll see.", [40, 1101, 1654, 345, 821, 826, 11, 484, 1183, 766, 13]),
    ("\n\n", [628]),
    ("   ", [220, 220, 220]),
    ("x = 1234567", [87, 796, 17031, 2231, 3134]),
    ("naïve café", [2616, 38776, 40304]),
    ("日本語", [33768, 98, 17312, 105, 45739, 252]),
    ("🎉", [8582, 236, 231]),
    ("👍🏽", [41840, 235, 8582, 237, 121]),
    ("𪚥", [172, 103, 248, 98]),
    ("  leading", [220, 3756]),
    ("trailing  ", [9535, 4386, 220, 220]),
    ("tab\there", [8658, 197, 1456]),
    ("\r\n", [201, 198]),
    ("", []),
]


@pytest.mark.parametrize(("text", "ids"), GOLDEN)
def test_golden_ids(tok: GPT2Tokenizer, text: str, ids: list[int]) -> None:
    assert tok.encode(text) == ids
    assert tok.decode(ids) == text


def test_vocabulary_constants(tok: GPT2Tokenizer) -> None:
    assert tok.vocab_size == 50257
    assert tok.eos_token_id == 50256
    assert tok.pad_token_id == 50256
    assert tok.special_tokens == {ENDOFTEXT: 50256}
    assert tok.token_bytes(50256) == b"<|endoftext|>"
    assert tok.token_bytes(220) == b" "
    assert tok.token_bytes(995) == b" world"
    # A token may hold part of a UTF-8 character: '🎉' (F0 9F 8E 89) is three tokens.
    pieces = [tok.token_bytes(i) for i in (8582, 236, 231)]
    assert b"".join(pieces) == "🎉".encode()
    assert pieces[0] == b"\xf0\x9f"


# -- special tokens --------------------------------------------------------------------------------


def test_special_token_text_is_refused_by_default(tok: GPT2Tokenizer) -> None:
    with pytest.raises(ValueError, match=r"<\|endoftext\|>.*allowed_special.*disallowed_special=\(\)"):
        tok.encode("hi <|endoftext|> there")


def test_allowed_special_encodes_the_id(tok: GPT2Tokenizer) -> None:
    assert tok.encode(" <|endoftext|>", allowed_special={ENDOFTEXT}) == [220, 50256]
    assert tok.encode("<|endoftext|>", allowed_special="all") == [50256]
    text = "Hello<|endoftext|> world<|endoftext|>"
    assert tok.encode(text, allowed_special="all") == [15496, 50256, 995, 50256]
    assert tok.decode(tok.encode(text, allowed_special="all")) == text


def test_disallowed_special_empty_encodes_it_as_text(tok: GPT2Tokenizer) -> None:
    ids = tok.encode("<|endoftext|>", disallowed_special=())
    assert ids == [27, 91, 437, 1659, 5239, 91, 29]
    assert 50256 not in ids
    assert tok.decode(ids) == "<|endoftext|>"


def test_near_miss_special_text_is_ordinary(tok: GPT2Tokenizer) -> None:
    assert 50256 not in tok.encode("<|endoftext|")
    assert 50256 not in tok.encode("<|startoftext|>")


def test_bad_special_arguments(tok: GPT2Tokenizer) -> None:
    with pytest.raises(ValueError, match=r"unknown special tokens \['<\|startoftext\|>'\]"):
        tok.encode("x", allowed_special={"<|startoftext|>"})
    with pytest.raises(ValueError, match=r"allowed_special=\{'<\|endoftext\|>'\}"):
        tok.encode("x", allowed_special=ENDOFTEXT)  # a str, not a set
    with pytest.raises(ValueError, match="disallowed_special"):
        tok.encode("x", disallowed_special="none")


# -- decoding ----------------------------------------------------------------------------------------


def test_decode_bytes_and_errors(tok: GPT2Tokenizer) -> None:
    ids = tok.encode("🎉")
    assert tok.decode_bytes(ids) == "🎉".encode()
    assert tok.decode_bytes(ids[:1]) == "🎉".encode()[:2]
    assert tok.decode(ids[:1]) == "\ufffd"
    with pytest.raises(UnicodeDecodeError):
        tok.decode(ids[:1], errors="strict")
    assert tok.decode(np.array(ids, dtype=np.int64)) == "🎉"


@pytest.mark.parametrize("bad", [50257, -1, 10**9])
def test_ids_out_of_range_name_the_id(tok: GPT2Tokenizer, bad: int) -> None:
    with pytest.raises(ValueError, match=rf"token id {bad} at position 2 .*\[0, 50257\)"):
        tok.decode([31373, 995, bad])
    with pytest.raises(ValueError, match=rf"token id {bad} "):
        tok.token_bytes(bad)


def test_non_int_ids_are_refused(tok: GPT2Tokenizer) -> None:
    with pytest.raises(ValueError, match="token id '1'"):
        tok.decode(["1"])
    with pytest.raises(ValueError, match=r"token id \[1\]"):
        tok.decode([[1]])


def test_batches(tok: GPT2Tokenizer) -> None:
    texts = ["hello world", "", "日本語", "Hello, world!"]
    batch = tok.encode_batch(texts)
    assert batch == [tok.encode(text) for text in texts]
    assert tok.decode_batch(batch) == texts
    with pytest.raises(TypeError, match="encode_batch"):
        tok.encode(["hello"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="encode"):
        tok.encode_batch("hello")


# -- __call__: padding, truncation, attention mask ------------------------------------------------


def test_mindformers_call_shape_np(tok: GPT2Tokenizer) -> None:
    out = tok(["hello world"], padding="max_length", max_length=6, return_tensors="np")
    assert set(out) == {"input_ids", "attention_mask"}
    assert out["input_ids"].dtype == np.int32 and out["input_ids"].shape == (1, 6)
    assert out["attention_mask"].dtype == np.int32 and out["attention_mask"].shape == (1, 6)
    assert out["input_ids"].tolist() == [[31373, 995, 50256, 50256, 50256, 50256]]
    assert out["attention_mask"].tolist() == [[1, 1, 0, 0, 0, 0]]


def test_mindformers_call_shape_ms(tok: GPT2Tokenizer) -> None:
    ms = pytest.importorskip("mindspore")
    out = tok(["hello world", "Hello, world!"], padding="max_length", max_length=5, return_tensors="ms")
    assert isinstance(out["input_ids"], ms.Tensor)
    assert out["input_ids"].shape == (2, 5) and out["input_ids"].dtype == ms.int32
    assert out["attention_mask"].dtype == ms.int32
    assert out["input_ids"].asnumpy().tolist() == [[31373, 995, 50256, 50256, 50256], [15496, 11, 995, 0, 50256]]
    assert out["attention_mask"].asnumpy().tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]]


def test_call_lists_and_single_string(tok: GPT2Tokenizer) -> None:
    assert tok(["hello world", "Hello, world!"]) == {
        "input_ids": [[31373, 995], [15496, 11, 995, 0]],
        "attention_mask": [[1, 1], [1, 1, 1, 1]],
    }
    assert tok("hello world") == {"input_ids": [31373, 995], "attention_mask": [1, 1]}
    single = tok("hello world", padding="max_length", max_length=3, return_tensors="np")
    assert single["input_ids"].shape == (1, 3)


def test_padding_longest_and_left(tok: GPT2Tokenizer) -> None:
    out = tok(["hello world", "Hello, world!", ""], padding="longest")
    assert out["input_ids"] == [[31373, 995, 50256, 50256], [15496, 11, 995, 0], [50256] * 4]
    assert out["attention_mask"] == [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    assert tok(["hello world", "Hello, world!"], padding=True) == tok(
        ["hello world", "Hello, world!"], padding="longest"
    )
    left = tok(["hello world"], padding="max_length", max_length=4, padding_side="left", return_tensors="np")
    assert left["input_ids"].tolist() == [[50256, 50256, 31373, 995]]
    assert left["attention_mask"].tolist() == [[0, 0, 1, 1]]


def test_truncation(tok: GPT2Tokenizer) -> None:
    out = tok(["Hello, world!", "hello world"], truncation=True, max_length=3)
    assert out["input_ids"] == [[15496, 11, 995], [31373, 995]]
    out = tok(
        ["Hello, world!", "hello world"], truncation=True, padding="max_length", max_length=3, return_tensors="np"
    )
    assert out["input_ids"].tolist() == [[15496, 11, 995], [31373, 995, 50256]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_empty_batch(tok: GPT2Tokenizer) -> None:
    out = tok([], padding="max_length", max_length=4, return_tensors="np")
    assert out["input_ids"].shape == (0, 4)
    assert tok([], padding="longest", return_tensors="np")["input_ids"].shape == (0, 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"padding": "max"}, "padding must be"),
        ({"padding": 1}, "padding must be"),
        ({"padding": "max_length"}, "needs max_length"),
        ({"truncation": True}, "needs max_length"),
        ({"truncation": "yes", "max_length": 4}, "truncation must be"),
        ({"max_length": 4}, "has no effect"),
        ({"padding": "max_length", "max_length": 0}, "max_length must be a positive int"),
        (
            {"padding": "max_length", "max_length": 1},
            r"texts\[0\] has 2 tokens, more than max_length=1.*truncation=True",
        ),
        ({"return_tensors": "pt"}, "return_tensors must be one of"),
        ({"return_tensors": "np"}, "padding='longest' or padding='max_length'"),
        ({"padding": "longest", "padding_side": "middle"}, "padding_side"),
    ],
)
def test_call_errors(tok: GPT2Tokenizer, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tok(["hello world", "Hello, world!"], **kwargs)


def test_call_refuses_non_strings(tok: GPT2Tokenizer) -> None:
    with pytest.raises(TypeError, match=r"texts\[1\] is a int"):
        tok(["hello", 3])  # type: ignore[list-item]


def test_call_applies_special_token_rule(tok: GPT2Tokenizer) -> None:
    with pytest.raises(ValueError, match="allowed_special"):
        tok(["a<|endoftext|>"])
    assert tok(["a<|endoftext|>"], allowed_special="all")["input_ids"] == [[64, 50256]]


# -- loading, saving, cache ----------------------------------------------------------------------------


def test_from_pretrained_directory_in_both_spellings(tmp_path: Path, tok: GPT2Tokenizer) -> None:
    openai_dir, hf_dir = tmp_path / "openai", tmp_path / "hf"
    openai_dir.mkdir()
    hf_dir.mkdir()
    shutil.copy(DATA / "encoder.json", openai_dir / "encoder.json")
    shutil.copy(DATA / "vocab.bpe", openai_dir / "vocab.bpe")
    shutil.copy(DATA / "encoder.json", hf_dir / "vocab.json")
    shutil.copy(DATA / "vocab.bpe", hf_dir / "merges.txt")
    text = "Loading from a directory: naïve 日本語 🎉"
    for directory in (openai_dir, hf_dir, str(hf_dir)):
        assert GPT2Tokenizer.from_pretrained(directory).encode(text) == tok.encode(text)


def test_missing_vocab_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="has none of them"):
        GPT2Tokenizer.from_pretrained(tmp_path)
    shutil.copy(DATA / "encoder.json", tmp_path / "encoder.json")
    with pytest.raises(FileNotFoundError, match=r"has encoder\.json but is missing vocab\.bpe"):
        GPT2Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "encoder.json").rename(tmp_path / "vocab.json")
    with pytest.raises(FileNotFoundError, match=r"has vocab\.json but is missing merges\.txt"):
        GPT2Tokenizer.from_pretrained(tmp_path)


def test_unknown_name_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"'openai-community/gpt2' is neither a known vocabulary \('gpt2'\)"):
        GPT2Tokenizer.from_pretrained("openai-community/gpt2")
    with pytest.raises(FileNotFoundError, match="nor a directory"):
        GPT2Tokenizer.from_pretrained(tmp_path / "absent")


def test_bad_vocab_file_contents(tmp_path: Path) -> None:
    (tmp_path / "encoder.json").write_text('{"a": 0}', encoding="utf-8")
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\na b c\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: expected two symbols"):
        GPT2Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "encoder.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="must hold one JSON object"):
        GPT2Tokenizer.from_pretrained(tmp_path)


def test_save_pretrained_round_trip(tmp_path: Path, tok: GPT2Tokenizer) -> None:
    written = tok.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in written) == ["encoder.json", "merges.txt", "vocab.bpe", "vocab.json"]
    # The shipped files come back byte for byte, in both spellings.
    for name, original in [
        ("encoder.json", "encoder.json"),
        ("vocab.json", "encoder.json"),
        ("vocab.bpe", "vocab.bpe"),
        ("merges.txt", "vocab.bpe"),
    ]:
        assert (tmp_path / "out" / name).read_bytes() == (DATA / original).read_bytes(), name
    # Nothing but the four files: the temporary names were renamed away.
    assert sorted(os.listdir(tmp_path / "out")) == ["encoder.json", "merges.txt", "vocab.bpe", "vocab.json"]
    again = GPT2Tokenizer.from_pretrained(tmp_path / "out")
    assert again.encode("Saved and loaded 🎉") == tok.encode("Saved and loaded 🎉")
    tok.save_pretrained(tmp_path / "out")  # overwriting works


def test_word_cache_is_bounded() -> None:
    small = GPT2Tokenizer.from_pretrained("gpt2", cache_size=16)
    small.encode(" ".join(f"word{i}x" for i in range(500)))
    info = small._bpe.cache_info()
    assert info.maxsize == 16 and info.currsize <= 16
    default = GPT2Tokenizer.from_pretrained("gpt2")
    assert default._bpe.cache_info().maxsize is not None
    # No cache at all still encodes correctly.
    assert GPT2Tokenizer.from_pretrained("gpt2", cache_size=0).encode("hello world hello") == [31373, 995, 23748]
