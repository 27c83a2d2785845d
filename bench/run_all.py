"""Run every benchmark and print one table: ours, the references measured in the same run, the ratio, the issue's
target and whether it is met (`make bench`).

    python bench/run_all.py                        # the full suite, GPT-2 124M shapes (~45-70 min on 2 cores)
    python bench/run_all.py --quick                # smoke run: 2-layer model, few steps, N = 1, 4 (~6 min)
    python bench/run_all.py --only model,serving   # a subset (names: tokenizer model llama-cpp-bench train
                                                   #   serving prefix start, or serving-ours serving-hf-static
                                                   #   serving-hf-single serving-llama-cpp; llama-cpp = both
                                                   #   llama.cpp jobs)
    python bench/run_all.py --only prefix          # prefix caching: ours with and without it, llama-server
    python bench/run_all.py --no-llama-cpp         # without llama.cpp
    python bench/run_all.py --clients 1,8          # serving concurrency levels
    python bench/run_all.py --server-args="--max-batched-tokens 256"   # flags for our server

The references: Hugging Face transformers (PyTorch) on every row, and llama.cpp (bench/llama_cpp.py: built here
from llama-cpp-python 0.3.36's vendored source for this CPU, cached in ~/.cache/gpt2-mindspore/llama.cpp; the first
run builds it, ~6-15 min on 2 cores) for batch-1 decode and prefill (llama-bench, f32 and q8_0 GGUF), serving
(llama-server, f32), prefix caching (llama-server with its prompt cache) and server start. If llama.cpp cannot be
built its rows say why and show no number.

Each benchmark runs in its own process (MindSpore's device is set once per process) and writes JSON that this
script turns into rows; a benchmark that fails or times out becomes an error row and the others still run.
Every child runs in its own process group and is killed when this script ends, however it ends.

Writes the table to bench/results/latest.md and every number to bench/results/latest.json (quick runs:
quick.md / quick.json; --out STEM: STEM.md / STEM.json), each through a temporary file and a rename; the
benchmarks' own printouts go to logs/<name>.log next to them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402
import llama_cpp  # noqa: E402
import procs  # noqa: E402
from benchlib import Row, Target, error_row, fmt  # noqa: E402

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
MODELS = {False: REPO / ".cache" / "bench" / "gpt2-124m-random", True: REPO / ".cache" / "bench" / "gpt2-2l-random"}

DECODE = "model: decode (ms per step; tokens/s = batch / step)"
PREFILL = "model: prefill (tokens/s)"
SERVING = "serving under load (closed loop, streamed: ours and llama-server /v1/completions; transformers /generate_stream)"
START = "server start until GET /health is 200 (seconds)"
PREFIX = "prefix caching under load (shared few-shot prefix, closed loop, streamed /v1/completions)"
INT8 = "int8 weights (--quantize int8): speed, memory and quality against float32 and llama.cpp q8_0"


PRESET_NAMES = {"gpt2": "GPT-2 124M shapes", "gpt2-medium": "GPT-2 355M (gpt2-medium) shapes",
                "gpt2-large": "GPT-2 774M (gpt2-large) shapes", "gpt2-xl": "GPT-2 1.5B (gpt2-xl) shapes"}
PREFIX_CONFIGS = ("ours", "ours-no-cache", "llama-cpp")  # bench_prefix.py's --configs
# --only names that stand for several jobs.
GROUPS = {"llama-cpp": ("llama-cpp-bench", "serving-llama-cpp")}


@dataclass
class Job:
    name: str
    cmd: list[str]
    timeout: float
    json: Path


# --preset runs (make bench-large): the rows the issue asks of each larger GPT-2, with fewer slots and positions
# than the 124M suite so that GPT-2 1.5B's KV cache fits beside its weights (and transformers' copy) in 24 GB.
LARGE_SLOTS, LARGE_POSITIONS, LARGE_CLIENTS = 16, 512, "1,4,16"


def model_dir(args: argparse.Namespace) -> Path:
    if args.preset != "gpt2":
        return REPO / ".cache" / "bench" / f"{args.preset}-random"
    return MODELS[args.quick]


def plan(args: argparse.Namespace, model: Path, work: Path, logs: Path) -> list[Job]:
    if args.preset != "gpt2":
        return plan_large(args, model, work, logs)
    py, q = sys.executable, args.quick
    threads = ["--threads", str(args.threads)] if args.threads else []
    jobs: list[Job] = []

    def add(name: str, script: str, extra: list[str], timeout: float) -> None:
        out = work / f"{name}.json"
        jobs.append(Job(name, [py, str(BENCH / script), "--json", str(out), *extra], timeout * args.timeout_scale, out))

    clients = [int(c) for c in (args.clients or ("1,4" if q else "1,4,16,32")).split(",") if c]
    # As many slots as the most clients, in our server and in llama-server alike.
    slots = max(4 if q else 32, *clients)
    tok = ["--repeat", "1"] if q else []
    if args.hf_python_site:
        tok += ["--hf-python-site", args.hf_python_site]
    add("tokenizer", "bench_tokenizer.py", tok, 900)
    if q:
        add("model", "bench_model.py", ["--layers", "2", "--batches", "1,4", "--contexts", "128", "--steps", "4",
                                        "--prefill", "1x128,4x128", "--score", "1x128", "--repeat", "1",
                                        "--copy-mb", "64", *threads], 600)
    else:
        add("model", "bench_model.py", threads, 2400)
    if args.llama_cpp:
        # The model benchmark's batch-1 shapes; the first run on a machine also builds llama.cpp (~6-15 min).
        lc = ["--model", str(model), "--log-dir", str(logs), *threads]
        if q:
            lc += ["--contexts", "128", "--gen", "32", "--prompts", "128", "--reps", "2"]
        add("llama-cpp-bench", "llama_cpp.py", lc, 3600)
    if q:
        add("train", "bench_train.py", ["--shapes", "small", "--steps", "2"], 600)
    else:
        add("train", "bench_train.py", ["--shapes", "gpt2-124m,small"], 2400)
    serving = ["--model", str(model), "--log-dir", str(logs), f"--server-args={args.server_args}", *threads,
               "--clients", ",".join(map(str, clients)), "--max-batch-size", str(slots), "--requests-per-client", "2"]
    if q:
        serving += ["--new-tokens", "32", "--time-limit", "60"]
    else:
        serving += ["--new-tokens", "128", "--time-limit", str(args.time_limit)]
    servers = ("ours", "hf-static", "hf-single") + (("llama-cpp",) if args.llama_cpp else ())
    for server in servers:
        # llama-cpp: also the build, when the llama-cpp-bench job did not run first.
        add(f"serving-{server}", "bench_serving.py", ["--server", server, *serving],
            (2400 if server == "llama-cpp" else 900) if q else 3600)
    # Prefix caching: 16 clients whose prompts share a ~400-token prefix (quick: 4 clients, the 2-layer model);
    # ours with and without caching and llama-server with its prompt cache, the same slots each.
    pc = 4 if q else 16
    prefix = ["--model", str(model), "--log-dir", str(logs), f"--server-args={args.server_args}", *threads,
              "--clients", str(pc), "--slots", str(max(slots, pc)), "--requests-per-client", "3" if q else "6",
              "--new-tokens", "32", "--time-limit", "60" if q else str(args.time_limit),
              "--configs", ",".join(PREFIX_CONFIGS if args.llama_cpp else PREFIX_CONFIGS[:2])]
    add("prefix", "bench_prefix.py", prefix, (2400 if args.llama_cpp else 900) if q else 3600)
    # Int8 weights: the model benchmark's batch-1 and batch-32 decode and prefill, our server at 16 clients, and the
    # quality comparison (bench/quality.py); against float32 and llama.cpp's q8_0 from the jobs above.
    if q:
        add("int8-model", "bench_model.py", ["--quantize", "int8", "--layers", "2", "--batches", "1", "--contexts",
                                             "128", "--steps", "4", "--prefill", "1x128", "--score", "",
                                             "--repeat", "1", "--copy-mb", "64", *threads], 600)
    else:
        add("int8-model", "bench_model.py", ["--quantize", "int8", "--batches", "1,32", "--prefill", "1x128,1x512,8x128",
                                             "--score", "", *threads], 2400)
    n8 = 4 if q else 16
    int8_serving = [a for a in serving if not a.startswith("--server-args=")]
    int8_serving[int8_serving.index("--clients") + 1] = str(n8)
    add("int8-serving", "bench_serving.py", ["--server", "ours", *int8_serving,
                                             f"--server-args={args.server_args} --quantize int8"], 900 if q else 3600)
    add("int8-quality", "quality.py", ["--models", str(REPO / "models" / "default"), "--pieces", "5"] if q else [],
        900 if q else 3600)
    add("start", "bench_start.py", ["--model", str(model), "--max-batch-size", str(slots),
                                    f"--server-args={args.server_args}"], 900 if q else 3600)
    return jobs


def plan_large(args: argparse.Namespace, model: Path, work: Path, logs: Path) -> list[Job]:
    """The --preset suite: batch-1/4 decode and prefill against transformers, batch-1 decode and prefill against
    llama.cpp f32 and q8_0, int8 decode, serving at 1/4/16 clients against llama-server, start time and the peak
    RSS of loading."""
    py = sys.executable
    threads = ["--threads", str(args.threads)] if args.threads else []
    jobs: list[Job] = []

    def add(name: str, script: str, extra: list[str], timeout: float) -> None:
        out = work / f"{name}.json"
        jobs.append(Job(name, [py, str(BENCH / script), "--json", str(out), *extra], timeout * args.timeout_scale, out))

    shape = ["--preset", args.preset, "--max-seq-len", str(LARGE_POSITIONS), "--contexts", "128,512", "--steps", "8",
             "--repeat", "2", "--score", "", *threads]
    add("model", "bench_model.py", [*shape, "--batches", "1,4", "--prefill", "1x128,1x512,4x128"], 3600)
    if args.llama_cpp:
        add("llama-cpp-bench", "llama_cpp.py", ["--model", str(model), "--log-dir", str(logs), "--contexts", "128,512",
                                                "--gen", "32", "--prompts", "128,512", "--reps", "3", *threads], 3600)
    add("int8-model", "bench_model.py", [*shape, "--quantize", "int8", "--batches", "1", "--prefill", "1x128"], 3600)
    clients = args.clients or LARGE_CLIENTS
    serving = ["--model", str(model), "--log-dir", str(logs), f"--server-args={args.server_args}", *threads,
               "--clients", clients, "--max-batch-size", str(LARGE_SLOTS), "--max-total-tokens", str(LARGE_POSITIONS),
               "--requests-per-client", "1", "--new-tokens", "64", "--prompt-max", "256",
               "--time-limit", str(args.time_limit)]
    for server in ("ours",) + (("llama-cpp",) if args.llama_cpp else ()):
        add(f"serving-{server}", "bench_serving.py", ["--server", server, *serving], 3600)
    if args.preset == "gpt2-medium":  # training GPT-2 355M within 24 GB, against PyTorch
        add("train", "bench_train.py", ["--shapes", "gpt2-355m", "--steps", "2"], 3600)
    add("start", "bench_start.py", ["--model", str(model), "--max-batch-size", str(LARGE_SLOTS), "--max-total-tokens",
                                    str(LARGE_POSITIONS), "--runs", "cold,warm", f"--server-args={args.server_args}"],
        3600)
    return jobs


def selected(job: str, only: list[str]) -> bool:
    return not only or any(job == o or job.startswith(o + "-") or job in GROUPS.get(o, ()) for o in only)


def run_job(job: Job, logs: Path) -> tuple[dict | None, str | None, float]:
    """Run one benchmark; returns (its JSON, possibly partial, or None; an error message or None; seconds)."""
    log = logs / f"{job.name}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    rc, seconds = procs.run(job.cmd, log=log, timeout=job.timeout, env=env)
    try:
        data = _read_json(job.json)
    except ValueError as e:
        return None, f"unreadable JSON from {job.name}: {e}", seconds
    if rc is None:
        return data, f"timed out after {job.timeout:.0f} s (log: {log})", seconds
    if rc != 0:
        errors = (data or {}).get("errors") or []
        detail = "; ".join(e.strip().splitlines()[0] for e in errors if e.strip())
        if not detail:
            tail = [ln for ln in procs.tail(log, 4000).splitlines() if ln.strip()]
            detail = tail[-1] if tail else "no output"
        return data, f"exit code {rc}: {detail} (log: {log})", seconds
    return data, None, seconds


def _read_json(path: Path) -> dict | None:
    """A benchmark's JSON (written atomically, so whole or absent); None if absent."""
    return json.loads(path.read_text()) if path.is_file() else None


# ---- rows ----------------------------------------------------------------------------------------------------


def rows_tokenizer(d: dict) -> list[Row]:
    res = d["results"]
    ours = res[0]
    mb = d["megabytes"]
    rows = []
    tik = next((r for r in res if r["name"].startswith("tiktoken") and r["cold_mb_s"]), None)
    rows.append(Row("tokenizer", f"encode {mb:.1f} MB of mixed text, cold (MB/s)", ours["cold_mb_s"],
                    tik["cold_mb_s"] if tik else None, ref_text=f"{fmt(tik['cold_mb_s'])} tiktoken" if tik else "-",
                    target=Target(f">= {d['target_mb_s']} MB/s", ">=", d["target_mb_s"], "ours"),
                    note=f"warm {fmt(ours['warm_mb_s'])} MB/s"))
    hf = next((r for r in res if r["name"].endswith("(Python)") and r is not ours), None)
    if hf and hf["cold_mb_s"]:
        rows.append(Row("tokenizer", "encode, cold (MB/s) vs HF's Python GPT2Tokenizer", ours["cold_mb_s"],
                        hf["cold_mb_s"], ref_text=f"{fmt(hf['cold_mb_s'])} {hf['name'].split(' GPT2')[0]}"))
    elif hf:
        rows.append(Row("tokenizer", "HF's Python GPT2Tokenizer", ref_text="-", note=hf["note"]))
    return rows


def rows_model(d: dict | None, llama: dict | None = None) -> list[Row]:
    """Decode, prefill and scoring rows against transformers, each batch-1 decode and prefill row followed by
    the same shape against llama.cpp (llama-bench, every GGUF type measured)."""
    d = d or {}
    rows = []
    lc_decode, lc_prefill = _llama_bench_rows(llama, d)
    decode = d.get("decode", [])
    batches = sorted({r["batch"] for r in decode})
    biggest = batches[-1] if batches and batches[-1] > 1 else None
    for r in decode:
        b, c = r["batch"], r["context"]
        target = None
        if b == 1:
            target = Target("<= 1.00x (no slower)", "<=", 1.0)
        elif b == biggest:
            target = Target("<= 1.00x (tok/s >= theirs)", "<=", 1.0)
        rows.append(Row(DECODE, f"decode b={b} ctx={c}",
                        r["ours_ms"], r["ref_ms"],
                        ours_text=f"{fmt(r['ours_ms'], 'ms')} ({fmt(1000 * b / r['ours_ms'], 'tok/s', 0)})",
                        ref_text=f"{fmt(r['ref_ms'], 'ms')} ({fmt(1000 * b / r['ref_ms'], 'tok/s', 0)}) transformers",
                        target=target))
        if b == 1:
            rows.extend(lc_decode.pop(c, []))
    rows.extend(r for rs in lc_decode.values() for r in rs)
    b1 = next((r for r in decode if r["batch"] == 1), None)
    if b1 and d.get("decode_floor_ms"):
        floor = d["decode_floor_ms"]
        rows.append(Row(DECODE, f"decode b=1 ctx={b1['context']} vs memory-bandwidth floor", b1["ours_ms"], floor,
                        ours_text=fmt(b1["ours_ms"], "ms"),
                        ref_text=f"{fmt(floor, 'ms')} floor = {d['weight_bytes'] / 1e6:.0f} MB weights / "
                                 f"{d['copy_bandwidth_bytes_s'] / 1e9:.1f} GB/s copy",
                        target=Target("<= 1.30x", "<=", 1.3)))
    for r in d.get("prefill", []):
        rows.append(Row(PREFILL, f"prefill {r['batch']}x{r['tokens']}", r["ours_tok_s"],
                        r["ref_tok_s"], ref_text=f"{fmt(r['ref_tok_s'])} transformers",
                        target=Target(">= 0.60x", ">=", 0.6)))
        if r["batch"] == 1:
            rows.extend(lc_prefill.pop(r["tokens"], []))
    rows.extend(r for rs in lc_prefill.values() for r in rs)
    for r in d.get("score", []):
        rows.append(Row("model: scoring, log-prob of every token (tokens/s)", f"score {r['batch']}x{r['tokens']}",
                        r["ours_tok_s"], r["ref_tok_s"], ref_text=f"{fmt(r['ref_tok_s'])} transformers",
                        note=f"max |logprob difference| {r['max_abs_diff']:.1e}"))
    return rows


def _llama_bench_rows(llama: dict | None, d: dict) -> tuple[dict[int, list[Row]], dict[int, list[Row]]]:
    """llama.cpp's decode rows by context and prefill rows by prompt length, beside ours where measured."""
    ours_decode = {r["context"]: r["ours_ms"] for r in d.get("decode", []) if r["batch"] == 1}
    ours_prefill = {r["tokens"]: r["ours_tok_s"] for r in d.get("prefill", []) if r["batch"] == 1}
    decode: dict[int, list[Row]] = {}
    prefill: dict[int, list[Row]] = {}
    for i, r in enumerate((llama or {}).get("decode", [])):
        c, ms = r["context"], r["ms_per_token"]
        ours = ours_decode.get(c)
        note = ""
        if i == 0:
            note = (f"llama-bench -p 0 -n {r['gen']} -d {r['depth']}: mean ms/token over tokens {r['depth']}.."
                    f"{c - 1}, mean of {llama['reps']} runs, {llama['threads']} threads; ours: median of the "
                    f"last {d.get('steps', '?')} steps before {c}")
        decode.setdefault(c, []).append(Row(
            DECODE, f"decode b=1 ctx={c} vs llama.cpp {r['type']}", ours, ms,
            ours_text=f"{fmt(ours, 'ms')} ({fmt(1000 / ours, 'tok/s', 0)})" if ours else "-",
            ref_text=f"{fmt(ms, 'ms')} ({fmt(r['tok_s'], 'tok/s', 0)}) llama.cpp {r['type']}", note=note))
    for r in (llama or {}).get("prefill", []):
        t = r["tokens"]
        prefill.setdefault(t, []).append(Row(
            PREFILL, f"prefill 1x{t} vs llama.cpp {r['type']}", ours_prefill.get(t), r["tok_s"],
            ref_text=f"{fmt(r['tok_s'])} llama.cpp {r['type']}"))
    return decode, prefill


def rows_train(d: dict) -> list[Row]:
    rows = []
    shapes = [s["shape"] for s in d["shapes"]]
    with_target = "gpt2-124m" if "gpt2-124m" in shapes else (shapes[0] if shapes else None)
    for s in d["shapes"]:
        note = "" if s["shape"] == "gpt2-124m" or s["shape"] != with_target else "target meant for 124M"
        rows.append(Row("training (tokens/s, full AdamW step)",
                        f"train {s['shape']} ({s['n_layer']}L, {s['batch']}x{s['seq']}"
                        + (f", x{s['accum']} accumulated" if s.get("accum", 1) > 1 else "") + ")",
                        s["mindspore"]["tokens_per_s"], s["torch"]["tokens_per_s"],
                        ref_text=f"{fmt(s['torch']['tokens_per_s'])} PyTorch",
                        target=Target(">= 0.60x", ">=", 0.6) if s["shape"] == with_target else None, note=note))
        ours, theirs = s["mindspore"].get("peak_rss_bytes"), s["torch"].get("peak_rss_bytes")
        if ours and theirs:
            rows.append(Row("training (tokens/s, full AdamW step)", f"train {s['shape']}: peak RSS (GB)", ours / 1e9,
                            theirs / 1e9, ours_text=fmt(ours / 1e9, "GB"), ref_text=f"{fmt(theirs / 1e9, 'GB')} PyTorch",
                            target=Target("<= 24 GB", "<=", 24.0, "ours") if s["shape"] == "gpt2-355m" else None))
    return rows


def rows_serving(data: dict[str, dict | None], targets: bool = True) -> list[Row]:
    # targets: the 124M suite's (another preset's rows carry none: they were set for GPT-2 124M)
    ours, static, single, llama = (data.get(k) or {} for k in ("ours", "hf-static", "hf-single", "llama-cpp"))
    lv = {name: {lvl["clients"]: lvl for lvl in d.get("levels", [])} for name, d in
          (("ours", ours), ("static", static), ("single", single), ("llama", llama))}
    ns = sorted(set(lv["ours"]) | set(lv["static"]) | set(lv["single"]) | set(lv["llama"]))
    target_n = (16 if 16 in ns else (max(ns) if ns else None)) if targets else None
    sec = SERVING
    mix = (ours or static or single or llama).get("prompt_mix", {})
    rows = []
    for n in ns:
        o, st, si, ll = lv["ours"].get(n), lv["static"].get(n), lv["single"].get(n), lv["llama"].get(n)
        at = n == target_n
        away = "" if n == 16 or not at else f"the issue's target is for N=16, applied to N={n} here"

        def agg(x):
            return x["aggregate_tok_s"] if x else None

        def pair(x, key):
            return f"{fmt(x.get(key + '_ms_p50'), digits=0)} / {fmt(x.get(key + '_ms_p99'), 'ms', 0)}" if x else "-"

        def note(*parts):
            return "; ".join(p for p in parts if p)

        rows.append(Row(sec, f"N={n} aggregate tok/s vs static batching", agg(o), agg(st),
                        ref_text=f"{fmt(agg(st))} transformers static" if st else "-",
                        target=Target(">= 0.80x", ">=", 0.8) if at else None, note=note(away, _cut(o, st))))
        rows.append(Row(sec, f"N={n} aggregate tok/s vs one at a time", agg(o), agg(si),
                        ref_text=f"{fmt(agg(si))} transformers single" if si else "-",
                        target=Target(">= 3.00x", ">=", 3.0) if at else None, note=note(away, _cut(None, si))))
        burst = (f"all requests, with the first wave: {n} prompts sent at once (~{n * mix['mean']:,.0f} tokens "
                 f"to prefill before the last one's first token)") if mix.get("mean") and n > 1 else ""
        rows.append(Row(sec, f"N={n} TTFT p50 / p99 (ratio of p99)", o["ttft_ms_p99"] if o else None,
                        st["ttft_ms_p99"] if st else None, ours_text=pair(o, "ttft"),
                        ref_text=pair(st, "ttft") + " static" if st else "-",
                        target=Target("p99 < 2,000 ms", "<", 2000.0, "ours") if at else None, note=note(away, burst)))
        if n > 1 and ((o or {}).get("steady_requests") or (st or {}).get("steady_requests")):
            rows.append(Row(sec, f"N={n} TTFT p50 / p99 in steady state (ratio of p99)",
                            o.get("steady_ttft_ms_p99") if o else None, st.get("steady_ttft_ms_p99") if st else None,
                            ours_text=pair(o, "steady_ttft") if o else "-",
                            ref_text=pair(st, "steady_ttft") + " static" if st else "-",
                            target=Target("p99 < 2,000 ms", "<", 2000.0, "ours") if at else None,
                            note=note(away, "each client's later requests, sent as its previous one finishes "
                                            f"({(o or st)['steady_requests']} requests)")))
        rows.append(Row(sec, f"N={n} inter-token p50 / p99 (ratio of p50)", o["itl_ms_p50"] if o else None,
                        st["itl_ms_p50"] if st else None, ours_text=pair(o, "itl"),
                        ref_text=pair(st, "itl") + " static" if st else "-"))
        if "llama-cpp" in data:
            rows.append(Row(sec, f"N={n} aggregate tok/s vs llama-server", agg(o), agg(ll),
                            ref_text=f"{fmt(agg(ll))} llama.cpp f32" if ll else "-", note=_cut(None, ll)))
            rows.append(Row(sec, f"N={n} TTFT p50 / p99 vs llama-server (ratio of p99)",
                            o["ttft_ms_p99"] if o else None, ll["ttft_ms_p99"] if ll else None,
                            ours_text=pair(o, "ttft"), ref_text=pair(ll, "ttft") + " llama.cpp" if ll else "-"))
    b = (ours or static or {}).get("budget")
    if b:
        rss = ours.get("peak_rss_bytes")
        ref_rss = static.get("peak_rss_bytes")
        rows.append(Row(sec, f"server peak RSS (VmHWM), {b['slots']} slots x {b['positions']} tokens",
                        rss / 1e9 if rss else None, ref_rss / 1e9 if ref_rss else None,
                        ours_text=fmt(rss / 1e9, "GB") if rss else "-",
                        ref_text=f"{fmt(ref_rss / 1e9, 'GB')} transformers static" if ref_rss else "-",
                        target=Target(f"<= {b['budget_bytes'] / 1e9:.2f} GB", "<=", b["budget_bytes"] / 1e9, "ours"),
                        note=f"budget = weights {b['weights_bytes'] / 1e9:.2f} GB + KV 2 x {b['n_layer']} layers x "
                             f"{b['slots']} x {b['positions']} x n_embd x 4 B = {b['kv_bytes'] / 1e9:.2f} GB + 1 GB"))
    if mix:
        any_ = ours or static or single or llama
        rows.append(Row(sec, "workload", ours_text="-", ref_text="-",
                        note=f"{any_.get('requests_per_client')} requests per client, "
                             f"{any_.get('new_tokens')} new tokens each, prompts "
                             f"{mix.get('distribution')} (median {fmt(mix.get('median'), digits=0)}, "
                             f"mean {fmt(mix.get('mean'), digits=0)}) from Shakespeare; "
                             f"at most {any_.get('time_limit_s'):.0f} s per N"))
    if llama.get("cmd"):
        rows.append(Row(sec, "llama-server", ours_text="-", ref_text="-",
                        note="f32 GGUF of the same model, greedy, ignore_eos, a new connection per request: "
                             + _llama_flags(llama["cmd"])))
    return rows


def rows_int8(raw: dict[str, dict | None]) -> list[Row]:
    """Int8 against float32 (the same run's model and serving jobs) and llama.cpp q8_0 (llama-bench), its memory,
    and its quality (bench/quality.py)."""
    sec = INT8
    rows = []
    q8, f32 = raw.get("int8-model") or {}, raw.get("model") or {}
    llama = {(r["type"], r["context"]): r for r in (raw.get("llama-cpp-bench") or {}).get("decode", [])}
    f32_decode = {(r["batch"], r["context"]): r for r in f32.get("decode", [])}
    for r in q8.get("decode", []):
        b, c, ms = r["batch"], r["context"], r["ours_ms"]
        ours_text = f"{fmt(ms, 'ms')} ({fmt(1000 * b / ms, 'tok/s', 0)})"
        lq = llama.get(("q8_0", c)) if b == 1 else None
        if lq:
            rows.append(Row(sec, f"decode b=1 ctx={c}, int8 vs llama.cpp q8_0 (ms/token)", ms, lq["ms_per_token"],
                            ours_text=ours_text, ref_text=f"{fmt(lq['ms_per_token'], 'ms')} llama.cpp q8_0",
                            target=Target("<= 1.00x", "<=", 1.0)))
        f = f32_decode.get((b, c))
        if f:
            rows.append(Row(sec, f"decode b={b} ctx={c}, int8 vs our float32 (ms/step)", ms, f["ours_ms"],
                            ours_text=ours_text, ref_text=f"{fmt(f['ours_ms'], 'ms')} float32"))
    if q8.get("decode_floor_ms"):
        b1 = next((r for r in q8["decode"] if r["batch"] == 1), None)
        if b1:
            rows.append(Row(sec, f"decode b=1 ctx={b1['context']}, int8 vs memory-bandwidth floor", b1["ours_ms"],
                            q8["decode_floor_ms"], ours_text=fmt(b1["ours_ms"], "ms"),
                            ref_text=f"{fmt(q8['decode_floor_ms'], 'ms')} floor = {q8['weight_bytes'] / 1e6:.0f} MB "
                                     f"/ {q8['copy_bandwidth_bytes_s'] / 1e9:.1f} GB/s copy"))
    f32_prefill = {(r["batch"], r["tokens"]): r for r in f32.get("prefill", [])}
    for r in q8.get("prefill", []):
        f = f32_prefill.get((r["batch"], r["tokens"]))
        rows.append(Row(sec, f"prefill {r['batch']}x{r['tokens']}, int8 vs our float32 (tokens/s)", r["ours_tok_s"],
                        f["ours_tok_s"] if f else None, ref_text=f"{fmt(f['ours_tok_s'])} float32" if f else "-"))
    s8, sf = raw.get("int8-serving") or {}, raw.get("serving-ours") or {}
    lv8 = {lvl["clients"]: lvl for lvl in s8.get("levels", [])}
    lvf = {lvl["clients"]: lvl for lvl in sf.get("levels", [])}
    for n, o in sorted(lv8.items()):
        f = lvf.get(n)
        rows.append(Row(sec, f"serving N={n} aggregate tok/s, int8 vs float32", o["aggregate_tok_s"],
                        f["aggregate_tok_s"] if f else None,
                        ref_text=f"{fmt(f['aggregate_tok_s'])} float32" if f else "-",
                        target=Target(">= 1.50x", ">=", 1.5) if n == 16 else None,
                        note=f"TTFT p50 / p99 {fmt(o['ttft_ms_p50'], digits=0)} / {fmt(o['ttft_ms_p99'], 'ms', 0)}"))
    r8, rf = s8.get("peak_rss_bytes"), sf.get("peak_rss_bytes")
    if r8:
        saved = q8.get("weight_bytes") and f32.get("weight_bytes") and f32["weight_bytes"] - q8["weight_bytes"]
        rows.append(Row(sec, "server peak RSS (VmHWM), int8 vs float32", r8 / 1e9, rf / 1e9 if rf else None,
                        ours_text=fmt(r8 / 1e9, "GB"), ref_text=f"{fmt(rf / 1e9, 'GB')} float32" if rf else "-",
                        target=Target(f"<= float32 - {saved / 1e9:.2f} GB weights saved", "<=",
                                      (rf - saved) / rf) if rf and saved else None,
                        note=f"the weights' saving: {saved / 1e9:.2f} GB" if saved else ""))
    for name, r in ((raw.get("int8-quality") or {}).get("results") or {}).items():
        rows.append(Row(sec, f"{name}: |logprob(int8) - logprob(f32)|, max / mean", r["max_abs_logprob_diff"],
                        ours_text=f"{r['max_abs_logprob_diff']:.4f} / {r['mean_abs_logprob_diff']:.5f}",
                        note=f"{r['tokens']:,} tokens via /score"))
        for src, p in r["perplexity"].items():
            rows.append(Row(sec, f"{name}: perplexity, {src}", p["int8"], p["f32"], ours_text=f"{p['int8']:.2f}",
                            ref_text=f"{p['f32']:.2f} float32",
                            target=Target("within 1% of float32", "<=", 1.01), note=f"{p['tokens']:,} tokens"))
        rows.append(Row(sec, f"{name}: greedy, 128 tokens x {r['greedy_prompts']} prompts, identical to float32",
                        r["greedy_identical"], r["greedy_prompts"],
                        ours_text=f"{r['greedy_identical']} of {r['greedy_prompts']}", ref_text="all",
                        note=f"mean common prefix {r['greedy_mean_common_prefix']:.1f} tokens"))
    return rows


def _llama_flags(cmd: list[str]) -> str:
    """llama-server's flags as the table shows them: no address, file names without their directory."""
    out, args = [], iter(cmd[1:])
    for a in args:
        if a in ("--host", "--port"):
            next(args, None)
        else:
            out.append(Path(a).name if a.startswith("/") else a)
    return " ".join(out)


def _cut(o: dict | None, ref: dict | None) -> str:
    parts = []
    for name, x in (("ours", o), ("reference", ref)):
        if x and (x.get("unfinished") or x.get("errors")):
            parts.append(f"{name}: {x['unfinished']} of {x['requests']} requests cut at the time limit, "
                         f"{x['errors']} errors")
    return "; ".join(parts)


def rows_prefix(d: dict) -> list[Row]:
    """Ours with prefix caching against ours without (the issue's target: TTFT p50 with a hit <= 0.25x) and
    against llama-server with its prompt cache, from bench_prefix.py's JSON."""
    cfg = d.get("configs") or {}
    o, nc, ll = cfg.get("ours"), cfg.get("ours-no-cache"), cfg.get("llama-cpp")
    w = d.get("workload") or {}
    n = w.get("clients")
    sec = PREFIX

    def get(x, key):
        return x.get(key) if x else None

    def pair(x, key):
        return f"{fmt(x.get(key + '_ms_p50'), digits=0)} / {fmt(x.get(key + '_ms_p99'), 'ms', 0)}" if x else "-"

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    def hits(x, part="steady"):
        c = (x or {}).get("cache", {}).get(part) or {}
        return f"{c['requests_with_hit']} of {c['requests']}" if c else "-"

    rows = []
    hit_ttft = (o or {}).get("cache", {}).get("hit_ttft_ms_p50")
    rows.append(Row(sec, f"N={n} TTFT p50 / p99 after the first wave, with vs without caching (ratio of p50)",
                    get(o, "steady_ttft_ms_p50"), get(nc, "steady_ttft_ms_p50"), ours_text=pair(o, "steady_ttft"),
                    ref_text=pair(nc, "steady_ttft") + " no caching" if nc else "-",
                    target=Target("<= 0.25x", "<=", 0.25),
                    note=f"every request but each client's first: {hits(o)} with a hit with caching; TTFT p50 of "
                         f"every request with a hit, first wave included: {fmt(hit_ttft, 'ms', 0)}"))
    rows.append(Row(sec, f"N={n} TTFT p50 / p99, all requests, with vs without caching (ratio of p50)",
                    get(o, "ttft_ms_p50"), get(nc, "ttft_ms_p50"), ours_text=pair(o, "ttft"),
                    ref_text=pair(nc, "ttft") + " no caching" if nc else "-",
                    note=f"first wave: {n} prompts at once, {hits(o, 'first_wave')} with a hit (copied from a "
                         "request still prefilling)"))
    def itl(x, name):
        return f"{name} {pair(x, 'itl')}" if x else ""

    rows.append(Row(sec, f"N={n} aggregate tok/s, with vs without caching", get(o, "aggregate_tok_s"),
                    get(nc, "aggregate_tok_s"), ref_text=f"{fmt(get(nc, 'aggregate_tok_s'))} no caching" if nc else "-",
                    note="; ".join(x for x in ("inter-token p50 / p99: " + ", ".join(
                        x for x in (itl(o, "with"), itl(nc, "without"), itl(ll, "llama-server")) if x), _cut(o, nc))
                        if x)))
    ours_hit = ((o or {}).get("metrics") or {}).get("hit_ratio")
    usage_hit = ((o or {}).get("cache") or {}).get("hit_ratio")
    ll_hit = ((ll or {}).get("cache") or {}).get("hit_ratio")
    steady = lambda x: ((x or {}).get("cache", {}).get("steady") or {}).get("hit_ratio")  # noqa: E731
    rows.append(Row(sec, "hit ratio (cached / prompt tokens), with caching vs llama-server", ours_hit or usage_hit,
                    ll_hit, ours_text=f"{pct(ours_hit)} (/metrics), {pct(usage_hit)} (usage)" if o else "-",
                    ref_text=f"{pct(ll_hit)} llama.cpp (usage)" if ll else "-",
                    note=f"after the first wave: ours {pct(steady(o))}, llama-server {pct(steady(ll))}; "
                         f"{w.get('shared_prefix_tokens')} shared tokens (both match token by token; llama-server "
                         "reuses idle slots only, ours also copies a running request's rows)"))
    if ll or "llama-cpp" in " ".join(d.get("errors") or []):
        rows.append(Row(sec, f"N={n} TTFT p50 / p99 after the first wave vs llama-server (ratio of p50)",
                        get(o, "steady_ttft_ms_p50"), get(ll, "steady_ttft_ms_p50"), ours_text=pair(o, "steady_ttft"),
                        ref_text=pair(ll, "steady_ttft") + " llama.cpp" if ll else "-",
                        note=f"llama-server: {hits(ll)} with a hit" if ll else ""))
        rows.append(Row(sec, f"N={n} TTFT p50 / p99, all requests vs llama-server (ratio of p50)",
                        get(o, "ttft_ms_p50"), get(ll, "ttft_ms_p50"), ours_text=pair(o, "ttft"),
                        ref_text=pair(ll, "ttft") + " llama.cpp" if ll else "-"))
        rows.append(Row(sec, f"N={n} aggregate tok/s vs llama-server", get(o, "aggregate_tok_s"),
                        get(ll, "aggregate_tok_s"), ref_text=f"{fmt(get(ll, 'aggregate_tok_s'))} llama.cpp f32"
                        if ll else "-", note=_cut(None, ll)))
    if w:
        rows.append(Row(sec, "workload", ours_text="-", ref_text="-",
                        note=f"{n} clients x {w['requests_per_client']} requests, {w['new_tokens']} new tokens each "
                             f"(greedy, ignore_eos), {w['slots']} slots in every server; prompts "
                             f"{w['prompt_tokens']['min']}-{w['prompt_tokens']['max']} tokens: a shared few-shot "
                             f"prefix of {w['shared_prefix_tokens']} tokens (Sonnets, 'Line: / Next:' pairs), then "
                             f"{w['suffix_tokens']['min']}-{w['suffix_tokens']['max']} of their own; one warm-up wave "
                             f"with another prefix first; at most {w['time_limit_s']:.0f} s per server"))
        cores = [f"{name} {fmt(x['server_cores'], digits=2)} / {fmt(x.get('server_cpu_wait'), digits=2)} (load "
                 f"{x['load_average_1min'][0]:.1f}-{x['load_average_1min'][1]:.1f})"
                 for name, x in (("with caching", o), ("without", nc), ("llama-server", ll))
                 if x and x.get("server_cores") is not None]
        if cores:
            rows.append(Row(sec, "CPU of each server while measured: cores used / cores waited for", ours_text="-",
                            ref_text="-",
                            note=", ".join(cores) + " (thread-seconds per second, from schedstat): waiting means "
                                 "another process (or its own extra threads) held the 2 CPUs; configurations that "
                                 "waited differently are less comparable"))
    if ll and ll.get("cmd"):
        rows.append(Row(sec, "llama-server (prefix)", ours_text="-", ref_text="-",
                        note="f32 GGUF, prompt cache on, `cache_prompt: true` in every request: "
                             + _llama_flags(ll["cmd"])))
    return rows


def rows_start(d: dict) -> list[Row]:
    names = {"cold": "empty --compile-cache dir (cold)", "warm": "same --compile-cache dir again (warm)",
             "no-cache": "no --compile-cache"}
    rows = [Row(START, f"start, {names[k]}", v, ours_text=fmt(v, "s"), ref_text="-") for k, v in d["seconds"].items()]
    b = d.get("budget")
    for k, rss in (d.get("peak_rss_bytes") or {}).items():
        if not rss:
            continue
        rows.append(Row(START, f"peak RSS (VmHWM) loading and compiling, {names[k].split(' (')[0]}", rss / 1e9,
                        ours_text=fmt(rss / 1e9, "GB"), ref_text="-",
                        target=Target(f"<= {b['budget_bytes'] / 1e9:.2f} GB", "<=", b["budget_bytes"] / 1e9, "ours")
                        if b else None,
                        note=f"budget = weights {b['weights_bytes'] / 1e9:.2f} GB + KV {b['kv_bytes'] / 1e9:.2f} GB "
                             f"({b['slots']} slots x {b['positions']} positions) + 1 GB" if b else ""))
    return rows


def rows_start_vs_llama(ours: dict | None, llama: dict) -> list[Row]:
    """Both servers' start as the serving benchmark started them (same slots; ours without --compile-cache)."""
    o = (ours or {}).get("startup_s")
    slots = (llama.get("budget") or {}).get("slots")
    return [Row(START, f"start in the serving run ({slots} slots) vs llama-server", o, llama["startup_s"],
                ours_text=fmt(o, "s"), ref_text=f"{fmt(llama['startup_s'], 's')} llama.cpp f32",
                note="llama-server: loads the GGUF and runs one warm-up decode")]


# ---- main ------------------------------------------------------------------------------------------------------


def meta(args: argparse.Namespace, model: Path, started: float, load_start: tuple) -> dict:
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": commit + (" (with uncommitted changes)" if dirty else ""),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} usable CPUs, {platform.platform()}",
        "cpu": benchlib.cpu_summary(benchlib.read_cpuinfo()),
        "llama_cpp": (f"llama.cpp from llama-cpp-python {llama_cpp.VERSION}'s vendored source, built on this machine "
                      "(GGML_NATIVE)" if args.llama_cpp else "llama.cpp skipped (--no-llama-cpp)"),
        "python": platform.python_version(),
        "model": f"{model} ({'2-layer, quick' if args.quick else PRESET_NAMES.get(args.preset, args.preset)}"
                 ", random weights, fp32)",
        "threads": args.threads or len(os.sched_getaffinity(0)),
        "quick": args.quick,
        "server_args": args.server_args,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "wall_s": time.time() - started,
    }


def header(m: dict) -> str:
    lines = [
        f"benchmarks {m['date']}, commit {m['commit']}"
        + ("  [QUICK smoke run: not the issue's configuration]" if m["quick"] else ""),
        f"{m['machine']}; python {m['python']}; {m['threads']} threads; model {m['model']}",
        f"CPU: {m['cpu']}; {m['llama_cpp']}",
        f"load average (1/5/15 min) at start {'/'.join(f'{x:.1f}' for x in m['load_average_start'])}, at end "
        f"{'/'.join(f'{x:.1f}' for x in m['load_average_end'])}; total {m['wall_s'] / 60:.1f} min"
        + (f"; server flags: {m['server_args']}" if m["server_args"] else ""),
        "ours/ref = ours divided by the reference on the same row (times: lower is better; rates: higher is better)",
    ]
    if max(m["load_average_start"][0], m["load_average_end"][0]) > m["threads"]:
        lines.append("WARNING: the machine was busy (load average above the thread count): numbers are noisy")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = benchlib.arg_parser(__doc__)
    p.add_argument("--quick", action="store_true", help="smoke run: 2-layer model, few steps, N = 1, 4")
    p.add_argument("--only", default="", help="comma-separated benchmark names (default: all)")
    p.add_argument("--server-args", default="",
                   help='extra flags for our server (`python -m serving`), one string: --server-args="--no-warmup"')
    p.add_argument("--hf-python-site", help="transformers<5 install for the tokenizer reference (the Makefile's)")
    p.add_argument("--threads", type=int,
                   help="CPU threads for the model benchmark, the baseline server and llama.cpp (default: all usable)")
    p.add_argument("--clients", help="serving: concurrency levels, comma-separated (default 1,4,16,32; quick 1,4)")
    p.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false",
                   help="skip llama.cpp (its build, llama-bench and llama-server)")
    p.add_argument("--time-limit", type=float, default=150.0, help="serving: seconds per concurrency level")
    p.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every benchmark's time limit")
    p.add_argument("--out", type=Path, help="output stem (default bench/results/latest, or .../quick with --quick, "
                                            "or .../latest-PRESET with --preset)")
    p.add_argument("--preset", default="gpt2", choices=tuple(PRESET_NAMES),
                   help="model shape; other than gpt2 (124M): the larger-model suite (`make bench-large`)")
    args = p.parse_args(argv)
    only = [o for o in args.only.split(",") if o]
    procs.install_signal_handlers()
    started, load_start = time.time(), os.getloadavg()
    stem = "quick" if args.quick else "latest" if args.preset == "gpt2" else f"latest-{args.preset}"
    out = args.out or RESULTS / stem
    logs = out.parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-run-all-"))
    model = model_dir(args)

    raw: dict[str, dict | None] = {}
    errors: dict[str, str] = {}
    interrupted = False
    try:
        from bench_serving import ensure_model

        ensure_model(model, n_layer=2 if args.quick else None, preset=args.preset)
    except Exception as e:  # noqa: BLE001 - every benchmark that needs it reports the error
        errors["model-dir"] = f"could not create {model}: {e}"
    jobs = [j for j in plan(args, model, work, logs) if selected(j.name, only)]
    ran: list[str] = []
    for i, job in enumerate(jobs, 1):
        ran.append(job.name)
        if job.name == "serving-llama-cpp" and llama_unavailable(raw):
            # Not a second attempt at a build that has just failed.
            errors[job.name] = llama_unavailable(raw)
            print(f"[{i}/{len(jobs)}] {job.name}: skipped, {errors[job.name]}", flush=True)
            continue
        if job.name == "prefix" and llama_unavailable(raw) and "llama-cpp" in job.cmd[-1]:
            job.cmd[-1] = ",".join(PREFIX_CONFIGS[:2])
        print(f"[{i}/{len(jobs)}] {job.name}: {shlex.join(job.cmd[1:])}\n        log: {logs / job.name}.log",
              flush=True)
        try:
            data, err, seconds = run_job(job, logs)
        except (KeyboardInterrupt, SystemExit):
            procs.kill_all()
            interrupted = True
            errors[job.name] = "interrupted"
            try:
                raw[job.name] = _read_json(job.json)
            except ValueError:
                pass
            print("interrupted: writing what was measured", flush=True)
            break
        raw[job.name] = data
        if err:
            errors[job.name] = err
        print(f"        {'FAILED: ' + err if err else 'done'} ({seconds:.0f} s)", flush=True)

    shutil.rmtree(work, ignore_errors=True)
    rows = build_rows(raw, errors, ran, preset=args.preset)
    m = meta(args, model, started, load_start)
    m["interrupted"] = interrupted
    text = header(m) + "\n\n" + benchlib.format_table(rows)
    md = ("# Benchmark results\n\n" + "\n".join(f"- {ln}" for ln in header(m).splitlines()) + "\n\n"
          + benchlib.format_markdown(rows) + "\n\nProduced by `make bench" + ("-large" if args.preset != "gpt2" else "")
          + "` (`python bench/run_all.py" + (" --quick" if args.quick else "")
          + (f" --preset {args.preset}" if args.preset != "gpt2" else "") + "`); raw numbers in the .json file next "
          "to this one.\n")
    benchlib.write_text(out.with_suffix(".md"), md)
    benchlib.write_json(out.with_suffix(".json"), {"meta": m, "rows": [r.to_dict() for r in rows], "raw": raw,
                                                   "errors": errors})
    print("\n" + text)
    print(f"\nwrote {out.with_suffix('.md')} and {out.with_suffix('.json')}; logs in {logs}")
    return 130 if interrupted else (1 if errors else 0)


BUILDERS: list[tuple[str, str, Callable[[dict], list[Row]]]] = [
    ("tokenizer", "tokenizer", rows_tokenizer),
    ("train", "training", rows_train),
]


def llama_unavailable(raw: dict[str, dict | None]) -> str | None:
    """Why llama.cpp could not be built or converted in this run, if a llama.cpp job said so."""
    for name in ("llama-cpp-bench", "serving-llama-cpp", "prefix"):
        why = (raw.get(name) or {}).get("unavailable")
        if why:
            return f"llama.cpp: not built ({why})"
    return None


def build_rows(raw: dict[str, dict | None], errors: dict[str, str], ran: list[str], *,
               preset: str = "gpt2") -> list[Row]:
    """Rows for every benchmark that ran (from its possibly partial JSON) plus an error row per failure."""
    rows: list[Row] = []
    if "model-dir" in errors:
        rows.append(error_row("setup", "model directory", errors["model-dir"]))

    def guarded(section: str, name: str, fn: Callable[[], list[Row]]) -> None:
        try:
            rows.extend(fn())
        except Exception as e:  # noqa: BLE001 - a malformed result is an error row, not a crash
            rows.append(error_row(section, f"{name}: results", f"{type(e).__name__}: {e}"))

    unavailable = llama_unavailable(raw)
    if "model" in ran or "llama-cpp-bench" in ran:
        if raw.get("model") or raw.get("llama-cpp-bench"):
            guarded("model", "model", lambda: rows_model(raw.get("model"), raw.get("llama-cpp-bench")))
        if "model" in errors:
            rows.append(error_row("model", "model", errors["model"]))
        if "llama-cpp-bench" in errors:
            rows.append(error_row("model: llama.cpp (llama-bench)", "llama.cpp (llama-bench)",
                                  unavailable or errors["llama-cpp-bench"]))
    for name, section, fn in BUILDERS:
        if name in ran:
            if raw.get(name):
                guarded(section, name, lambda fn=fn, name=name: fn(raw[name]))
            if name in errors:
                rows.append(error_row(section, name, errors[name]))
    serving = {k.removeprefix("serving-"): raw.get(k) for k in ran if k.startswith("serving-")}
    if serving:
        sec = SERVING
        if any(serving.values()):
            guarded(sec, "serving", lambda: rows_serving(serving, targets=preset == "gpt2"))
        for k in serving:
            if f"serving-{k}" in errors:
                why = unavailable if k == "llama-cpp" and unavailable else errors[f"serving-{k}"]
                rows.append(error_row(sec, f"serving {k}", why))
    if "prefix" in ran:
        if raw.get("prefix"):
            guarded(PREFIX, "prefix", lambda: rows_prefix(raw["prefix"]))
        if "prefix" in errors:
            rows.append(error_row(PREFIX, "prefix", errors["prefix"]))
    int8 = [k for k in ran if k.startswith("int8-")]
    if int8:
        if any(raw.get(k) for k in int8):
            guarded(INT8, "int8", lambda: rows_int8(raw))
        for k in int8:
            if k in errors:
                rows.append(error_row(INT8, k, errors[k]))
    if "start" in ran:
        if raw.get("start"):
            guarded(START, "start", lambda: rows_start(raw["start"]))
        if "start" in errors:
            rows.append(error_row(START, "start", errors["start"]))
    if (raw.get("serving-llama-cpp") or {}).get("startup_s") is not None:
        guarded(START, "start vs llama-server",
                lambda: rows_start_vs_llama(raw.get("serving-ours"), raw["serving-llama-cpp"]))
    return rows


if __name__ == "__main__":
    sys.exit(main())
