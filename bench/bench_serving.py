"""Serving benchmark: aggregate tokens/s and per-token latency for 1 and 16 concurrent streaming clients.

Starts the real server (`python -m serving`) on a 124M-shaped GPT-2 (random weights unless --model is given),
streams from /generate_stream with N concurrent clients, and prints the numbers next to llama.cpp's on this
machine. Greedy decoding with EOS ignored is not available on the TGI route, so every request asks for the same
number of tokens and the random model practically never emits EOS early (counted tokens are reported anyway).

    python bench/bench_serving.py                       # fixed decode batching (the default), then bucketed
    python bench/bench_serving.py --modes fixed --clients 1 16 --new-tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
LLAMA_CPP = {"single_ms_per_token": "17-18", "aggregate_16_tok_s": 222}


@dataclass
class StreamResult:
    tokens: int = 0
    ttft: float = 0.0
    gaps: list[float] = field(default_factory=list)


async def one_stream(client: httpx.AsyncClient, url: str, prompt: str, new_tokens: int) -> StreamResult:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": new_tokens}}
    res = StreamResult()
    t0 = time.perf_counter()
    last = None
    async with client.stream("POST", url + "/generate_stream", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            now = time.perf_counter()
            event = json.loads(line[5:])
            if "error" in event:
                raise RuntimeError(event)
            if last is None:
                res.ttft = now - t0
            else:
                res.gaps.append(now - last)
            last = now
            res.tokens += 1
    return res


async def run_clients(url: str, clients: int, new_tokens: int, rounds: int) -> dict:
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as c:
        results: list[StreamResult] = []
        t0 = time.perf_counter()
        for r in range(rounds):
            prompts = [f"Benchmark round {r} client {i}: once upon a time, in a land far away," for i in range(clients)]
            results += await asyncio.gather(*(one_stream(c, url, p, new_tokens) for p in prompts))
        wall = time.perf_counter() - t0
    gaps = [g for res in results for g in res.gaps]
    tokens = sum(res.tokens for res in results)
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": tokens,
        "wall_s": wall,
        "aggregate_tok_s": tokens / wall,
        "ms_per_token_mean": 1000 * statistics.fmean(gaps),
        "ms_per_token_p50": 1000 * statistics.median(gaps),
        "ms_per_token_p90": 1000 * statistics.quantiles(gaps, n=10)[-1],
        "ttft_ms_mean": 1000 * statistics.fmean(res.ttft for res in results),
    }


def start_server(model: Path, mode: str, args, log: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "serving", "--model", str(model), "--port", "0", "--max-batch-size", "16",
           "--max-queue", "64", "--max-total-tokens", str(args.max_total_tokens), "--decode-batching", mode,
           "--log-level", "warning"]
    if args.compile_cache:
        cmd += ["--compile-cache", args.compile_cache]
    fh = open(log, "wb")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
    t0 = time.time()
    url = None
    while time.time() - t0 < args.start_timeout:
        text = log.read_text(errors="replace")
        if url is None and (m := re.search(r"on (http://[\d.]+:\d+)", text)):
            url = m.group(1)
        if url:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    print(f"  server ready after {time.time() - t0:.0f} s (load + compile)", flush=True)
                    return proc, url
            except httpx.HTTPError:
                pass
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{text[-3000:]}")
        time.sleep(1)
    proc.kill()
    raise TimeoutError(f"server not ready:\n{log.read_text(errors='replace')[-3000:]}")


def decode_step_ms(url: str) -> float | None:
    text = httpx.get(url + "/metrics", timeout=30).text
    s = re.search(r'gpt2_step_duration_seconds_sum\{phase="decode"\} ([\d.e+-]+)', text)
    c = re.search(r'gpt2_step_duration_seconds_count\{phase="decode"\} ([\d.e+-]+)', text)
    if not (s and c) or float(c.group(1)) == 0:
        return None
    return 1000 * float(s.group(1)) / float(c.group(1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model directory (default: a random 124M-shaped model in a temp dir)")
    p.add_argument("--modes", nargs="+", default=["fixed", "bucketed"], choices=["fixed", "bucketed"])
    p.add_argument("--clients", nargs="+", type=int, default=[1, 16])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2, help="rounds per client count (each: N concurrent streams)")
    p.add_argument("--max-total-tokens", type=int, default=256, help="server context limit (fewer graphs to compile)")
    p.add_argument("--compile-cache", help="MindSpore compile cache dir (faster reruns)")
    p.add_argument("--start-timeout", type=float, default=1800)
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    model = Path(args.model) if args.model else tmp / "gpt2-124m-random"
    if not args.model:
        print(f"creating a random 124M-shaped model in {model} ...", flush=True)
        subprocess.run([sys.executable, "-m", "tools.init_model", str(model)], cwd=REPO, check=True,
                       capture_output=True)
    rows = []
    for mode in args.modes:
        print(f"decode batching = {mode}: starting server ...", flush=True)
        proc, url = start_server(model, mode, args, tmp / f"server-{mode}.log")
        try:
            asyncio.run(run_clients(url, 1, 8, 1))  # first-request effects out of the measurement
            for n in args.clients:
                before = decode_step_ms(url)
                res = asyncio.run(run_clients(url, n, args.new_tokens, args.rounds))
                res["mode"] = mode
                res["decode_step_ms"] = decode_step_ms(url)
                rows.append(res)
                print(f"  {n:>2} clients: {res['aggregate_tok_s']:7.1f} tok/s aggregate, "
                      f"{res['ms_per_token_mean']:6.1f} ms/token mean (p50 {res['ms_per_token_p50']:.1f}, "
                      f"p90 {res['ms_per_token_p90']:.1f}), TTFT {res['ttft_ms_mean']:.0f} ms", flush=True)
                del before
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()

    print()
    print(f"GPT-2 124M (random weights), CPU, {os.cpu_count()} cores; {args.new_tokens} new tokens per request, "
          f"{args.rounds} rounds per row")
    header = f"{'decode batching':<16}{'clients':>8}{'tok/s (agg)':>13}{'ms/token':>10}{'p90 ms':>8}{'TTFT ms':>9}"
    print(header + "   llama.cpp on this machine")
    for r in rows:
        ref = (f"{LLAMA_CPP['single_ms_per_token']} ms/token" if r["clients"] == 1
               else f"{LLAMA_CPP['aggregate_16_tok_s']} tok/s aggregate" if r["clients"] == 16 else "")
        print(f"{r['mode']:<16}{r['clients']:>8}{r['aggregate_tok_s']:>13.1f}{r['ms_per_token_mean']:>10.1f}"
              f"{r['ms_per_token_p90']:>8.1f}{r['ttft_ms_mean']:>9.0f}   {ref}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
