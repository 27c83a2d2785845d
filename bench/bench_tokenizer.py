"""Tokenizer throughput in MB/s: this package next to tiktoken, tokenizers and Hugging Face's GPT2Tokenizer.

Every tokenizer is built offline from the vocabulary shipped in tokenizer/data and encodes the same
documents (by default the 17 files, 1.2 MB, of the test corpus in tests/data/tokenizer_corpus), one
call per document, single-threaded. Times are CPU time of this process, so that other load on a shared
machine skews them less than wall-clock time would. "cold" is the first pass on a fresh instance
(word caches empty), "warm" a pass after it; each is the best of --repeat. "same ids" compares with ours.

Hugging Face's pure-Python GPT2Tokenizer exists only in transformers < 5 (5.x backs GPT2Tokenizer with
the Rust `tokenizers`). When the installed transformers is 5.x, that row needs a separate install:

    pip install --target /tmp/hf4 "transformers>=4.44,<5"
    python bench/bench_tokenizer.py --hf-python-site /tmp/hf4

and is then measured in a subprocess with that directory first on sys.path.

Usage: python bench/bench_tokenizer.py [--text FILE ...] [--repeat N] [--hf-python-site DIR] [--json PATH]
"""

from __future__ import annotations

import os

# Single-threaded for everyone: `tokenizers` would otherwise use a thread pool.
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as a script from anywhere: the repository's packages come first.
sys.path.insert(0, str(ROOT))

from tokenizer import GPT2Tokenizer  # noqa: E402
from tokenizer.gpt2_tokenizer import PRETRAINED_VOCABULARIES  # noqa: E402

DATA = PRETRAINED_VOCABULARIES["gpt2"]
CORPUS = ROOT / "tests" / "data" / "tokenizer_corpus"
TARGET_MB_S = 1.5

Encode = Callable[[str], list[int]]


@dataclass(frozen=True)
class Result:
    name: str
    cold_mb_s: float | None
    warm_mb_s: float | None
    same_ids: bool | None
    note: str = ""


def measure(
    name: str, make: Callable[[], Encode], docs: list[str], expected: list[list[int]] | None, repeat: int
) -> Result:
    """Best cold and warm MB/s of ``make()``'s encoder over ``docs``, ``repeat`` fresh instances."""
    megabytes = sum(len(doc.encode("utf-8")) for doc in docs) / 1e6
    cold, warm, ids = float("inf"), float("inf"), None
    for _ in range(repeat):
        encode = make()
        start = time.process_time()
        ids = [encode(doc) for doc in docs]
        cold = min(cold, time.process_time() - start)
        start = time.process_time()
        for doc in docs:
            encode(doc)
        warm = min(warm, time.process_time() - start)
    same = None if expected is None else ids == expected
    return Result(name, megabytes / cold, megabytes / warm, same)


def ours() -> Encode:
    tok = GPT2Tokenizer.from_pretrained("gpt2")
    return lambda text: tok.encode(text, disallowed_special=())


def tiktoken_gpt2() -> Encode:
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(DATA / "vocab.bpe"), encoder_json_file=str(DATA / "encoder.json")
    )
    pattern = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
    encoding = tiktoken.Encoding(
        name="gpt2-shipped", pat_str=pattern, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256}
    )
    return encoding.encode_ordinary


def hf_vocab_dir() -> Path:
    """vocab.json + merges.txt (Hugging Face's names) copied from the shipped files into a temp dir."""
    directory = Path(tempfile.mkdtemp(prefix="bench-tokenizer-"))
    shutil.copy(DATA / "encoder.json", directory / "vocab.json")
    shutil.copy(DATA / "vocab.bpe", directory / "merges.txt")
    return directory


def tokenizers_gpt2(directory: Path) -> Callable[[], Encode]:
    def make() -> Encode:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        tok = Tokenizer(models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        return lambda text: tok.encode(text).ids

    return make


def transformers_gpt2(directory: Path) -> Callable[[], Encode]:
    def make() -> Encode:
        import transformers

        transformers.logging.set_verbosity_error()  # no "longer than 1024 tokens" warning
        if transformers_is_python():
            tok = transformers.GPT2Tokenizer(
                vocab_file=str(directory / "vocab.json"), merges_file=str(directory / "merges.txt")
            )
        else:
            # transformers 5 no longer reads vocab_file= in the constructor; a local directory it does.
            tok = transformers.GPT2Tokenizer.from_pretrained(str(directory), local_files_only=True)
        return tok.encode

    return make


def transformers_is_python() -> bool:
    import transformers

    # transformers < 5: a PreTrainedTokenizer subclass with GPT-2's Python `bpe` method.
    return hasattr(transformers.GPT2Tokenizer, "bpe")


def run(*, docs: list[str], repeat: int, hf_python_site: str | None) -> list[Result]:
    """All rows of the table, ours first."""
    reference = GPT2Tokenizer.from_pretrained("gpt2")
    ordinary = [reference.encode(doc, disallowed_special=()) for doc in docs]
    # transformers treats "<|endoftext|>" in text as the special token; compare with that reading.
    special = [reference.encode(doc, allowed_special="all") for doc in docs]
    directory = hf_vocab_dir()
    results = [measure("this package: tokenizer.GPT2Tokenizer (Python)", ours, docs, ordinary, repeat)]
    try:
        import tiktoken

        results.append(measure(f"tiktoken {tiktoken.__version__} (Rust)", tiktoken_gpt2, docs, ordinary, repeat))
    except ImportError:
        results.append(Result("tiktoken", None, None, None, "not installed"))
    try:
        import tokenizers

        results.append(
            measure(f"tokenizers {tokenizers.__version__} (Rust)", tokenizers_gpt2(directory), docs, ordinary, repeat)
        )
    except ImportError:
        results.append(Result("tokenizers", None, None, None, "not installed"))
    try:
        import transformers

        python = transformers_is_python()
        kind = "Python" if python else "tokenizers backend"
        results.append(
            measure(
                f"transformers {transformers.__version__} GPT2Tokenizer ({kind})",
                transformers_gpt2(directory),
                docs,
                special,
                repeat,
            )
        )
    except ImportError:
        python = False
        results.append(Result("transformers", None, None, None, "not installed"))
    if not python:
        results.append(hf_python_in_subprocess(docs=docs, repeat=repeat, site=hf_python_site))
    shutil.rmtree(directory, ignore_errors=True)
    return results


def hf_python_in_subprocess(*, docs: list[str], repeat: int, site: str | None) -> Result:
    name = "transformers<5 GPT2Tokenizer (Python)"
    if not site:
        return Result(name, None, None, None, "skipped: pass --hf-python-site DIR (see this file's docstring)")
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".json", delete=False) as f:
        json.dump(docs, f)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([site, str(ROOT)]))
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--worker-hf-python", f.name, "--repeat", str(repeat)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        os.unlink(f.name)
    if done.returncode != 0:
        return Result(name, None, None, None, f"failed: {done.stderr.strip().splitlines()[-1:]}")
    return Result(**json.loads(done.stdout.strip().splitlines()[-1]))


def worker_hf_python(docs_file: str, repeat: int) -> None:
    """Subprocess side: measure transformers<5's Python GPT2Tokenizer, print one JSON Result."""
    import transformers

    if not transformers_is_python():
        raise SystemExit(f"transformers {transformers.__version__} here has no Python GPT2Tokenizer")
    with open(docs_file, encoding="utf-8") as f:
        docs = json.load(f)
    reference = GPT2Tokenizer.from_pretrained("gpt2")
    expected = [reference.encode(doc, allowed_special="all") for doc in docs]
    directory = hf_vocab_dir()
    name = f"transformers {transformers.__version__} GPT2Tokenizer (Python)"
    result = measure(name, transformers_gpt2(directory), docs, expected, repeat)
    shutil.rmtree(directory, ignore_errors=True)
    print(json.dumps(result.__dict__))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", nargs="*", type=Path, help="text files (default: tests/data/tokenizer_corpus/*.txt)")
    parser.add_argument("--repeat", type=int, default=3, help="fresh instances and warm passes (default 3)")
    parser.add_argument(
        "--hf-python-site",
        default=os.environ.get("HF_PYTHON_SITE"),
        help="directory with transformers<5 installed (pip install --target DIR)",
    )
    parser.add_argument("--json", help="also write the results here as JSON")
    parser.add_argument("--worker-hf-python", metavar="DOCS_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_hf_python:
        worker_hf_python(args.worker_hf_python, args.repeat)
        return

    files = args.text or sorted(CORPUS.glob("*.txt"))
    # Bytes, not read_text(): keep "\r\n" as it is in the files.
    docs = [path.read_bytes().decode("utf-8") for path in files]
    size = sum(len(doc.encode("utf-8")) for doc in docs)
    print(f"text: {len(files)} document(s), {size / 1e6:.2f} MB ({size:,} bytes), {sum(map(len, docs)):,} characters")
    print(
        f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs visible; "
        f"single-threaded, CPU time; cold = first pass on a fresh instance, warm = a pass after it; "
        f"best of {args.repeat}"
    )
    results = run(docs=docs, repeat=args.repeat, hf_python_site=args.hf_python_site)
    width = max(len(r.name) for r in results)
    print(f"{'tokenizer':<{width}}  {'cold MB/s':>9}  {'warm MB/s':>9}  same ids")
    for r in results:
        if r.cold_mb_s is None:
            print(f"{r.name:<{width}}  {'-':>9}  {'-':>9}  {r.note}")
        else:
            same = {True: "yes", False: "NO", None: "-"}[r.same_ids]
            print(f"{r.name:<{width}}  {r.cold_mb_s:9.2f}  {r.warm_mb_s:9.2f}  {same}")
    mine = results[0]
    python_hf = [r for r in results if r.name.endswith("(Python)") and r is not mine and r.cold_mb_s]
    verdict = "meets" if mine.cold_mb_s >= TARGET_MB_S else "MISSES"
    print(
        f"this package: {mine.cold_mb_s:.2f} MB/s cold, {mine.warm_mb_s:.2f} MB/s warm; "
        f"{verdict} the {TARGET_MB_S} MB/s target (cold)"
    )
    for r in python_hf:
        print(f"vs {r.name}: {mine.cold_mb_s / r.cold_mb_s:.2f}x cold, {mine.warm_mb_s / r.warm_mb_s:.2f}x warm")
    if args.json:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from benchlib import write_json

        write_json(args.json, {"megabytes": size / 1e6, "documents": len(files), "repeat": args.repeat,
                               "target_mb_s": TARGET_MB_S, "results": [r.__dict__ for r in results]})


if __name__ == "__main__":
    main()
