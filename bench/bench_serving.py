"""Serving under load: N concurrent streaming clients against this project's server, the transformers baseline or
llama.cpp's llama-server.

    python bench/bench_serving.py --server ours                   # python -m serving, 124M random weights
    python bench/bench_serving.py --server hf-static              # bench/hf_baseline_server.py --mode static
    python bench/bench_serving.py --server hf-single --clients 1,4 --time-limit 60
    python bench/bench_serving.py --server llama-cpp              # llama-server, the same model as f32 GGUF
    python bench/bench_serving.py --server ours --server-args="--prefill-chunk 128"

Closed loop: for each N in --clients, N clients each send --requests-per-client requests one after the other
(the next when the previous has finished), every request asking for exactly --new-tokens tokens (greedy;
the random-weight model practically never emits EOS, and tokens actually received are what is counted).
A level stops at --time-limit seconds: requests still running are cancelled and count with what they received.

Prompts are real text: windows of Shakespeare (Hamlet, Macbeth, The Tempest and the Sonnets, shipped in
tests/data/tokenizer_corpus) at seeded random offsets, their lengths log-uniform between --prompt-min and
--prompt-max tokens (16..512: as many prompts of 16-64 tokens as of 128-512; median ~90, mean ~150), the same
list for every server and every N. Before measuring, every prompt is sent once with 1 new token, so one-time
costs (our server compiles later prefill chunks on first use) stay out of the numbers.

Reported per N: aggregate tokens/s (all tokens received / wall time), time to first token and inter-token
latency p50/p99, and at the end the server's peak RSS (VmHWM from /proc/<pid>/status).

Ours and llama-server (bench/llama_cpp.py builds it and converts the model directory to f32 GGUF) are asked through
the same OpenAI /v1/completions stream with `ignore_eos` (so both generate exactly --new-tokens) and `temperature`
0 (greedy); the transformers baseline speaks only TGI's /generate_stream. llama-server also gets `timings_per_token`
(its running token count, see loadgen) and a new connection per request (see loadgen.limits); it runs --max-batch-size
slots of the model's context length each, with continuous batching, --threads threads and no prompt cache; ours
runs with --no-prefix-caching (the warm-up sends every measured prompt once: with a cache they would be hits).
bench_prefix.py measures the caches.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402
import llama_cpp  # noqa: E402
import procs  # noqa: E402
from loadgen import closed_loop, limits, stream_one, StreamResult, summarize  # noqa: E402

REPO = procs.REPO
TEXTS = sorted((REPO / "tests" / "data" / "tokenizer_corpus").glob("shakespeare_*.txt"))
DEFAULT_MODEL = REPO / ".cache" / "bench" / "gpt2-124m-random"
SERVERS = ("ours", "hf-single", "hf-static", "llama-cpp")


@dataclass(frozen=True)
class Client:
    """How the load generator talks to a server: loadgen's `api`, extra request fields, keep-alive or not."""

    api: str = "tgi"
    extra: dict | None = None
    keepalive: bool = True


CLIENTS = {
    # Ours and llama-server through the same OpenAI /v1/completions stream (the comparison).
    "ours": Client("openai", {"ignore_eos": True}),
    "llama-cpp": Client("openai", {"ignore_eos": True, "timings_per_token": True}, keepalive=False),
}


def ensure_model(path: Path, n_layer: int | None = None, preset: str = "gpt2") -> Path:
    """A random-weight GPT-2 model directory at `path` (tools/init_model.py), created once and reused."""
    if (path / "config.json").is_file():
        return path
    cmd = [sys.executable, "-m", "tools.init_model", str(path), "--preset", preset]
    if n_layer:
        cmd += ["--n-layer", str(n_layer)]
    print(f"creating a random-weight model in {path} ...", flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    return path


def prompt_mix(n: int, lo: int, hi: int, seed: int) -> tuple[list[str], list[int]]:
    """n prompt texts of seeded log-uniform token lengths in [lo, hi], from the Shakespeare texts."""
    from tokenizer import GPT2Tokenizer

    tok = GPT2Tokenizer.from_pretrained("gpt2")
    ids = tok.encode("\n\n".join(p.read_text(encoding="utf-8") for p in TEXTS))
    lengths = benchlib.draw_lengths(n, lo, hi, seed)
    return benchlib.make_prompts(ids, lengths, seed, tok.decode), lengths


def server_command(kind: str, model: Path, port: int, args: argparse.Namespace, *,
                   prompt_cache: bool = False) -> list[str]:
    """The command starting server `kind` (one of SERVERS) on `port`; `args`: this script's options (the slots,
    threads, extra flags, log directory). `prompt_cache`: llama-server keeps each slot's prompt for the next
    request (bench_prefix.py), and ours keeps its prefix caching on."""
    if kind == "llama-cpp":
        # Built and converted before the start clock runs: server start time is the server's alone.
        build, _ = llama_cpp.ensure_built(log_dir=args.log_dir)
        gguf = llama_cpp.convert(model, "f32", build, log_dir=args.log_dir)
        n_ctx = positions(model, args)
        threads = args.threads or len(os.sched_getaffinity(0))
        return llama_cpp.server_command(build, gguf, port=port, threads=threads,
                                        slots=max(args.max_batch_size, *args.clients), ctx_per_slot=n_ctx,
                                        prompt_cache=prompt_cache) \
            + shlex.split(args.baseline_args)
    if kind == "ours":
        # Without prompt_cache, no prefix caching either: the warm-up sends the measured prompts, and both servers
        # must compute every prompt they are measured on.
        return [sys.executable, "-m", "serving", "--model", str(model), "--port", str(port),
                "--max-batch-size", str(args.max_batch_size), "--max-total-tokens", str(positions(model, args)),
                "--max-queue", str(max(64, 2 * max(args.clients))),
                "--log-level", "warning", *(() if prompt_cache else ("--no-prefix-caching",)),
                *shlex.split(args.server_args)]
    mode = kind.split("-", 1)[1]
    cmd = [sys.executable, str(REPO / "bench" / "hf_baseline_server.py"), "--model", str(model),
           "--port", str(port), "--mode", mode, "--max-batch-size", str(args.max_batch_size)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return cmd + shlex.split(args.baseline_args)


async def warm(url: str, prompts: list[str], client: Client) -> float:
    """Send every prompt once for one token, one after the other; returns the seconds it took."""
    import httpx

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits(4, client.keepalive)) as http:
        for i, p in enumerate(prompts):
            res = await stream_one(http, url, p, 1, StreamResult(prompt_index=i), api=client.api, extra=client.extra)
            if res.error:
                raise RuntimeError(f"warm-up request {i} failed: {res.error}")
    return time.perf_counter() - t0


def positions(model: Path, args: argparse.Namespace) -> int:
    """Positions per slot of both servers: --max-total-tokens, or the model's context window."""
    return args.max_total_tokens or json.loads((model / "config.json").read_text())["n_positions"]


def model_budget(model: Path, slots: int, pos: int | None = None) -> dict:
    """Weights and KV-cache bytes of serving `model` with `slots` slots of `pos` positions (default: its context
    window)."""
    cfg = json.loads((model / "config.json").read_text())
    n_layer, d, vocab = cfg["n_layer"], cfg["n_embd"], cfg["vocab_size"]
    pos = pos or cfg["n_positions"]
    weights = 4 * benchlib.gpt2_param_count(n_layer, d, vocab, cfg["n_positions"])
    kv = benchlib.kv_cache_bytes(n_layer, d, slots, pos)
    return {"weights_bytes": weights, "kv_bytes": kv, "slack_bytes": 10**9, "budget_bytes": weights + kv + 10**9,
            "slots": slots, "positions": pos, "n_layer": n_layer}


def main(argv: list[str] | None = None) -> int:
    p = benchlib.arg_parser(__doc__)
    p.add_argument("--server", choices=SERVERS, default="ours")
    p.add_argument("--model", type=Path, help=f"model directory (default: {DEFAULT_MODEL.relative_to(REPO)}, "
                   "created with tools/init_model.py if missing)")
    p.add_argument("--clients", default="1,4,16,32", help="concurrency levels N, comma-separated")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-min", type=int, default=16)
    p.add_argument("--prompt-max", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds per concurrency level")
    p.add_argument("--max-batch-size", type=int, default=32, help="server slots (ours) / static batch size")
    p.add_argument("--max-total-tokens", type=int,
                   help="positions per slot, ours and llama-server (default: the model's context window)")
    p.add_argument("--server-args", default="",
                   help='extra flags for `python -m serving`, one string: --server-args="--prefill-chunk 128"')
    p.add_argument("--baseline-args", default="", help="extra flags for bench/hf_baseline_server.py or llama-server")
    p.add_argument("--threads", type=int, help="threads of the baseline server or llama-server")
    p.add_argument("--no-warm", dest="warm", action="store_false", help="skip sending every prompt once first")
    p.add_argument("--start-timeout", type=float, default=1800.0)
    p.add_argument("--log-dir", type=Path, help="server log directory (default: a temp dir)")
    p.add_argument("--json", help="write the results here (rewritten after every level)")
    args = p.parse_args(argv)
    args.clients = [int(x) for x in args.clients.split(",") if x]
    procs.install_signal_handlers()

    model = args.model.resolve() if args.model else ensure_model(DEFAULT_MODEL)
    need = max(args.clients) * args.requests_per_client
    prompts, lengths = prompt_mix(need, args.prompt_min, args.prompt_max, args.seed)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="bench-serving-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    args.log_dir = log_dir
    log = log_dir / f"server-{args.server}.log"
    port = procs.free_port()
    url = f"http://127.0.0.1:{port}"
    client = CLIENTS.get(args.server, Client())
    try:
        cmd = server_command(args.server, model, port, args)
    except llama_cpp.Unavailable as e:
        benchlib.write_json(args.json, {"server": args.server, "unavailable": str(e), "levels": [],
                                        "errors": [f"llama.cpp: not built ({e})"]})
        print(f"llama.cpp: not built ({e})", flush=True)
        return 1
    result: dict = {
        "server": args.server, "cmd": cmd, "api": client.api, "keepalive": client.keepalive, "model": str(model),
        "new_tokens": args.new_tokens,
        "requests_per_client": args.requests_per_client, "time_limit_s": args.time_limit,
        "prompt_mix": {"distribution": f"log-uniform [{args.prompt_min}, {args.prompt_max}] tokens, seed {args.seed}",
                       "n": len(lengths), "min": min(lengths), "median": benchlib.percentile(lengths, 50),
                       "mean": sum(lengths) / len(lengths), "max": max(lengths)},
        "budget": model_budget(model, args.max_batch_size, positions(model, args)), "levels": [], "errors": [],
    }
    print(f"{args.server}: {shlex.join(cmd)}\n  log {log}", flush=True)
    mix = result["prompt_mix"]
    print(f"  prompts: {mix['n']}, {mix['distribution']}: min {mix['min']}, median {mix['median']:.0f}, "
          f"mean {mix['mean']:.0f}, max {mix['max']}; {args.new_tokens} new tokens each", flush=True)
    t0 = time.perf_counter()
    proc = procs.spawn(cmd, log=log)
    try:
        try:
            result["startup_s"] = procs.wait_healthy(url, proc, timeout=args.start_timeout, t0=t0, poll=0.5)
        except (RuntimeError, TimeoutError) as e:
            print(f"server log {log}:\n{procs.tail(log)}", flush=True)
            raise RuntimeError(f"{e}: {procs.last_line(log)}") from None
        print(f"  ready after {result['startup_s']:.1f} s", flush=True)
        if args.server == "ours":
            result["cache_write_s"] = procs.wait_cache_written(proc)
            if result["cache_write_s"] > 0:
                print(f"  waited {result['cache_write_s']:.1f} s for the packed-weights cache to be written", flush=True)
        if args.warm:
            result["warm_s"] = asyncio.run(warm(url, prompts, client))
            print(f"  warm-up (every prompt once, 1 token): {result['warm_s']:.1f} s", flush=True)
        print(f"  {'N':>3} {'reqs':>5} {'done':>5} {'tokens':>7} {'wall s':>7} {'tok/s':>7} "
              f"{'TTFT p50':>9} {'p99 ms':>8} {'ITL p50':>8} {'p99 ms':>8}", flush=True)
        for n in args.clients:
            try:
                res, wall = asyncio.run(closed_loop(url, prompts, clients=n, per_client=args.requests_per_client,
                                                    new_tokens=args.new_tokens, time_limit=args.time_limit,
                                                    api=client.api, extra=client.extra,
                                                    keepalive=client.keepalive))
            except Exception as e:  # noqa: BLE001 - one level failing is reported, the next still runs
                result["errors"].append(f"N={n}: {type(e).__name__}: {e}")
                print(f"  N={n} failed: {e}", flush=True)
                if proc.poll() is not None:
                    raise RuntimeError(f"server died: {procs.last_line(log)}") from e
                continue
            level = {"clients": n, **summarize(res, wall)}
            result["levels"].append(level)
            benchlib.write_json(args.json, result)
            f = lambda x: benchlib.fmt(x, digits=0)  # noqa: E731
            print(f"  {n:>3} {level['requests']:>5} {level['finished']:>5} {level['tokens']:>7} {wall:>7.1f} "
                  f"{level['aggregate_tok_s']:>7.1f} {f(level['ttft_ms_p50']):>9} {f(level['ttft_ms_p99']):>8} "
                  f"{f(level['itl_ms_p50']):>8} {f(level['itl_ms_p99']):>8}"
                  + (f"  errors: {level['first_errors']}" if level["errors"] else ""), flush=True)
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with code {proc.returncode}: {procs.last_line(log)}")
            time.sleep(1.0)  # let the server drop what the cancelled requests left
        result["peak_rss_bytes"] = procs.peak_rss_bytes(proc.pid)
    except Exception as e:
        result["errors"].append(f"{type(e).__name__}: {e}")
        benchlib.write_json(args.json, result)
        raise
    finally:
        procs.stop(proc)
    benchlib.write_json(args.json, result)
    b = result["budget"]
    rss = result["peak_rss_bytes"]
    print(f"  peak RSS (VmHWM) {benchlib.fmt(rss / 1e9 if rss else None, 'GB')}; budget for {b['slots']} slots x "
          f"{b['positions']} positions: weights {b['weights_bytes'] / 1e9:.2f} GB + KV {b['kv_bytes'] / 1e9:.2f} GB "
          f"+ 1 GB = {b['budget_bytes'] / 1e9:.2f} GB", flush=True)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
