"""Text files -> MindRecord training samples of `seq_length + 1` GPT-2 tokens.

    python tools/prepare_data.py --input corpus/ --output data/corpus-256 --seq_length 256

Inputs are text files, folders of them (files matching `--pattern`, searched recursively, in name order) or
WikiText-style raw files (`*.raw`, or `--format wikitext`), whose ` = Title = ` lines start new articles.
Each document is tokenized, documents are joined with <|endoftext|> (one after every document), and the
stream is cut into non-overlapping samples of seq_length + 1 tokens (inputs and shifted labels, as MindFormers
expects); the tail shorter than one sample is dropped and counted in the summary.

The validation split holds whole documents (chosen with `--seed`) when there are at least two, otherwise the
last `--val_fraction` of the single document's tokens; `--validation FILE...` gives it explicitly instead
(WikiText's wiki.valid.raw). The output directory holds train.mindrecord, validation.mindrecord (each with
its .db index) and meta.json; it is written under a temporary name and renamed when complete
(`model.atomic_write`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from tqdm import tqdm

from model.atomic_write import write_atomically

FORMATS = ("auto", "text", "wikitext")
COLUMN = "input_ids"
_WRITE_CHUNK = 1024  # samples per write_raw_data call
# A WikiText article starts at a top-level heading line " = Title = " (sub-headings are " = = ... = = ").
_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")


class DataError(ValueError):
    """Input that cannot become a dataset: missing, empty, not UTF-8, or too short for one sample."""


@dataclass(frozen=True)
class Document:
    name: str  # file path, with "#n" for the n-th WikiText article
    text: str


@dataclass
class SplitSummary:
    documents: int = 0
    tokens: int = 0
    samples: int = 0
    dropped_tokens: int = 0  # the tail shorter than one sample


@dataclass
class Summary:
    output_dir: str
    seq_length: int
    split_method: str  # "documents" | "tail" | "explicit" | "none"
    skipped_empty: int
    train: SplitSummary
    validation: SplitSummary

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format(self) -> str:
        lines = [f"wrote {self.output_dir} (seq_length {self.seq_length}, samples of {self.seq_length + 1} tokens)"]
        for name, s in (("train", self.train), ("validation", self.validation)):
            lines.append(
                f"  {name:<10} {s.documents:>7} documents {s.tokens:>11,} tokens {s.samples:>8,} samples"
                f" ({s.dropped_tokens} tail tokens dropped)"
            )
        lines.append(f"  split: {self.split_method}; empty documents skipped: {self.skipped_empty}")
        return "\n".join(lines)


def list_files(inputs: Sequence[str | os.PathLike], pattern: str = "*.txt") -> list[Path]:
    """The files named, and the files matching `pattern` under the folders named, in a stable order."""
    if not inputs:
        raise DataError("no input given: name text files or folders with --input")
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob(pattern) if p.is_file())
            if not found:
                raise DataError(f"folder {path} has no files matching {pattern!r} (set --pattern)")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"input {path} does not exist")
    return files


def read_documents(files: Iterable[Path], *, fmt: str = "auto") -> list[Document]:
    """One document per text file; one per article for WikiText files."""
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    docs: list[Document] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text (byte {e.start}): convert it or leave it out") from None
        is_wikitext = fmt == "wikitext" or (fmt == "auto" and path.suffix in (".raw", ".tokens"))
        if is_wikitext:
            docs.extend(Document(f"{path}#{i}", t) for i, t in enumerate(split_wikitext(text)))
        else:
            docs.append(Document(str(path), text))
    return docs


def split_wikitext(text: str) -> list[str]:
    """Cut a WikiText raw file into articles at its top-level ` = Title = ` lines."""
    articles: list[list[str]] = []
    for line in text.splitlines(keepends=True):
        if _WIKITEXT_TITLE.match(line.rstrip("\n")) or not articles:
            articles.append([])
        articles[-1].append(line)
    return ["".join(a) for a in articles]


def tokenize_documents(docs: Sequence[Document], tokenizer: Any, *, progress: bool = True) -> list[list[int]]:
    """Each document's token ids followed by <|endoftext|>."""
    eos = tokenizer.eos_token_id
    out = []
    for doc in tqdm(docs, desc="tokenizing", unit="doc", disable=not progress or not docs):
        try:
            ids = tokenizer.encode(doc.text)
        except ValueError as e:
            raise DataError(f"{doc.name}: {e}") from None
        out.append(list(ids) + [eos])
    return out


def to_samples(streams: Sequence[Sequence[int]], seq_length: int) -> tuple[np.ndarray, int]:
    """Concatenate token lists and cut them into (n, seq_length + 1) int32 rows; returns (rows, dropped tail)."""
    flat = np.fromiter((t for s in streams for t in s), dtype=np.int32)
    width = seq_length + 1
    n = len(flat) // width
    return flat[: n * width].reshape(n, width), len(flat) - n * width


def write_mindrecord(path: Path, samples: np.ndarray) -> None:
    from mindspore.mindrecord import FileWriter

    writer = FileWriter(str(path), shard_num=1, overwrite=True)
    writer.add_schema({COLUMN: {"type": "int32", "shape": [-1]}}, "gpt2 language-model samples")
    for start in range(0, len(samples), _WRITE_CHUNK):
        writer.write_raw_data([{COLUMN: row} for row in samples[start : start + _WRITE_CHUNK]])
    writer.commit()


def prepare(
    *,
    inputs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    seq_length: int,
    val_fraction: float = 0.05,
    validation_inputs: Sequence[str | os.PathLike] | None = None,
    fmt: str = "auto",
    pattern: str = "*.txt",
    seed: int = 0,
    overwrite: bool = False,
    tokenizer: Any = None,
    progress: bool = True,
    require_validation: bool = True,
) -> Summary:
    """Build the train/validation MindRecord files in `output_dir`; see the module docstring.

    With `require_validation=False` a validation split too short for one sample is left out instead of
    being an error (the Trainer API does this for small texts).
    """
    if seq_length <= 0:
        raise DataError(f"seq_length must be positive, got {seq_length}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = Path(output_dir)
    _check_output(out, overwrite=overwrite)
    if tokenizer is None:
        from tokenizer import GPT2Tokenizer

        tokenizer = GPT2Tokenizer.from_pretrained("gpt2")

    docs, skipped = _non_empty(read_documents(list_files(inputs, pattern), fmt=fmt))
    if not docs:
        raise DataError(f"the inputs hold no text ({skipped} empty documents)")
    if validation_inputs:
        val_docs, val_skipped = _non_empty(read_documents(list_files(validation_inputs, pattern), fmt=fmt))
        skipped += val_skipped
        method = "explicit"
    elif val_fraction == 0.0:
        val_docs, method = [], "none"
    elif len(docs) >= 2:
        n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
        chosen = set(np.random.default_rng(seed).choice(len(docs), size=n_val, replace=False).tolist())
        val_docs = [d for i, d in enumerate(docs) if i in chosen]
        docs = [d for i, d in enumerate(docs) if i not in chosen]
        method = "documents"
    else:
        val_docs, method = [], "tail"

    train_ids = tokenize_documents(docs, tokenizer, progress=progress)
    val_ids = tokenize_documents(val_docs, tokenizer, progress=progress)
    if method == "tail":
        # One document: its last val_fraction of tokens become the validation text.
        stream = train_ids[0]
        cut = len(stream) - max(1, int(len(stream) * val_fraction))
        train_ids, val_ids = [stream[:cut]], [stream[cut:]]

    n_docs = (1, 1) if method == "tail" else (len(docs), len(val_docs))
    train_rows, train_drop = to_samples(train_ids, seq_length)
    val_rows, val_drop = to_samples(val_ids, seq_length)
    if method in ("tail", "documents") and len(val_rows) == 0 and not require_validation:
        # Too little text for a validation sample: train on all of it instead.
        train_ids, val_ids, method = train_ids + val_ids, [], "none"
        n_docs = (1 if len(docs) + len(val_docs) == 1 else n_docs[0] + n_docs[1], 0)
        val_docs = []
        train_rows, train_drop = to_samples(train_ids, seq_length)
        val_rows, val_drop = to_samples(val_ids, seq_length)
    n_train_tokens = sum(map(len, train_ids))
    if len(train_rows) == 0:
        raise DataError(
            f"the training text has {n_train_tokens} tokens, fewer than one sample of "
            f"seq_length + 1 = {seq_length + 1}: give more text or a smaller --seq_length"
        )
    if method != "none" and len(val_rows) == 0:
        raise DataError(
            f"the validation split has {sum(map(len, val_ids))} tokens, fewer than one sample of "
            f"{seq_length + 1}: raise --val_fraction, give more text, lower --seq_length, or pass --val_fraction 0"
        )

    summary = Summary(
        output_dir=str(out),
        seq_length=seq_length,
        split_method=method,
        skipped_empty=skipped,
        train=SplitSummary(n_docs[0], n_train_tokens, len(train_rows), train_drop),
        validation=SplitSummary(n_docs[1], sum(map(len, val_ids)), len(val_rows), val_drop),
    )
    meta = {
        "format": "gpt2-mindrecord-v1",
        "column": COLUMN,
        "tokenizer": "gpt2",
        "eos_token_id": tokenizer.eos_token_id,
        "vocab_size": getattr(tokenizer, "vocab_size", 50257),
        **summary.to_dict(),
        "sources": [str(p) for p in inputs],
        "validation_sources": [str(p) for p in (validation_inputs or [])],
        "validation_documents": [d.name for d in val_docs] if method in ("documents", "explicit") else [],
        "val_fraction": val_fraction,
        "seed": seed,
    }
    meta.pop("output_dir")
    _write_output(out, train_rows, val_rows, meta, overwrite=overwrite)
    return summary


def _non_empty(docs: list[Document]) -> tuple[list[Document], int]:
    kept = [d for d in docs if d.text.strip()]
    return kept, len(docs) - len(kept)


def _check_output(out: str | os.PathLike, *, overwrite: bool) -> None:
    if os.path.lexists(out) and not overwrite:
        raise DataError(f"output {out} already exists (pass --overwrite to replace it)")


def _write_output(out: Path, train: np.ndarray, val: np.ndarray, meta: dict, *, overwrite: bool) -> None:
    def write(tmp: str) -> None:
        write_mindrecord(Path(tmp) / "train.mindrecord", train)
        if len(val):
            write_mindrecord(Path(tmp) / "validation.mindrecord", val)
        (Path(tmp) / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    # Checked again before the rename: the output may have appeared while the samples were written.
    write_atomically(out, write, directory=True, check=partial(_check_output, overwrite=overwrite))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="text files or folders")
    p.add_argument("--output", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--seq_length", type=int, default=1024, help="model sequence length; samples hold one more")
    p.add_argument("--val_fraction", type=float, default=0.05)
    p.add_argument("--validation", nargs="+", help="validation files or folders instead of a split")
    p.add_argument("--format", choices=FORMATS, default="auto", help="wikitext: split files at ' = Title = '")
    p.add_argument("--pattern", default="*.txt", help="file name pattern inside folders")
    p.add_argument("--seed", type=int, default=0, help="chooses the validation documents")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--tokenizer", default="gpt2", help="'gpt2' or a directory with the tokenizer files")
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)
    try:
        from tokenizer import GPT2Tokenizer

        summary = prepare(
            inputs=args.input,
            output_dir=args.output,
            seq_length=args.seq_length,
            val_fraction=args.val_fraction,
            validation_inputs=args.validation,
            fmt=args.format,
            pattern=args.pattern,
            seed=args.seed,
            overwrite=args.overwrite,
            tokenizer=GPT2Tokenizer.from_pretrained(args.tokenizer),
            progress=not args.no_progress,
        )
    except DataError as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 2
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
