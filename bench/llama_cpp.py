"""llama.cpp as a reference measured in the same run: build it, convert the benchmark's model for it, run it.

    python bench/llama_cpp.py --model .cache/bench/gpt2-124m-random --json out.json   # build, convert, llama-bench
    python bench/llama_cpp.py --build-only                                           # just build (or find) it

- build: `llama-server` and `llama-bench` from the llama.cpp source vendored in the llama-cpp-python 0.3.36 sdist
  (fetched with `pip download`), Release with GGML_NATIVE (this CPU's vector extensions), static, no OpenSSL,
  no web UI download. Cached outside the repository in ~/.cache/gpt2-mindspore/llama.cpp/0.3.36-<key>/, the key
  hashing the CPU flags, the compiler and the CMake flags. Built in a temporary directory renamed into place
  when complete, so an interrupted build is never taken for a finished one. No cmake: `pip install cmake`.
- convert: the model directory (config.json, model.safetensors, GPT-2 tokenizer files) to GGUF with that source's
  convert_hf_to_gguf.py, f32 and q8_0, cached by the hash of the model's files.
- llama-bench (JSON output, the benchmark's thread count): batch-1 decode ms/token over --gen tokens ending at
  each --contexts length (`-p 0 -n G -d C-G`), and prefill tokens/s of one prompt of each --prompts length
  (`-p T -n 0`); from the mean time of --reps repetitions after llama-bench's warm-up.
- `server_command`: how bench_serving.py starts llama-server next to our server.

Anything that stops llama.cpp from being built or converted raises `Unavailable` with the reason, which the
results show as "llama.cpp: not built (<reason>)". Knows llama.cpp's build and command lines; nothing of our model.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402
import procs  # noqa: E402

VERSION = "0.3.36"
SDIST = f"llama-cpp-python=={VERSION}"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt2-mindspore" / "llama.cpp"
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    # Static binaries: they keep working after the build directory is renamed (no RPATH into it).
    "-DBUILD_SHARED_LIBS=OFF",
    # This version would otherwise download llama-server's prebuilt web UI from Hugging Face at build time.
    "-DLLAMA_USE_PREBUILT_UI=OFF",
)
TARGETS = ("llama-server", "llama-bench")
# What convert_hf_to_gguf.py needs of the source tree (the rest, ~170 MB, is dropped after the build).
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE")
OUTTYPES = ("f32", "q8_0")
BUILD_TIMEOUT_S = 3600.0
CONVERT_TIMEOUT_S = 900.0


class Unavailable(RuntimeError):
    """llama.cpp could not be built or the model not converted; the message says why."""


@dataclass(frozen=True)
class Build:
    root: Path

    @property
    def server(self) -> Path:
        return self.root / "bin" / "llama-server"

    @property
    def bench(self) -> Path:
        return self.root / "bin" / "llama-bench"

    @property
    def src(self) -> Path:
        return self.root / "src"

    def complete(self) -> bool:
        return self.server.is_file() and self.bench.is_file() and (self.src / CONVERTER_FILES[0]).is_file()


# ---- build ---------------------------------------------------------------------------------------------------


def build_key(cpuinfo: str, compiler: str, machine: str) -> str:
    """The cache key of a build: what changes the binaries (a GGML_NATIVE build uses every flag of this CPU)."""
    text = json.dumps({"version": VERSION, "cmake": CMAKE_FLAGS, "machine": machine, "compiler": compiler,
                       "flags": sorted(benchlib.cpu_flags(cpuinfo))})
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        return "none"
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return cxx
    return f"{cxx}: {out.splitlines()[0] if out else '?'}"


def build_dir() -> Path:
    return CACHE / f"{VERSION}-{build_key(benchlib.read_cpuinfo(), _compiler(), platform.machine())}"


def find_cmake(log_dir: Path) -> str:
    """cmake from PATH, from this Python's environment, or installed there from PyPI (`pip install cmake`)."""
    venv_cmake = Path(sys.executable).parent / "cmake"
    for c in (shutil.which("cmake"), venv_cmake):
        if c and Path(c).is_file():
            return str(c)
    print("  cmake not found: pip install cmake", flush=True)
    log = log_dir / "llama-cpp-pip-install-cmake.log"
    _check(procs.run([sys.executable, "-m", "pip", "install", "-q", "cmake"], log=log, timeout=600),
           "cmake is missing and `pip install cmake` failed", log)
    if not venv_cmake.is_file():
        raise Unavailable(f"cmake is missing and `pip install cmake` did not provide {venv_cmake}")
    return str(venv_cmake)


def ensure_built(*, log_dir: Path | None = None) -> tuple[Build, float | None]:
    """The cached build for this CPU and compiler, built first if missing; returns it and the seconds spent
    building (None when it was cached). Raises Unavailable with the reason when it cannot be built."""
    build = Build(build_dir())
    if build.complete():
        return build, None
    CACHE.mkdir(parents=True, exist_ok=True)
    log_dir = log_dir or CACHE / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(build.root.name)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{build.root.name}.building-{os.getpid()}-", dir=CACHE))
    try:
        try:
            _build_into(tmp, log_dir)
        except (OSError, tarfile.TarError) as e:
            raise Unavailable(f"{type(e).__name__}: {e}") from e
        try:
            tmp.chmod(0o755)  # mkdtemp's 0700 otherwise
            tmp.rename(build.root)
        except OSError:
            # Another run finished the same build first: keep theirs.
            if not build.complete():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return build, time.perf_counter() - t0


def _build_into(tmp: Path, log_dir: Path) -> None:
    cmake = find_cmake(log_dir)
    logs = {step: log_dir / f"llama-cpp-{step}.log" for step in ("download", "configure", "build")}
    print(f"  building llama.cpp ({SDIST}) in {tmp}, log {logs['build']}", flush=True)
    # The sdist alone: pip prepares its metadata, and with `--no-binary :all:` it would build the build backend's
    # own requirements from source too (cmake itself, where there is no usable cmake on PATH).
    _check(procs.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python", SDIST,
                      "-d", str(tmp / "sdist")], log=logs["download"], timeout=900),
           f"pip download {SDIST} failed", logs["download"])
    archives = list((tmp / "sdist").glob("*.tar.gz"))
    if len(archives) != 1:
        raise Unavailable(f"pip download {SDIST} gave {[a.name for a in archives]}, expected one .tar.gz")
    (archive,) = archives
    with tarfile.open(archive) as tar:
        tar.extractall(tmp / "sdist", filter="data")
    src = next((tmp / "sdist").glob("*/vendor/llama.cpp"), None)
    if src is None or not (src / "CMakeLists.txt").is_file():
        raise Unavailable(f"{archive.name} has no vendor/llama.cpp")
    build = tmp / "cmake-build"
    jobs = str(len(os.sched_getaffinity(0)))
    _check(procs.run([cmake, "-S", str(src), "-B", str(build), *CMAKE_FLAGS], log=logs["configure"], timeout=600),
           "cmake configure failed", logs["configure"])
    _check(procs.run([cmake, "--build", str(build), "-j", jobs, "--target", *TARGETS], log=logs["build"],
                     timeout=BUILD_TIMEOUT_S), "cmake --build failed", logs["build"])
    (tmp / "bin").mkdir()
    for target in TARGETS:
        shutil.copy2(build / "bin" / target, tmp / "bin" / target)
    (tmp / "src").mkdir()
    for name in CONVERTER_FILES:
        (src / name).rename(tmp / "src" / name)
    shutil.rmtree(tmp / "sdist")
    shutil.rmtree(build)


def _remove_abandoned(name: str) -> None:
    """Temporary build directories of runs that died mid-build (their pid, in the name, is gone)."""
    for d in CACHE.glob(f".{name}.building-*"):
        pid = d.name.split("building-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)


def _check(result: tuple[int | None, float], what: str, log: Path) -> None:
    rc, seconds = result
    if rc == 0:
        return
    why = f"timed out after {seconds:.0f} s" if rc is None else f"exit code {rc}"
    raise Unavailable(f"{what}, {why}: {procs.last_line(log)} (log: {log})")


# ---- convert -------------------------------------------------------------------------------------------------


def model_hash(model: Path) -> str:
    """sha256 (first 16 hex digits) of the model directory's config, weights and tokenizer files."""
    h = hashlib.sha256(VERSION.encode())
    for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt"):
        h.update(name.encode())
        with open(model / name, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:16]


def convert(model: Path, outtype: str, build: Build, *, log_dir: Path | None = None) -> Path:
    """The model as a GGUF file of `outtype` (f32, q8_0), converted once and cached by the model's hash."""
    if outtype not in OUTTYPES:
        raise ValueError(f"unknown outtype {outtype!r}; use one of {', '.join(OUTTYPES)}")
    missing = [n for n in ("config.json", "model.safetensors", "vocab.json", "merges.txt") if not (model / n).is_file()]
    if missing:
        raise Unavailable(f"{model} has no {', '.join(missing)}: convert_hf_to_gguf.py needs a Hugging Face layout")
    out = CACHE / "gguf" / f"{model_hash(model)}-{outtype}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    log = (log_dir or CACHE / "logs") / f"llama-cpp-convert-{outtype}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gguf-stage-") as stage:
        # The converter reads GPT-2's context length from `n_ctx`, which Hugging Face's config calls n_positions:
        # a copy of config.json with both, beside links to the other files.
        for f in model.iterdir():
            if f.name != "config.json":
                os.symlink(f.resolve(), Path(stage) / f.name)
        cfg = json.loads((model / "config.json").read_text())
        cfg.setdefault("n_ctx", cfg["n_positions"])
        (Path(stage) / "config.json").write_text(json.dumps(cfg))
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        env = dict(os.environ, PYTHONPATH=str(build.src / "gguf-py"))
        try:
            _check(procs.run([sys.executable, str(build.src / "convert_hf_to_gguf.py"), stage, "--outtype", outtype,
                              "--outfile", str(tmp)], log=log, timeout=CONVERT_TIMEOUT_S, env=env),
                   f"convert_hf_to_gguf.py --outtype {outtype} failed", log)
            tmp.rename(out)
        finally:
            tmp.unlink(missing_ok=True)
    return out


# ---- run -----------------------------------------------------------------------------------------------------


def run_bench(build: Build, gguf: Path, args: list[str], *, threads: int, reps: int, log: Path,
              timeout: float = 1800.0) -> list[dict]:
    """llama-bench on `gguf` with `args` (e.g. ["-p", "0", "-n", "128"]); its JSON records, one per test."""
    out = log.with_suffix(".json")
    cmd = [str(build.bench), "-m", str(gguf), "-t", str(threads), "-r", str(reps), "-o", "json", *args]
    _check(procs.run(cmd, log=log, stdout=out, timeout=timeout), f"{' '.join(cmd[3:])} failed", log)
    return json.loads(out.read_text())


def server_command(build: Build, gguf: Path, *, port: int, threads: int, slots: int, ctx_per_slot: int,
                   prompt_cache: bool = False) -> list[str]:
    """llama-server with `slots` sequences decoded together (continuous batching), each with `ctx_per_slot`
    positions. No prompt cache by default: the serving benchmark sends every prompt once before measuring, and
    a prompt cache would turn its measured prompts into hits. With `prompt_cache` (bench_prefix.py) a request
    with `cache_prompt` reuses the longest common prefix of the idle slot it is given (this version picks the
    idle slot whose tokens share the largest fraction of the prompt, above `--slot-prompt-similarity` 0.1, else
    the least recently used one); no host-RAM copy of slots (`--cache-ram 0`), so only the KV slots cache, as
    in our server."""
    return [str(build.server), "--host", "127.0.0.1", "--port", str(port), "-m", str(gguf),
            "-t", str(threads), "-tb", str(threads), "-c", str(slots * ctx_per_slot), "--parallel", str(slots),
            "--cont-batching", *(() if prompt_cache else ("--no-cache-prompt",)), "--cache-ram", "0", "--no-webui"]


def main(argv: list[str] | None = None) -> int:
    p = benchlib.arg_parser(__doc__)
    p.add_argument("--model", type=Path, help="model directory to convert (Hugging Face layout)")
    p.add_argument("--build-only", action="store_true", help="build (or find) llama.cpp, print where, stop")
    p.add_argument("--threads", type=int, help="llama-bench threads (default: all usable CPUs)")
    p.add_argument("--types", default=",".join(OUTTYPES), help="GGUF types to measure")
    p.add_argument("--contexts", default="128,512", help="decode: contexts the timed tokens end at")
    p.add_argument("--gen", type=int, default=128, help="decode: tokens generated per repetition")
    p.add_argument("--prompts", default="128,512", help="prefill: prompt lengths")
    p.add_argument("--reps", type=int, default=5, help="llama-bench repetitions of each test")
    p.add_argument("--log-dir", type=Path, help="build, conversion and llama-bench logs (default: the cache)")
    p.add_argument("--json", help="write the results here (rewritten after every measurement)")
    args = p.parse_args(argv)
    if not args.model and not args.build_only:
        p.error("--model is required unless --build-only")
    procs.install_signal_handlers()
    log_dir = args.log_dir or CACHE / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    threads = args.threads or len(os.sched_getaffinity(0))
    res: dict = {"version": VERSION, "threads": threads, "reps": args.reps, "cmake_flags": CMAKE_FLAGS,
                 "types": {}, "decode": [], "prefill": [], "errors": []}
    try:
        build, seconds = ensure_built(log_dir=log_dir)
        res["build"] = {"dir": str(build.root), "built_s": seconds}
        print(f"llama.cpp {VERSION}: {build.root} ({'built in %.0f s' % seconds if seconds else 'cached'})",
              flush=True)
        if args.build_only:
            return 0
        for t in (t for t in args.types.split(",") if t):
            t0 = time.perf_counter()
            gguf = convert(args.model.resolve(), t, build, log_dir=log_dir)
            res["types"][t] = {"gguf": str(gguf), "bytes": gguf.stat().st_size, "convert_s": time.perf_counter() - t0}
    except Unavailable as e:
        res["unavailable"] = str(e)
        res["errors"].append(f"llama.cpp: not built ({e})")
        benchlib.write_json(args.json, res)
        print(f"llama.cpp: not built ({e})", flush=True)
        return 1
    benchlib.write_json(args.json, res)
    contexts = [int(c) for c in args.contexts.split(",") if c]
    prompts = [int(t) for t in args.prompts.split(",") if t]
    print(f"llama-bench, {threads} threads, mean of {args.reps} after a warm-up", flush=True)
    for t, info in res["types"].items():
        gguf = Path(info["gguf"])
        try:
            for ctx in contexts:
                depth = max(0, ctx - args.gen)
                (r,) = run_bench(build, gguf, ["-p", "0", "-n", str(args.gen), "-d", str(depth)], threads=threads,
                                 reps=args.reps, log=log_dir / f"llama-bench-{t}-decode-{ctx}.log")
                # From the mean time of a repetition (llama-bench's avg_ts is the mean of per-repetition rates).
                ms = r["avg_ns"] / 1e6 / args.gen
                res["decode"].append({"type": t, "context": depth + args.gen, "depth": depth, "gen": args.gen,
                                      "ms_per_token": ms, "tok_s": 1000 / ms,
                                      "stddev_ms": r["stddev_ns"] / 1e6 / args.gen, "samples_ns": r.get("samples_ns")})
                benchlib.write_json(args.json, res)
                print(f"  {t:>5} decode, tokens {depth}..{depth + args.gen - 1}: {ms:.2f} +- "
                      f"{res['decode'][-1]['stddev_ms']:.2f} ms/token ({1000 / ms:.1f} tok/s)", flush=True)
            recs = run_bench(build, gguf, ["-p", ",".join(map(str, prompts)), "-n", "0"], threads=threads,
                             reps=args.reps, log=log_dir / f"llama-bench-{t}-prefill.log")
            for r in recs:
                tok_s = r["n_prompt"] / (r["avg_ns"] / 1e9)
                res["prefill"].append({"type": t, "batch": 1, "tokens": r["n_prompt"], "tok_s": tok_s,
                                       "stddev_ms": r["stddev_ns"] / 1e6, "samples_ns": r.get("samples_ns")})
                print(f"  {t:>5} prefill 1x{r['n_prompt']}: {tok_s:.0f} tok/s ({r['avg_ns'] / 1e6:.1f} +- "
                      f"{r['stddev_ns'] / 1e6:.1f} ms)", flush=True)
            benchlib.write_json(args.json, res)
        except (Unavailable, ValueError, KeyError) as e:
            res["errors"].append(f"{t}: {type(e).__name__}: {e}")
            benchlib.write_json(args.json, res)
            print(f"  {t} failed: {e}", flush=True)
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
