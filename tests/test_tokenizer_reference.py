"""Same ids as tiktoken and Hugging Face `tokenizers` on over 1 MB of varied real text.

Both references are built offline from the shipped vocabulary files (never from a hub). The corpus
(tests/data/tokenizer_corpus, sources in tests/data/README.md) is compared in chunks of lines so a
mismatch says which file and lines, and each whole file is compared too, because the pre-tokeniser's
whitespace rule can join a line's end to the next line.
"""

from __future__ import annotations

import random
import shutil
import string
from pathlib import Path

import pytest

from tokenizer import GPT2Tokenizer
from tokenizer.gpt2_tokenizer import PRETRAINED_VOCABULARIES

tiktoken = pytest.importorskip("tiktoken")
tiktoken_load = pytest.importorskip("tiktoken.load")
tokenizers = pytest.importorskip("tokenizers")

DATA = PRETRAINED_VOCABULARIES["gpt2"]
CORPUS = Path(__file__).parent / "data" / "tokenizer_corpus"
LINES_PER_CHUNK = 100
# tiktoken's own spelling of GPT-2's pattern, so the reference does not reuse ours.
R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


@pytest.fixture(scope="module")
def tok() -> GPT2Tokenizer:
    return GPT2Tokenizer.from_pretrained("gpt2")


@pytest.fixture(scope="module")
def tiktoken_gpt2():
    ranks = tiktoken_load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(DATA / "vocab.bpe"), encoder_json_file=str(DATA / "encoder.json")
    )
    return tiktoken.Encoding(
        name="gpt2-shipped", pat_str=R50K_PATTERN, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256}
    )


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("hf-vocab")
    # Hugging Face's names for the same two files.
    shutil.copy(DATA / "encoder.json", directory / "vocab.json")
    shutil.copy(DATA / "vocab.bpe", directory / "merges.txt")
    hf = tokenizers.Tokenizer(
        tokenizers.models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt"))
    )
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = tokenizers.decoders.ByteLevel()
    return hf


def corpus_files() -> list[Path]:
    return sorted(CORPUS.glob("*.txt"))


def test_corpus_is_large_and_varied() -> None:
    files = corpus_files()
    sizes = {path.name: path.stat().st_size for path in files}
    assert sum(sizes.values()) >= 1_000_000
    text = "".join(path.read_bytes().decode("utf-8") for path in files)
    for sample in ("HAMLET", "def ", "日本語", "🇯🇵", "é", "１２３", "    ", "\t", "\r\n", "Русский", "<|endoftext|>"):
        assert sample in text, sample


def _mismatches(name: str, text: str, ours, reference, decode) -> list[str]:
    """One line per chunk of the file where the two id lists differ, saying where and how."""
    lines = text.splitlines(keepends=True)
    found = []
    for start in range(0, len(lines), LINES_PER_CHUNK):
        chunk = "".join(lines[start : start + LINES_PER_CHUNK])
        a, b = ours(chunk), reference(chunk)
        if a != b:
            i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            found.append(
                f"{name} lines {start + 1}-{start + LINES_PER_CHUNK}: ids differ from #{i}, "
                f"ours {a[i : i + 5]} vs reference {b[i : i + 5]}, text {decode(a[max(0, i - 3) : i + 5])!r}"
            )
    if not found and ours(text) != reference(text):
        found.append(f"{name}: every chunk agrees but the whole file differs (whitespace across a chunk boundary?)")
    return found


@pytest.mark.parametrize("reference_name", ["tiktoken", "tokenizers"])
def test_same_ids_as_reference_on_corpus(tok, tiktoken_gpt2, hf_gpt2, reference_name: str) -> None:
    references = {"tiktoken": tiktoken_gpt2.encode_ordinary, "tokenizers": lambda text: hf_gpt2.encode(text).ids}
    reference = references[reference_name]
    ours = lambda text: tok.encode(text, disallowed_special=())  # noqa: E731
    mismatches = []
    for path in corpus_files():
        mismatches += _mismatches(path.name, path.read_bytes().decode("utf-8"), ours, reference, tok.decode)
    assert not mismatches, "\n".join(mismatches[:20])


def test_special_tokens_agree_with_tiktoken(tok, tiktoken_gpt2) -> None:
    text = "one<|endoftext|> two <|endoftext|>\n<|endoftext|>"
    assert tok.encode(text, allowed_special="all") == tiktoken_gpt2.encode(text, allowed_special="all")
    with pytest.raises(ValueError):
        tiktoken_gpt2.encode(text)
    with pytest.raises(ValueError):
        tok.encode(text)


def _random_text(seed: int, alphabet: str | list[str], length: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(alphabet) for _ in range(length))


# Single words far longer than real ones, which take the heap merge loop (tokenizer/bpe.py).
LONG_WORDS = {
    "random letters": _random_text(1, string.ascii_letters, 100_000),
    "random lowercase": _random_text(2, string.ascii_lowercase, 20_000),
    "one letter": "a" * 100_000,
    "space-prefixed": " " + _random_text(3, "ab", 20_000),
    "spaces": " " * 20_000,
    "random digits": _random_text(4, string.digits, 20_000),
    "random punctuation": _random_text(5, "!#$%&()*+,-./:;<=>?@[]^_`{|}~", 20_000),
    "random emoji": _random_text(6, [chr(c) for c in range(0x1F300, 0x1F650)], 10_000),
    "random CJK": _random_text(7, [chr(c) for c in range(0x4E00, 0xA000)], 10_000),
    "random accented letters": _random_text(8, [chr(c) for c in range(0xC0, 0x250) if chr(c).isalpha()], 10_000),
    "combining marks": "e" + "\u0301" * 20_000,
    "repeated unit": "abc" * 10_000,
}


@pytest.mark.parametrize("name", list(LONG_WORDS))
def test_long_words_agree_with_tiktoken(tok, tiktoken_gpt2, name: str) -> None:
    text = LONG_WORDS[name]
    assert len(tok._bpe.split(text)) <= 2
    assert tok.encode(text) == tiktoken_gpt2.encode_ordinary(text)
