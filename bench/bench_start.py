"""Server start time: seconds from process start until `GET /health` answers 200 (model loaded, step shapes compiled).

    python bench/bench_start.py                          # 124M random weights, --max-batch-size 32
    python bench/bench_start.py --model DIR

Three starts of `python -m serving`, one after the other:
  cold      --compile-cache pointing at a fresh, empty directory (compiles and fills the cache), and the packed
            weights' cache (GPT2_PACKED_CACHE, model/packed_cache.py) at another: the server writes the packed
            projections there in the background; the benchmark waits for the file before it stops the server
  warm      the same directories again (the compiled graphs are read back, the packed weights mapped)
  warm-unpacked  (not by default) the compile cache again, GPT2_PACKED_CACHE=0: what the packed cache saves
  no cache  --no-compile-cache and GPT2_PACKED_CACHE=0 (compiles and packs at every start)
The clock starts just before the process is created and /health is polled every 0.1 s. Each start also records
the server's peak RSS (VmHWM) when /health turns 200: the peak of loading and compiling, against the budget of
weights + KV cache + 1 GB.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402
import procs  # noqa: E402
from bench_serving import DEFAULT_MODEL, ensure_model, model_budget  # noqa: E402

RUNS = ("cold", "warm", "warm-unpacked", "no-cache")


def start_once(model: Path, cache: str | None, args: argparse.Namespace, log: Path,
               packed: Path | None) -> tuple[float, int | None]:
    port = procs.free_port()
    cmd = [sys.executable, "-m", "serving", "--model", str(model), "--port", str(port),
           "--max-batch-size", str(args.max_batch_size), "--log-level", "warning", *shlex.split(args.server_args)]
    if args.max_total_tokens:
        cmd += ["--max-total-tokens", str(args.max_total_tokens)]
    cmd += ["--compile-cache", cache] if cache else ["--no-compile-cache"]
    env = {**os.environ, "GPT2_PACKED_CACHE": str(packed) if packed else "0"}
    t0 = time.perf_counter()
    proc = procs.spawn(cmd, log=log, env=env)
    try:
        seconds = procs.wait_healthy(f"http://127.0.0.1:{port}", proc, timeout=args.timeout, t0=t0)
        # the peak while loading and compiling: nothing has been served yet
        rss = procs.peak_rss_bytes(proc.pid)
        # a server that packed the weights writes them for the next start in the background: let it finish
        if packed:
            procs.wait_cache_written(proc, timeout=min(args.timeout, 600.0), directory=packed)
        return seconds, rss
    except (RuntimeError, TimeoutError) as e:
        print(f"server log {log}:\n{procs.tail(log)}", flush=True)
        raise RuntimeError(f"{e}: {procs.last_line(log)}") from None
    finally:
        procs.stop(proc)


def main(argv: list[str] | None = None) -> int:
    p = benchlib.arg_parser(__doc__)
    p.add_argument("--model", type=Path, help=f"model directory (default: {DEFAULT_MODEL.relative_to(procs.REPO)})")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-total-tokens", type=int, help="positions per slot (default: the model's context window)")
    p.add_argument("--server-args", default="",
                   help='extra flags for `python -m serving`, one string: --server-args="--prefill-chunk 128"')
    p.add_argument("--runs", default="cold,warm,no-cache", help=f"which starts, from {', '.join(RUNS)}")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds per start")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    runs = [r for r in args.runs.split(",") if r]
    if unknown := [r for r in runs if r not in RUNS]:
        p.error(f"unknown runs {unknown}; choose from {', '.join(RUNS)}")
    procs.install_signal_handlers()
    model = args.model.resolve() if args.model else ensure_model(DEFAULT_MODEL)
    work = Path(tempfile.mkdtemp(prefix="bench-start-"))
    cache = str(work / "compile-cache")
    result: dict = {"model": str(model), "max_batch_size": args.max_batch_size, "server_args": args.server_args,
                    "seconds": {}, "peak_rss_bytes": {},
                    "budget": model_budget(model, args.max_batch_size, args.max_total_tokens),
                    "errors": []}
    print(f"server start until /health is 200: {model}, --max-batch-size {args.max_batch_size} {args.server_args}",
          flush=True)
    try:
        for run in runs:
            try:
                s, rss = start_once(model, None if run == "no-cache" else cache, args, work / f"server-{run}.log",
                                    None if run in ("no-cache", "warm-unpacked") else work / "packed-cache")
            except Exception as e:  # noqa: BLE001 - the other starts still run
                result["errors"].append(f"{run}: {e}")
                print(f"  {run:<9} failed: {str(e).splitlines()[0]}", flush=True)
                continue
            result["seconds"][run] = s
            result["peak_rss_bytes"][run] = rss
            benchlib.write_json(args.json, result)
            print(f"  {run:<9} {s:7.1f} s   peak RSS {benchlib.fmt(rss / 1e9 if rss else None, 'GB')}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    benchlib.write_json(args.json, result)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
