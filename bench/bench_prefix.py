"""Prefix caching under load: requests that all begin with the same few-shot prompt, against our server with
automatic prefix caching, the same server without it, and llama.cpp's llama-server with its prompt cache.

    python bench/bench_prefix.py                                  # the three configurations, GPT-2 124M shapes
    python bench/bench_prefix.py --configs ours,ours-no-cache     # without llama.cpp
    python bench/bench_prefix.py --clients 4 --requests-per-client 3 --model .cache/bench/gpt2-2l-random

The workload (few-shot): a shared prefix of about --prefix-tokens tokens, an instruction line and then examples
"Line: <verse>\\nNext: <the verse after it>" from Shakespeare's Sonnets (tests/data/tokenizer_corpus), in order;
after it each request asks its own question, "Line: <another verse>\\nNext:" (--suffix-min..--suffix-max tokens,
a verse not in the prefix, no two requests alike). --clients closed-loop clients each send --requests-per-client
requests (bench/loadgen.py), streamed OpenAI /v1/completions, greedy, ignore_eos, --new-tokens tokens each, for
at most --time-limit seconds. Before measuring, each server gets one wave (a request per client, 4 tokens) with
another prefix built the same way from other verses, which differs from the first token: one-time costs stay out
of the numbers, and the measured first wave finds nothing of its prefix cached.

The configurations run one after the other on the same machine, each a fresh server with --slots slots:
- ours: `python -m serving`, prefix caching on (the default): a prompt starts after its 16-token blocks that some
  KV slot holds, a free slot's (taken as it is) or a running request's (its rows copied);
- ours-no-cache: the same with --no-prefix-caching;
- llama-cpp: llama-server (bench/llama_cpp.py: the same model as f32 GGUF, --slots slots of the model's context
  each) with its prompt cache on and `cache_prompt: true` in every request. It reuses what the idle slot it hands
  a request already holds (the idle slot whose tokens cover the largest fraction of the prompt, else the least
  recently used), token by token, never a running request's: its first wave computes every prompt in full.

Reported per configuration: what loadgen.summarize reports (aggregate tokens/s, TTFT p50/p99 over all requests and
over the steady state, every request after a client's first, inter-token latency); TTFT of the requests with a
hit and without one; the hit ratio (prompt tokens served from the cache / prompt tokens) from every response's
`usage.prompt_tokens_details.cached_tokens` and, for ours, from /metrics (gpt2_prefix_cache_hits_total /
gpt2_prefix_cache_queries_total, the difference over the measured requests); and the cores the server used while
measured and how long its threads were runnable but waited for a CPU (thread-seconds per second, from
/proc/<pid>/task/*/schedstat), with the load average: on a shared machine, what tells a noisy measurement.

Checked for ours, a failure being an error: usage.prompt_tokens is the prompt's token count; cached_tokens is below
the prompt's length and within what other prompts share with it (0 without caching, at least the shared prefix after
the first wave with it); /metrics agrees with the sum over the responses; no 5xx in the access log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402
import llama_cpp  # noqa: E402
import procs  # noqa: E402
from bench_serving import CLIENTS, DEFAULT_MODEL, ensure_model, server_command  # noqa: E402
from loadgen import StreamResult, closed_loop, summarize  # noqa: E402

REPO = procs.REPO
SONNETS = REPO / "tests" / "data" / "tokenizer_corpus" / "shakespeare_sonnets.txt"
CONFIGS = ("ours", "ours-no-cache", "llama-cpp")
HEADER = "Each line of verse below is followed by the line that comes after it in the sonnet.\n\n"
WARM_HEADER = "Warm-up. Verses of the sonnets, each with the verse after it.\n\n"
WARM_TOKENS = 4


# ---- the workload (pure) ----------------------------------------------------------------------------------


def verse_pairs(text: str) -> list[tuple[str, str]]:
    """(verse, the verse after it) for each sonnet's lines taken two by two (1-2, 3-4, ...; a last odd line is
    left out). Roman-numeral headings start the sonnets; blank lines separate them; the title before the first
    sonnet is skipped."""
    pairs: list[tuple[str, str]] = []
    prev, started = None, False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or re.fullmatch(r"[IVXLC]+", line):
            prev, started = None, started or bool(line)
            continue
        if not started:
            continue
        if prev is None:
            prev = line
        else:
            pairs.append((prev, line))
            prev = None
    return pairs


def few_shot_prompts(
    pairs: Sequence[tuple[str, str]], *, header: str, prefix_tokens: int, n: int, suffix_tokens: tuple[int, int],
    encode: Callable[[str], list[int]], seed: int,
) -> tuple[str, list[str]]:
    """(the shared prefix, n prompts). The prefix: `header`, then "Line: a\\nNext: b\\n\\n" for the pairs in order
    until it has `prefix_tokens` tokens. Each prompt: the prefix and "Line: a\\nNext:" for a verse `a` of the pairs
    the prefix did not use (seeded order), distinct, with `suffix_tokens` (lo, hi) tokens of its own: after the
    prefix and the "Line:" every question begins with."""
    prefix, used = header, 0
    while len(encode(prefix)) < prefix_tokens:
        if used == len(pairs):
            raise ValueError(f"{len(pairs)} verse pairs make a prefix of {len(encode(prefix))} tokens, "
                             f"fewer than {prefix_tokens}")
        a, b = pairs[used]
        prefix += f"Line: {a}\nNext: {b}\n\n"
        used += 1
    lo, hi = suffix_tokens
    common = len(encode(prefix + "Line:"))
    order = list(range(used, len(pairs)))
    random.Random(seed).shuffle(order)
    seen, prompts = {a for a, _ in pairs[:used]}, []
    for i in order:
        a = pairs[i][0]
        question = f"Line: {a}\nNext:"
        if a not in seen and lo <= len(encode(prefix + question)) - common <= hi:
            seen.add(a)
            prompts.append(prefix + question)
            if len(prompts) == n:
                return prefix, prompts
    raise ValueError(f"only {len(prompts)} distinct questions of {lo}-{hi} tokens in the verses left, need {n}")


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Tokens at the start of a and b that are the same."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def shared_prefix(token_lists: Sequence[Sequence[int]]) -> int:
    """Tokens at the start of every list that are the same in all (0 for no lists)."""
    return min((common_prefix(token_lists[0], t) for t in token_lists), default=0)


def longest_shared(token_lists: Sequence[Sequence[int]]) -> list[int]:
    """For each list, the most tokens it begins with that another list also begins with (0 if alone)."""
    order = sorted(range(len(token_lists)), key=lambda i: token_lists[i])
    out = [0] * len(token_lists)
    # In sorted order a list's longest common prefix with any other is with one of its neighbours.
    for i, j in zip(order, order[1:]):
        n = common_prefix(token_lists[i], token_lists[j])
        out[i], out[j] = max(out[i], n), max(out[j], n)
    return out


# ---- what came back (pure) ----------------------------------------------------------------------------------


def cached_tokens(res: StreamResult) -> int | None:
    """The response's usage.prompt_tokens_details.cached_tokens (0 where usage has no details); None: no usage."""
    if res.usage is None:
        return None
    return int((res.usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


def cache_summary(results: Sequence[StreamResult]) -> dict:
    """Hit ratios (cached prompt tokens / prompt tokens) over the responses with usage, all and after the first
    wave, and TTFT p50 of the requests with a hit and without."""

    def ratio(rs: list[StreamResult]) -> dict:
        prompt = sum(r.usage.get("prompt_tokens", 0) for r in rs)
        cached = sum(cached_tokens(r) for r in rs)
        return {"requests": len(rs), "prompt_tokens": prompt, "cached_tokens": cached,
                "hit_ratio": cached / prompt if prompt else None,
                "requests_with_hit": sum(cached_tokens(r) > 0 for r in rs)}

    with_usage = [r for r in results if r.usage is not None]

    def ttft_ms(rs: list[StreamResult]) -> float | None:
        p = benchlib.percentile([r.ttft for r in rs if r.ttft is not None], 50)
        return None if p is None else 1000 * p

    return {**ratio(with_usage), "steady": ratio([r for r in with_usage if not r.first]),
            "first_wave": ratio([r for r in with_usage if r.first]),
            "hit_ttft_ms_p50": ttft_ms([r for r in with_usage if cached_tokens(r) > 0]),
            "miss_ttft_ms_p50": ttft_ms([r for r in with_usage if cached_tokens(r) == 0])}


def check_cached(
    results: Sequence[StreamResult], lengths: Sequence[int], longest: Sequence[int], shared: int, *, caching: bool,
) -> list[str]:
    """What is wrong with our server's usage fields, one message per kind of fault (empty: nothing). lengths[i]:
    prompt i's token count; longest[i]: the most tokens it shares with another prompt (longest_shared)."""
    faults: dict[str, list[tuple[int, str]]] = {}  # kind of fault: (prompt, what was seen) for each request
    for r in results:
        i = r.prompt_index
        if r.error is not None or not r.finished:
            continue
        if r.usage is None:
            faults.setdefault("no usage in the stream", []).append((i, "-"))
            continue
        got = cached_tokens(r)
        if r.usage.get("prompt_tokens") != lengths[i]:
            faults.setdefault("usage.prompt_tokens is not the prompt's token count", []).append(
                (i, f"{r.usage.get('prompt_tokens')} for {lengths[i]}"))
        most = min(longest[i], lengths[i] - 1) if caching else 0
        least = min(shared, lengths[i] - 1) if caching and not r.first else 0
        if got > most:
            faults.setdefault("cached_tokens more than what another prompt shares", []).append(
                (i, f"{got}, at most {most}"))
        elif got < least:
            faults.setdefault("after the first wave, fewer cached_tokens than the shared prefix", []).append(
                (i, f"{got} < {least}"))
    return [f"{kind}: {len(seen)} requests (e.g. prompt {seen[0][0]}: {seen[0][1]})" for kind, seen in faults.items()]


def prometheus_value(text: str, name: str) -> float | None:
    """The sum of a metric's samples (every label set) in Prometheus text; None if it has none."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{"):
            total += float(line.rsplit(None, 1)[1])
            found = True
    return total if found else None


def access_log_5xx(text: str) -> int:
    """Responses with a 5xx status among the access log's JSON lines (our server's log), but /health's 503
    while the model loads."""
    n = 0
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                entry = json.loads(line)
                n += int(entry.get("status") or 0) >= 500 and entry.get("route") != "/health"
            except (ValueError, AttributeError):
                pass
    return n


# ---- running it ---------------------------------------------------------------------------------------------


def metrics(url: str) -> dict[str, float | None]:
    import httpx

    text = httpx.get(url + "/metrics", timeout=30.0).text
    return {k: prometheus_value(text, f"gpt2_prefix_cache_{k}_total") for k in ("queries", "hits")}


def run_config(name: str, model: Path, args: argparse.Namespace, prompts: list[str], warm_prompts: list[str],
               lengths: list[int], longest: list[int], shared: int) -> dict:
    """Start the configuration's server, warm it, measure, check; returns its results (raises if it cannot)."""
    kind = "llama-cpp" if name == "llama-cpp" else "ours"
    client = CLIENTS[kind]
    extra = {**(client.extra or {}), **({"cache_prompt": True} if kind == "llama-cpp" else {})}
    sargs = argparse.Namespace(
        max_batch_size=args.slots, clients=[args.clients], threads=args.threads, log_dir=args.log_dir,
        max_total_tokens=None, baseline_args=args.baseline_args,
        server_args=args.server_args + (" --no-prefix-caching" if name == "ours-no-cache" else ""))
    port = procs.free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = server_command(kind, model, port, sargs, prompt_cache=True)
    log = args.log_dir / f"server-prefix-{name}.log"
    out: dict = {"cmd": cmd, "log": str(log), "extra": extra}
    print(f"{name}: {shlex.join(cmd)}\n  log {log}", flush=True)
    t0 = time.perf_counter()
    proc = procs.spawn(cmd, log=log)
    try:
        try:
            out["startup_s"] = procs.wait_healthy(url, proc, timeout=args.start_timeout, t0=t0, poll=0.5)
        except (RuntimeError, TimeoutError) as e:
            raise RuntimeError(f"{e}: {procs.last_line(log)}") from None
        if kind == "ours":
            out["cache_write_s"] = procs.wait_cache_written(proc)
        loop = dict(clients=args.clients, api=client.api, extra=extra, keepalive=client.keepalive)
        t1 = time.perf_counter()
        warm, _ = asyncio.run(closed_loop(url, warm_prompts, per_client=1, new_tokens=WARM_TOKENS,
                                          time_limit=args.time_limit, **loop))
        bad = [r.error or "cut at the time limit" for r in warm if r.error or not r.finished]
        if bad:
            raise RuntimeError(f"warm-up: {len(bad)} of {len(warm)} requests failed: {bad[0]}")
        out["warm_s"] = time.perf_counter() - t1
        before = metrics(url) if kind == "ours" else None
        sched0, load0 = procs.sched_seconds(proc.pid), os.getloadavg()[0]
        res, wall = asyncio.run(closed_loop(url, prompts, per_client=args.requests_per_client,
                                            new_tokens=args.new_tokens, time_limit=args.time_limit, **loop))
        sched1 = procs.sched_seconds(proc.pid)
        out.update(summarize(res, wall))
        # The cores the server used while measured and how long its threads waited for one, and the machine's
        # load: on a shared machine the configurations may not have had the same CPU.
        if sched0 and sched1 and wall > 0:
            out["server_cores"], out["server_cpu_wait"] = ((b - a) / wall for a, b in zip(sched0, sched1))
        out["load_average_1min"] = [load0, os.getloadavg()[0]]
        out["cache"] = cache_summary(res)
        out["checks"] = []
        if kind == "ours":
            time.sleep(0.5)  # the last responses' counters
            after = metrics(url)
            m = {k: (after[k] or 0.0) - (before[k] or 0.0) for k in after}
            out["metrics"] = {**m, "hit_ratio": m["hits"] / m["queries"] if m["queries"] else None}
            checks = check_cached(res, lengths, longest, shared, caching=name == "ours")
            c = out["cache"]
            complete = out["finished"] == out["requests"] and c["requests"] == out["requests"]
            if complete and (m["hits"], m["queries"]) != (c["cached_tokens"], c["prompt_tokens"] if name == "ours"
                                                         else 0):
                checks.append(f"/metrics says {m['hits']:.0f} of {m['queries']:.0f} prompt tokens were hits, the "
                              f"responses {c['cached_tokens']} of {c['prompt_tokens']}")
            out["checks"] = checks
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}: {procs.last_line(log)}")
    finally:
        procs.stop(proc)
    if kind == "ours":
        n5xx = access_log_5xx(procs.tail(log, 10**8))
        if n5xx:
            out["checks"].append(f"{n5xx} responses with a 5xx status in the access log ({log})")
    return out


def print_config(name: str, r: dict) -> None:
    f = lambda x: benchlib.fmt(x, digits=0)  # noqa: E731
    c = r["cache"]
    hit = f"{100 * c['hit_ratio']:.1f}%" if c["hit_ratio"] is not None else "-"
    m = r.get("metrics") or {}
    mhit = f" (/metrics {100 * m['hit_ratio']:.1f}%)" if m.get("hit_ratio") is not None else ""
    print(f"  {r['requests']} requests ({r['finished']} finished, {r['errors']} errors) in {r['wall_s']:.1f} s: "
          f"{r['aggregate_tok_s']:.1f} tok/s; TTFT p50/p99 {f(r['ttft_ms_p50'])}/{f(r['ttft_ms_p99'])} ms, after "
          f"the first wave {f(r['steady_ttft_ms_p50'])}/{f(r['steady_ttft_ms_p99'])} ms; ITL p50 "
          f"{f(r['itl_ms_p50'])} ms; hit ratio {hit}{mhit}, {c['requests_with_hit']} of {c['requests']} requests "
          f"with a hit (TTFT p50 {f(c['hit_ttft_ms_p50'])} ms; without {f(c['miss_ttft_ms_p50'])} ms); the server "
          f"used {benchlib.fmt(r.get('server_cores'), digits=2)} cores and waited for one "
          f"{benchlib.fmt(r.get('server_cpu_wait'), digits=2)} (thread-seconds per second), load average "
          f"{r['load_average_1min'][0]:.1f} -> {r['load_average_1min'][1]:.1f}", flush=True)
    for msg in r.get("checks", []):
        print(f"  CHECK FAILED: {msg}", flush=True)
    if r["errors"]:
        print(f"  errors: {r['first_errors']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = benchlib.arg_parser(__doc__)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--model", type=Path, help=f"model directory (default: {DEFAULT_MODEL.relative_to(REPO)}, "
                   "created with tools/init_model.py if missing)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests-per-client", type=int, default=6)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prefix-tokens", type=int, default=400, help="tokens of the shared prefix (at least)")
    p.add_argument("--suffix-min", type=int, default=10, help="tokens of each request's own question, at least")
    p.add_argument("--suffix-max", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=150.0, help="seconds per configuration (and its warm-up)")
    p.add_argument("--slots", type=int, default=32, help="KV slots of every server (ours and llama-server alike)")
    p.add_argument("--server-args", default="", help='extra flags for `python -m serving`, one string')
    p.add_argument("--baseline-args", default="", help="extra flags for llama-server")
    p.add_argument("--threads", type=int, help="llama-server threads (default: all usable CPUs)")
    p.add_argument("--start-timeout", type=float, default=1800.0)
    p.add_argument("--log-dir", type=Path, help="server log directory (default: a temp dir)")
    p.add_argument("--json", help="write the results here (rewritten after every configuration)")
    args = p.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        p.error(f"unknown --configs {', '.join(unknown)}; use {', '.join(CONFIGS)}")
    if args.slots < args.clients:
        p.error(f"--slots {args.slots} < --clients {args.clients}: every client needs a slot")
    procs.install_signal_handlers()
    from tokenizer import GPT2Tokenizer

    model = args.model.resolve() if args.model else ensure_model(DEFAULT_MODEL)
    args.log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="bench-prefix-"))
    args.log_dir.mkdir(parents=True, exist_ok=True)

    encode = GPT2Tokenizer.from_pretrained("gpt2").encode
    pairs = verse_pairs(SONNETS.read_text(encoding="utf-8"))
    n = args.clients * args.requests_per_client
    shape = dict(prefix_tokens=args.prefix_tokens, suffix_tokens=(args.suffix_min, args.suffix_max), encode=encode)
    _, prompts = few_shot_prompts(pairs, header=HEADER, n=n, seed=args.seed, **shape)
    _, warm_prompts = few_shot_prompts(pairs[::-1], header=WARM_HEADER, n=args.clients, seed=args.seed + 1, **shape)
    ids = [encode(x) for x in prompts]
    lengths = [len(t) for t in ids]
    shared = shared_prefix(ids)
    longest = longest_shared(ids)
    suffixes = [x - shared for x in lengths]
    result: dict = {
        "model": str(model), "configs": {}, "errors": [],
        "workload": {
            "clients": args.clients, "requests_per_client": args.requests_per_client, "new_tokens": args.new_tokens,
            "time_limit_s": args.time_limit, "slots": args.slots, "seed": args.seed,
            "shared_prefix_tokens": shared,
            "warm_shared_with_measured": max(common_prefix(encode(w), ids[0]) for w in warm_prompts),
            "suffix_tokens": {"min": min(suffixes), "median": benchlib.percentile(suffixes, 50),
                              "max": max(suffixes)},
            "prompt_tokens": {"min": min(lengths), "median": benchlib.percentile(lengths, 50), "max": max(lengths)},
            "source": f"{SONNETS.relative_to(REPO)}: few-shot 'Line: / Next:' verse pairs",
            "first_prompt": prompts[0],
        },
    }
    w = result["workload"]
    print(f"workload: {n} prompts of {w['prompt_tokens']['min']}-{w['prompt_tokens']['max']} tokens: a shared "
          f"prefix of {shared} tokens, then "
          f"{w['suffix_tokens']['min']}-{w['suffix_tokens']['max']} tokens of their own; {args.clients} clients x "
          f"{args.requests_per_client} requests, {args.new_tokens} new tokens, {args.slots} slots", flush=True)
    benchlib.write_json(args.json, result)
    for name in configs:
        try:
            r = run_config(name, model, args, prompts, warm_prompts, lengths, longest, shared)
        except llama_cpp.Unavailable as e:
            result["unavailable"] = str(e)
            result["errors"].append(f"{name}: llama.cpp: not built ({e})")
            print(f"{name}: llama.cpp: not built ({e})", flush=True)
        except Exception as e:  # noqa: BLE001 - one configuration failing is reported, the next still runs
            result["errors"].append(f"{name}: {type(e).__name__}: {e}")
            print(f"{name} failed: {type(e).__name__}: {e}", flush=True)
        else:
            result["configs"][name] = r
            print_config(name, r)
            result["errors"] += [f"{name}: {m}" for m in r["checks"]]
            if r["errors"]:
                result["errors"].append(f"{name}: {r['errors']} requests failed: {r['first_errors'][0]}")
        benchlib.write_json(args.json, result)
        time.sleep(1.0)
    o, nc = result["configs"].get("ours"), result["configs"].get("ours-no-cache")
    if o and nc and o["steady_ttft_ms_p50"] and nc["steady_ttft_ms_p50"]:
        ratio = o["steady_ttft_ms_p50"] / nc["steady_ttft_ms_p50"]
        print(f"TTFT p50 after the first wave, with / without prefix caching: {ratio:.2f}x (target <= 0.25x: "
              f"{benchlib.judge(ratio, '<=', 0.25)})", flush=True)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
