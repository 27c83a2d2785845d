"""Reading and writing GPT-2 vocabulary files.

Two spellings of the same vocabulary exist, and a directory may hold either (or both):

- OpenAI's ``encoder.json`` (vocabulary string -> id) and ``vocab.bpe`` (``#version`` line, then one
  merge per line: two symbols separated by one space, in rank order);
- Hugging Face's ``vocab.json`` and ``merges.txt``, with the same content under other names.

Strings are in GPT-2's byte-to-unicode spelling (see ``bpe.py``). Files are written in place: four files
cannot be replaced together by renaming each, so a writer that needs the set complete or absent writes into a
temporary directory and renames that (a model directory is written so).

This module knows file names and formats. It does not know how the merges are applied.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

OPENAI_FILES = ("encoder.json", "vocab.bpe")
HF_FILES = ("vocab.json", "merges.txt")
MERGES_HEADER = "#version: 0.2"


def find_vocab_files(directory: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(encoder file, merges file) in ``directory``: OpenAI's names first, else Hugging Face's.

    Raises FileNotFoundError naming what is missing when neither pair is complete.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"vocabulary directory {str(directory)!r} does not exist or is not a directory")
    for encoder_name, merges_name in (OPENAI_FILES, HF_FILES):
        encoder_path, merges_path = directory / encoder_name, directory / merges_name
        if encoder_path.is_file() and merges_path.is_file():
            return encoder_path, merges_path
    present = sorted(name for name in (*OPENAI_FILES, *HF_FILES) if (directory / name).is_file())
    missing = []
    for pair in (OPENAI_FILES, HF_FILES):
        if any(name in present for name in pair):
            missing += [name for name in pair if name not in present]
    detail = f"it has {', '.join(present)} but is missing {', '.join(missing)}" if present else "it has none of them"
    raise FileNotFoundError(
        f"vocabulary directory {str(directory)!r} needs encoder.json + vocab.bpe or vocab.json + merges.txt; {detail}"
    )


def read_encoder(path: str | os.PathLike[str]) -> dict[str, int]:
    """The vocabulary string -> id map from ``encoder.json`` / ``vocab.json``."""
    with open(path, encoding="utf-8") as f:
        try:
            encoder = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{os.fspath(path)!r} is not valid JSON: {e}") from None
    if not isinstance(encoder, dict) or not all(
        isinstance(token, str) and type(token_id) is int for token, token_id in encoder.items()
    ):
        raise ValueError(f"{os.fspath(path)!r} must hold one JSON object mapping token strings to integer ids")
    return encoder


def read_merges(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """The merges, in rank order, from ``vocab.bpe`` / ``merges.txt``."""
    with open(path, encoding="utf-8", newline="") as f:
        lines = f.read().split("\n")
    merges: list[tuple[str, str]] = []
    for number, line in enumerate(lines, start=1):
        line = line.rstrip("\r")
        if not line or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise ValueError(
                f"{os.fspath(path)!r} line {number}: expected two symbols separated by one space, got {line!r}"
            )
        merges.append((parts[0], parts[1]))
    return merges


def write_vocab_files(
    directory: str | os.PathLike[str],
    *,
    encoder: Mapping[str, int],
    merges: Sequence[tuple[str, str]],
) -> tuple[Path, ...]:
    """Write all four files (both spellings) into ``directory``, creating it; returns their paths.

    ``encoder.json`` is written the way OpenAI wrote it (``json.dumps`` defaults), so saving the
    shipped vocabulary reproduces its files byte for byte.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    encoder_text = json.dumps(dict(encoder))
    merges_text = "".join(f"{line}\n" for line in [MERGES_HEADER, *(f"{a} {b}" for a, b in merges)])
    written = []
    for encoder_name, merges_name in (OPENAI_FILES, HF_FILES):
        for path, text in ((directory / encoder_name, encoder_text), (directory / merges_name, merges_text)):
            path.write_text(text, encoding="utf-8", newline="")
            written.append(path)
    return tuple(written)
