"""What int8 weights (`--quantize int8`) cost in quality, measured through the server against float32.

    python bench/quality.py                       # the shipped default model and a 124M-shaped random one
    python bench/quality.py --models models/default --json out.json

For each model, a float32 server and an int8 server (one after the other, same flags otherwise):
  - /score on real text: every token's log-probability under both; the max and mean |difference|;
  - perplexity per text source, float32 against int8 (target: within 1%);
  - greedy agreement: 50 prompts (the first 16 tokens of 50 lines of those texts), 128 new tokens each through
    /generate; how many of the 50 continuations are identical, and the mean length of the common prefix.
Texts: licence texts from /usr/share/common-licenses (Debian's base-files: a genre the default model never saw)
and Shakespeare and CPython source from tests/data/tokenizer_corpus, cut into pieces that fit the context.
A 124M-shaped model with random weights has nearly uniform predictions (perplexity ~ the vocabulary size), so
only its logprob differences mean much; the default model's perplexity is the quality number.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402
import procs  # noqa: E402
from bench_serving import DEFAULT_MODEL, ensure_model  # noqa: E402

REPO = procs.REPO
LICENCES = ("GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-2.1")
CORPUS = REPO / "tests" / "data" / "tokenizer_corpus"
SOURCES = {
    "licences (unseen genre)": [Path("/usr/share/common-licenses") / n for n in LICENCES],
    "Shakespeare (Hamlet, The Tempest)": [CORPUS / "shakespeare_hamlet.txt", CORPUS / "shakespeare_tempest.txt"],
    "Python source (difflib, statistics)": [CORPUS / "cpython_difflib.py.txt", CORPUS / "cpython_statistics.py.txt"],
}
PIECE_TOKENS = 200  # tokens per scored piece (the default model's context is 256)
PIECES_PER_SOURCE = 40
PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 50, 16, 128


def pieces(tok, paths: list[Path], limit: int) -> list[str]:
    """Whole lines grouped into pieces of at most PIECE_TOKENS tokens, up to `limit` pieces."""
    out, cur, n = [], [], 0
    for path in paths:
        for line in path.read_text(errors="replace").splitlines(keepends=True):
            k = len(tok.encode(line))
            if k > PIECE_TOKENS:
                continue
            if n + k > PIECE_TOKENS and cur:
                out.append("".join(cur))
                cur, n = [], 0
                if len(out) == limit:
                    return out
            cur.append(line)
            n += k
    return out + (["".join(cur)] if cur and len(out) < limit else [])


def prompts(tok, texts: list[str]) -> list[str]:
    """PROMPTS prompts: the first PROMPT_TOKENS tokens of lines spread over the texts, as text."""
    lines = [ln for t in texts for ln in t.splitlines() if len(tok.encode(ln)) >= PROMPT_TOKENS]
    step = max(1, len(lines) // PROMPTS)
    return [tok.decode(tok.encode(ln)[:PROMPT_TOKENS]) for ln in lines[::step][:PROMPTS]]


def measure(model: Path, quantize: bool, texts: dict[str, list[str]], prompt_texts: list[str],
            log: Path) -> dict:
    port = procs.free_port()
    cmd = [sys.executable, "-m", "serving", "--model", str(model), "--port", str(port), "--max-batch-size", "8",
           "--log-level", "warning", "--access-log", "off", *(["--quantize", "int8"] if quantize else [])]
    proc = procs.spawn(cmd, log=log)
    url = f"http://127.0.0.1:{port}"
    try:
        procs.wait_healthy(url, proc, timeout=600)
        rss = procs.peak_rss_bytes(proc.pid)
        out = {"scores": {}, "greedy": []}
        with httpx.Client(timeout=600) as c:
            for name, ts in texts.items():
                lps = []
                for i in range(0, len(ts), 8):
                    r = c.post(url + "/score", json={"texts": ts[i:i + 8], "add_bos": True})
                    r.raise_for_status()
                    lps += [[t["logprob"] for t in res["tokens"]] for res in r.json()["results"]]
                out["scores"][name] = lps
            for prompt in prompt_texts:
                r = c.post(url + "/generate", json={"inputs": prompt, "parameters": {
                    "max_new_tokens": NEW_TOKENS, "details": True, "ignore_eos": True}})
                r.raise_for_status()
                out["greedy"].append([t["id"] for t in r.json()["details"]["tokens"]])
        out["rss_after_load"] = rss
        return out
    finally:
        procs.stop(proc)


def compare(f32: dict, q8: dict) -> dict:
    diffs, ppl = [], {}
    for name, rows in f32["scores"].items():
        total = {"f32": 0.0, "int8": 0.0}
        n = 0
        for a, b in zip(rows, q8["scores"][name]):
            assert len(a) == len(b), "the two servers tokenized a text differently"
            for x, y in zip(a, b):
                if x is None:
                    continue
                diffs.append(abs(x - y))
                total["f32"] += x
                total["int8"] += y
                n += 1
        ppl[name] = {k: math.exp(-v / n) for k, v in total.items()} | {"tokens": n}
    same = [a == b for a, b in zip(f32["greedy"], q8["greedy"])]
    common = []
    for a, b in zip(f32["greedy"], q8["greedy"]):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        common.append(k)
    return {"max_abs_logprob_diff": max(diffs), "mean_abs_logprob_diff": sum(diffs) / len(diffs),
            "tokens": len(diffs), "perplexity": ppl, "greedy_identical": sum(same), "greedy_prompts": len(same),
            "greedy_mean_common_prefix": sum(common) / len(common)}


def rows(name: str, r: dict) -> list[benchlib.Row]:
    sec = f"int8 quality: {name}"
    out = [benchlib.Row(sec, "|logprob(int8) - logprob(f32)|, max / mean", r["max_abs_logprob_diff"],
                        ours_text=f"{r['max_abs_logprob_diff']:.4f} / {r['mean_abs_logprob_diff']:.5f}",
                        note=f"{r['tokens']:,} tokens via /score")]
    for src, p in r["perplexity"].items():
        out.append(benchlib.Row(sec, f"perplexity, {src}", p["int8"], p["f32"],
                                ours_text=f"{p['int8']:.2f}", ref_text=f"{p['f32']:.2f} (float32)",
                                target=benchlib.Target("int8 within 1% of float32", "<=", 1.01),
                                note=f"{p['tokens']:,} tokens"))
    out.append(benchlib.Row(sec, f"greedy, {NEW_TOKENS} tokens x {r['greedy_prompts']} prompts: identical",
                            r["greedy_identical"], r["greedy_prompts"],
                            ours_text=f"{r['greedy_identical']} of {r['greedy_prompts']}", ref_text="all",
                            note=f"mean common prefix {r['greedy_mean_common_prefix']:.1f} tokens"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = benchlib.arg_parser(__doc__)
    p.add_argument("--models", default=f"{REPO / 'models' / 'default'},{DEFAULT_MODEL}",
                   help="model directories, comma-separated (the 124M random one is created if missing)")
    p.add_argument("--pieces", type=int, default=PIECES_PER_SOURCE, help="scored pieces per text source")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--logs", type=Path, default=REPO / "bench" / "results" / "logs")
    args = p.parse_args(argv)
    from tokenizer import GPT2Tokenizer

    tok = GPT2Tokenizer.from_pretrained("gpt2")
    texts = {name: pieces(tok, [f for f in files if f.is_file()], args.pieces) for name, files in SOURCES.items()}
    texts = {k: v for k, v in texts.items() if v}
    prompt_texts = prompts(tok, [t for ts in texts.values() for t in ts])
    args.logs.mkdir(parents=True, exist_ok=True)
    results, table = {}, []
    for m in [Path(x) for x in args.models.split(",") if x]:
        if m == DEFAULT_MODEL:
            ensure_model(m)
        t0 = time.time()
        f32 = measure(m, False, texts, prompt_texts, args.logs / f"quality-{m.name}-f32.log")
        q8 = measure(m, True, texts, prompt_texts, args.logs / f"quality-{m.name}-int8.log")
        r = compare(f32, q8) | {"seconds": time.time() - t0}
        results[m.name] = r
        table += rows(m.name, r)
        print(benchlib.format_table(rows(m.name, r)), flush=True)
    benchlib.write_json(args.json, {"results": results, "rows": [row.to_dict() for row in table]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
