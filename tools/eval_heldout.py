"""Perplexity of a model directory on held-out text, per named source, against a unigram model of that text.

    python tools/eval_heldout.py --model models/default \
        --text plays=corpus/heldout/shakespeare --text fiction=austen/Persuasion.txt

Each `--text NAME=PATH` (text files or folders of them, as tools/prepare_data.py reads them) is tokenized,
every document followed by <|endoftext|>, and cut into samples of seq_length + 1 tokens exactly as
prepare_data.py cuts them; the model's perplexity is over every predicted token of those samples. The
baselines are unigram models fitted on the evaluated text itself, so they know each token's frequency in that
very text, which no model trained elsewhere does: add-one (Laplace) over the GPT-2 vocabulary, and the
maximum-likelihood one (no smoothing is needed, every token it scores was counted), the best any unigram model
can do on that text. This script knows files, tokens and the evaluation loop of tools/training; it does not
train.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from tools.prepare_data import DataError, list_files, read_documents, to_samples, tokenize_documents


def parse_text_arg(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return name, path


def mle_unigram_perplexity(rows: np.ndarray) -> float:
    """Perplexity on the predicted tokens of `rows` of the unigram model that counted exactly those tokens."""
    counts = np.bincount(rows[:, 1:].ravel()).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory (config.json, model.safetensors, tokenizer)")
    p.add_argument("--text", type=parse_text_arg, action="append", required=True, help="NAME=PATH, repeatable")
    p.add_argument("--seq_length", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--pattern", default="*.txt", help="file name pattern inside folders")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)

    from model.checkpoint import load_model_dir
    from tokenizer import GPT2Tokenizer
    from tools.training.evaluate import Evaluator, unigram_perplexity
    from model.runtime import set_device

    set_device("CPU")
    model = load_model_dir(args.model, compute_dtype="float32")
    tokenizer = GPT2Tokenizer.from_pretrained(args.model)
    results = []
    print(f"{'text':<14} {'docs':>5} {'tokens':>9} {'model ppl':>10} {'add-one unigram':>16} {'ML unigram':>11}")
    for name, path in args.text:
        try:
            docs = read_documents(list_files([path], args.pattern))
            rows, _ = to_samples(tokenize_documents(docs, tokenizer, progress=False), args.seq_length)
        except DataError as e:
            print(f"eval_heldout: error: {name}: {e}", file=sys.stderr)
            return 2
        if len(rows) == 0:
            print(f"eval_heldout: error: {name}: fewer than {args.seq_length + 1} tokens", file=sys.stderr)
            return 2
        loss, tokens = Evaluator(model, rows, batch_size=args.batch_size, max_batches=None)()
        unigram = unigram_perplexity(rows, rows, model.config.vocab_size)
        mle = mle_unigram_perplexity(rows)
        results.append(
            {"text": name, "path": path, "documents": len(docs), "tokens": tokens, "loss": loss,
             "perplexity": math.exp(loss), "unigram_perplexity": unigram,
             "ml_unigram_perplexity": mle}
        )
        print(f"{name:<14} {len(docs):>5} {tokens:>9,} {math.exp(loss):>10.1f} {unigram:>16.1f} {mle:>11.1f}")
    print("unigram baselines fitted on the evaluated text itself: add-one over the 50,257-token vocabulary; ML: maximum likelihood")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "results": results}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
