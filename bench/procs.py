"""Child processes of the benchmarks: start them so that none outlives the benchmark, stop them, watch them.

Every child runs in its own session (process group), so stopping it also stops whatever it started, and gets
SIGKILL from the kernel if its parent dies first (Linux `PR_SET_PDEATHSIG`), so a benchmark killed hard leaves
no server behind. `kill_all` (registered with atexit and on SIGTERM by `install_signal_handlers`) stops the
children still running.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
_PR_SET_PDEATHSIG = 1
try:
    # Loaded here, not in the forked child (no dynamic loading between fork and exec).
    _LIBC = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - not Linux
    _LIBC = None

_children: list[subprocess.Popen] = []


def _die_with_parent() -> None:
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn(
    cmd: Sequence[str], *, log: Path | None = None, env: dict[str, str] | None = None, cwd: Path = REPO,
    stdout: Path | None = None,
) -> subprocess.Popen:
    """Start cmd in its own process group, output to `log` (or inherited), killed when this process dies.
    With `stdout`, standard output goes to that file and only standard error to `log`."""
    err = open(log, "wb") if log else None
    out = open(stdout, "wb") if stdout else err
    stderr = None if err is None else err if stdout else subprocess.STDOUT
    try:
        proc = subprocess.Popen(
            list(cmd), cwd=cwd, env=env, stdout=out, stderr=stderr,
            start_new_session=True, preexec_fn=_die_with_parent,
        )
    finally:
        for f in {err, out} - {None}:
            f.close()
    _children.append(proc)
    return proc


def stop(proc: subprocess.Popen, grace: float = 20.0) -> int | None:
    """SIGTERM the child's process group, SIGKILL it after `grace` seconds; returns the exit code."""
    try:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # Also whatever the child started and left behind in its group.
        _signal_group(proc, signal.SIGKILL)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - unkillable
            pass
    finally:
        if proc in _children:
            _children.remove(proc)
    return proc.returncode


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_all() -> None:
    for proc in list(_children):
        stop(proc, grace=5.0)


def install_signal_handlers() -> None:
    """SIGTERM/SIGHUP raise SystemExit, so `finally` blocks and atexit stop the children."""

    def handler(signum, frame):  # noqa: ARG001
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


atexit.register(kill_all)


def run(
    cmd: Sequence[str], *, log: Path, timeout: float, env: dict[str, str] | None = None, cwd: Path = REPO,
    stdout: Path | None = None,
) -> tuple[int | None, float]:
    """Run cmd to completion (output to `log`; standard output to `stdout` if given), at most `timeout` seconds;
    returns (exit code or None on timeout, seconds)."""
    t0 = time.perf_counter()
    proc = spawn(cmd, log=log, env=env, cwd=cwd, stdout=stdout)
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        stop(proc, grace=10.0)
    return rc, time.perf_counter() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, *, timeout: float, t0: float | None = None,
                 poll: float = 0.1) -> float:
    """Seconds from t0 (default: now) until GET url/health answers 200; raises if the process exits or the
    timeout passes."""
    t0 = time.perf_counter() if t0 is None else t0
    with httpx.Client(timeout=5.0) as client:
        while True:
            try:
                if client.get(url + "/health").status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with code {proc.returncode} before /health answered 200")
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"/health not 200 after {timeout:.0f} s")
            time.sleep(poll)


def wait_cache_written(proc: subprocess.Popen, *, timeout: float = 600.0, grace: float = 1.0,
                       directory: Path | None = None) -> float:
    """Seconds waited, once our server is healthy, while it writes its packed-weights cache (model/packed_cache.py:
    a temporary file that a live writer holds a lock on, in `directory`, default GPT2_PACKED_CACHE's): a benchmark
    then measures a server in its steady state, not one copying GBs in its first minutes (that cost is measured on
    its own: bench/results/packed-cache-writer-*.md). 0 (after `grace` s) when nothing is being written."""
    import fcntl
    import sys

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from model import packed_cache

    d = directory if directory is not None else packed_cache.cache_dir()
    t0 = time.perf_counter()
    time.sleep(grace)  # the writer starts once the server is ready

    def writing() -> bool:
        for p in d.glob(".*.packed.tmp-*") if d is not None and d.is_dir() else ():
            try:
                with open(p, "rb") as f:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a writer holds a shared lock
            except BlockingIOError:
                return True
            except OSError:  # gone meanwhile
                pass
        return False

    while writing() and proc.poll() is None and time.perf_counter() - t0 < timeout:
        time.sleep(0.5)
    return time.perf_counter() - t0 - grace


def peak_rss_bytes(pid: int) -> int | None:
    """The process's peak resident set size (VmHWM), None if it cannot be read (process gone, not Linux)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def sched_seconds(pid: int) -> tuple[float, float] | None:
    """(seconds on a CPU, seconds runnable but waiting for one) summed over the process's threads so far
    (/proc/<pid>/task/*/schedstat), None if unreadable. Over a busy stretch, their growth divided by the wall time
    is how many cores the process used and how many more it would have used, had it not waited: on a shared
    machine (or with more runnable threads than cores), the second is not 0."""
    run = wait = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                fields = (task / "schedstat").read_text().split()
            except OSError:
                continue  # a thread that has just exited
            run, wait = run + int(fields[0]), wait + int(fields[1])
    except (OSError, IndexError, ValueError):
        return None
    return run / 1e9, wait / 1e9


def tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def last_line(path: Path) -> str:
    """The last non-empty line of a log (what a dying server said last)."""
    lines = [ln.strip() for ln in tail(path, 4000).splitlines() if ln.strip()]
    return lines[-1] if lines else "(empty log)"
