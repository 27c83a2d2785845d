"""Soak test: N concurrent clients for T seconds, disconnects mixed in, watching the server's RSS and its slots.

    python bench/soak.py                                    # models/default, 32 clients x 600 s (`make soak`)
    python bench/soak.py --clients 8 --duration 60
    python bench/soak.py --url http://127.0.0.1:8000 --pid 12345   # a server that is already running

Starts `python -m serving` on --model (or attaches to --url, loopback only). Each client loops until the
deadline: a route (streaming /generate_stream and /v1/completions, non-streaming /generate and /v1/completions,
now and then /score), a Shakespeare prompt of 4..--prompt-max tokens, --min-new-tokens..--max-new-tokens
(16..64) new tokens, greedy or sampled.
With probability --disconnect-rate the request goes over a raw socket that is closed abruptly (half of the
time with a TCP reset): mid-stream after a few events, before any of the response, or halfway through sending
the body. Requests running at the deadline finish; none starts after it.

Every --sample-every seconds: the server's VmRSS (/proc/<pid>/status) and the gauges gpt2_requests_running,
gpt2_requests_waiting and gpt2_kv_cache_slots_used from /metrics. After the load and --settle seconds of idle
the three gauges must be back at 0 (no leaked slots). RSS growth per minute is the least-squares slope over
the samples after the warm-up (the first --warmup-fraction of the run).

Prints a table and writes JSON (--out, through a temporary file and a rename). Exits 1 when the run failed:
any error but 429 (a 5xx, an error event inside a stream, a stream that ended without its final event that
was not a deliberate disconnect, a transport error, a malformed answer), leaked slots, or the server dying.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import random
import shlex
import socket
import struct
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402
import procs  # noqa: E402
from bench_serving import prompt_mix  # noqa: E402

REPO = procs.REPO
DEFAULT_OUT = REPO / "bench" / "results" / "soak-latest.json"
# name: (path, streaming, weight)
ROUTES = {
    "generate_stream": ("/generate_stream", True, 0.35),
    "v1_stream": ("/v1/completions", True, 0.25),
    "generate": ("/generate", False, 0.15),
    "v1": ("/v1/completions", False, 0.15),
    "score": ("/score", False, 0.10),
}
GAUGES = ("gpt2_requests_running", "gpt2_requests_waiting", "gpt2_kv_cache_slots_used")
COUNTERS = ("gpt2_request_success_total", "gpt2_request_failure_total", "gpt2_generation_tokens_total",
            "gpt2_prompt_tokens_total")
# Expected when clients outnumber slots + queue; everything else fails the run.
TOLERATED = {"http_429"}


# ---- pure helpers (tested without a server) -------------------------------------------------------------------


def slope_per_minute(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over t (seconds), per minute; None for fewer than two distinct times."""
    if len(points) < 2:
        return None
    mt = sum(t for t, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    var = sum((t - mt) ** 2 for t, _ in points)
    if var == 0:
        return None
    return 60 * sum((t - mt) * (y - my) for t, y in points) / var


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                out[key] = float(value)
            except ValueError:
                pass
    return out


def check_loopback(url: str) -> tuple[str, int]:
    """(host, port) of url; ValueError unless it is a loopback address."""
    u = httpx.URL(url)
    host = u.host
    ok = host == "localhost"
    if not ok:
        try:
            ok = ipaddress.ip_address(host).is_loopback
        except ValueError:
            ok = False
    if not ok:
        raise ValueError(f"--url must be a loopback address (127.0.0.1, ::1, localhost), got {host!r}")
    return host, u.port or 80


# ---- one request ------------------------------------------------------------------------------------------------


@dataclass
class Call:
    route: str
    body: dict
    disconnect: str | None = None  # None, "mid_stream", "before_response", "mid_request"
    after_events: int = 0  # mid_stream: close after this many SSE events
    delay: float = 0.0  # before_response / mid_request: seconds before closing
    reset: bool = False  # close with a TCP reset (SO_LINGER 0) rather than a FIN

    @property
    def path(self) -> str:
        return ROUTES[self.route][0]

    @property
    def stream(self) -> bool:
        return ROUTES[self.route][1]


def make_call(rng: random.Random, prompts: list[str], *, min_new: int, max_new: int,
              disconnect_rate: float) -> Call:
    """The next request of a client: route, body, and whether and how it is cut off."""
    names = list(ROUTES)
    route = rng.choices(names, weights=[ROUTES[n][2] for n in names])[0]
    prompt = rng.choice(prompts)
    n = rng.randint(min_new, max_new)
    sample = rng.random() < 0.5
    if route.startswith("generate"):
        params: dict = {"max_new_tokens": n, "do_sample": sample, "details": rng.random() < 0.5}
        if sample:
            params.update(top_k=40, temperature=0.9, seed=rng.randrange(2**31))
        body: dict = {"inputs": prompt, "parameters": params}
    elif route.startswith("v1"):
        body = {"prompt": prompt, "max_tokens": n, "temperature": 0.9 if sample else 0.0,
                "stream": route == "v1_stream"}
        if sample:
            body["seed"] = rng.randrange(2**31)
        if rng.random() < 0.2:
            body["logprobs"] = 2
        if route == "v1_stream" and rng.random() < 0.3:
            body["stream_options"] = {"include_usage": True}
    else:
        body = {"texts": rng.sample(prompts, rng.randint(1, 3)), "add_bos": rng.random() < 0.5}
    call = Call(route, body)
    if rng.random() < disconnect_rate:
        if ROUTES[route][1]:
            call.disconnect = rng.choices(["mid_stream", "before_response", "mid_request"], [0.6, 0.3, 0.1])[0]
        else:
            call.disconnect = rng.choices(["before_response", "mid_request"], [0.85, 0.15])[0]
        call.after_events = rng.randint(1, max(1, n // 2))
        call.delay = rng.uniform(0.0, 0.5)
        call.reset = rng.random() < 0.5
    return call


@dataclass
class Outcome:
    kind: str  # "ok", "disconnected", "completed_before_disconnect", or an error kind
    detail: str = ""


def _stream_outcome(route: str, events: list[str]) -> Outcome:
    """Judge the SSE payloads of a stream that ended by itself."""
    final = done = False
    for payload in events:
        if payload == "[DONE]":
            done = True
            continue
        try:
            ev = json.loads(payload)
        except ValueError:
            return Outcome("bad_response", f"undecodable event {payload[:120]!r}")
        if isinstance(ev, dict) and "error" in ev:
            return Outcome("stream_error_event", payload[:300])
        if route == "generate_stream":
            final = final or ev.get("generated_text") is not None
        else:
            final = final or any(c.get("finish_reason") for c in ev.get("choices", []))
    if route == "v1_stream" and final and not done:
        return Outcome("stream_no_final_event", "no data: [DONE] after the last choice")
    if not final:
        last = events[-1][:200] if events else ""
        return Outcome("stream_no_final_event", f"{len(events)} events, the last {last!r}")
    return Outcome("ok")


def _answer_outcome(call: Call, r: httpx.Response) -> Outcome:
    try:
        j = r.json()
        if call.route == "generate":
            ok = isinstance(j.get("generated_text"), str)
        elif call.route == "v1":
            ok = bool(j["choices"]) and all(c.get("finish_reason") for c in j["choices"])
        else:
            ok = len(j["results"]) == len(call.body["texts"])
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    return Outcome("ok") if ok else Outcome("bad_response", r.text[:300])


async def send(http: httpx.AsyncClient, url: str, call: Call, headers: dict) -> Outcome:
    """A request that is read to its end."""
    if not call.stream:
        r = await http.post(url + call.path, json=call.body, headers=headers)
        if r.status_code != 200:
            return Outcome(f"http_{r.status_code}", r.text[:300])
        return _answer_outcome(call, r)
    events = []
    async with http.stream("POST", url + call.path, json=call.body, headers=headers) as r:
        if r.status_code != 200:
            return Outcome(f"http_{r.status_code}", (await r.aread())[:300].decode(errors="replace"))
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                events.append(line[5:].strip())
    return _stream_outcome(call.route, events)


async def send_and_drop(host: str, port: int, call: Call, headers: dict, timeout: float) -> Outcome:
    """A request over a raw socket that this client closes abruptly, as `call.disconnect` says."""
    body = json.dumps(call.body).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in {
        "Host": f"{host}:{port}", "Content-Type": "application/json", "Content-Length": str(len(body)),
        "Connection": "close", **headers}.items())
    request = f"POST {call.path} HTTP/1.1\r\n{head}\r\n".encode()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        if call.disconnect == "mid_request":
            writer.write(request + body[: len(body) // 2])
            await writer.drain()
            await asyncio.sleep(call.delay)
            return Outcome("disconnected")
        writer.write(request + body)
        await writer.drain()
        if call.disconnect == "before_response":
            await asyncio.sleep(call.delay)
            return Outcome("disconnected")
        buf = b""
        eof = False
        async with asyncio.timeout(timeout):
            while buf.count(b"data:") < call.after_events:
                chunk = await reader.read(65536)
                if not chunk:
                    eof = True
                    break
                buf += chunk
        status_line = buf.split(b"\r\n", 1)[0].decode(errors="replace")
        parts = status_line.split()
        if len(parts) < 2 or not parts[1].isdigit():
            return Outcome("bad_response", f"status line {status_line[:120]!r}")
        if parts[1] != "200":
            return Outcome(f"http_{parts[1]}", buf[:300].decode(errors="replace"))
        # Chunked framing splits the body into lines too; only the `data:` lines are events.
        lines = buf.split(b"\r\n\r\n", 1)[-1].decode(errors="replace").splitlines()
        events = [ln[5:].strip() for ln in lines if ln.startswith("data:")]
        for payload in events:
            if payload.startswith("{") and '"error"' in payload:
                try:
                    if "error" in json.loads(payload):
                        return Outcome("stream_error_event", payload[:300])
                except ValueError:
                    pass  # the last event may be cut
        if eof:
            # The stream ended before the events we meant to disconnect after: it must be complete.
            out = _stream_outcome(call.route, events)
            return Outcome("completed_before_disconnect") if out.kind == "ok" else out
        return Outcome("disconnected")
    finally:
        if call.reset:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


# ---- the run ------------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    routes: dict[str, Counter] = field(default_factory=lambda: {r: Counter() for r in ROUTES})
    disconnects: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, call: Call, out: Outcome) -> None:
        c = self.routes[call.route]
        if out.kind in ("ok", "disconnected", "completed_before_disconnect"):
            c[out.kind] += 1
        else:
            c["errors"] += 1
            self.errors[out.kind] += 1
            self.examples.setdefault(out.kind, f"{call.route}: {out.detail}")
        if out.kind == "disconnected":
            self.disconnects[call.disconnect] += 1

    def total(self, key: str) -> int:
        return sum(c[key] for c in self.routes.values())


class Monitor:
    """Samples of the server: VmRSS of its pid and the /metrics gauges, on a clock that starts with the load."""

    def __init__(self, url: str, pid: int | None, headers: dict, proc=None) -> None:
        self.url, self.pid, self.headers, self.proc = url, pid, headers, proc
        self.samples: list[dict] = []
        self.t0 = time.monotonic()
        self.metrics_failures = 0
        self.http = httpx.AsyncClient(timeout=10.0)

    def rss(self) -> int | None:
        if self.pid is None:
            return None
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    async def metrics(self) -> dict[str, float] | None:
        try:
            r = await self.http.get(self.url + "/metrics", headers=self.headers)
            r.raise_for_status()
            return parse_metrics(r.text)
        except httpx.HTTPError:
            self.metrics_failures += 1
            return None

    async def sample(self, phase: str) -> dict:
        m = await self.metrics() or {}
        s = {"t": round(time.monotonic() - self.t0, 2), "phase": phase, "rss_bytes": self.rss(),
             **{g.removeprefix("gpt2_"): None if m.get(g) is None else int(m[g]) for g in GAUGES}}
        self.samples.append(s)
        return s

    def server_dead(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None


async def run_load(args, url: str, prompts: list[str], headers: dict, mon: Monitor) -> tuple[Tally, dict]:
    """--clients client loops until the deadline, and the monitor; returns the tally and timings."""
    host, port = check_loopback(url)
    tally = Tally()
    timeout = httpx.Timeout(args.request_timeout, connect=10.0)
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4)
    start = mon.t0 = time.monotonic()
    await mon.sample("start")
    deadline = start + args.duration
    info = {"cut_at_end": 0}
    stop = asyncio.Event()

    async def client(c: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(args.seed * 100_003 + c)
        while time.monotonic() < deadline and not stop.is_set():
            call = make_call(rng, prompts, min_new=args.min_new_tokens, max_new=args.max_new_tokens,
                             disconnect_rate=args.disconnect_rate)
            tally.routes[call.route]["sent"] += 1
            try:
                if call.disconnect:
                    out = await send_and_drop(host, port, call, headers, args.request_timeout)
                else:
                    out = await send(http, url, call, headers)
            except Exception as e:  # noqa: BLE001 - a transport error (or worse) is counted, the soak goes on
                out = Outcome(f"exception_{type(e).__name__}", str(e)[:300])
            tally.add(call, out)

    async def watch() -> None:
        last_print = 0.0
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), args.sample_every)
                return
            except TimeoutError:
                pass
            s = await mon.sample("load" if time.monotonic() < deadline else "drain")
            if mon.server_dead():
                info["server_died_at_s"] = s["t"]
                stop.set()
                return
            if s["t"] - last_print >= args.print_every:
                last_print = s["t"]
                rss = s["rss_bytes"]
                print(f"  t={s['t']:6.0f} s  requests {sum(c['sent'] for c in tally.routes.values()):6d}  "
                      f"ok {tally.total('ok'):6d}  disconnects {sum(tally.disconnects.values()):5d}  "
                      f"errors {sum(tally.errors.values()):4d}  "
                      f"RSS {benchlib.fmt(rss / 1e6 if rss else None, 'MB')}  running {s['requests_running']} "
                      f"waiting {s['requests_waiting']}", flush=True)

    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        watcher = asyncio.create_task(watch())
        tasks = [asyncio.create_task(client(c, http)) for c in range(args.clients)]
        # Requests running at the deadline get their own timeout to finish.
        _, pending = await asyncio.wait(tasks, timeout=args.duration + args.request_timeout + 30)
        info["load_s"] = round(time.monotonic() - start, 2)
        info["cut_at_end"] = len(pending)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()
        stop.set()
        await watcher
    return tally, info


async def settle(args, mon: Monitor) -> dict:
    """Idle --settle seconds, then wait (up to --settle-timeout) for the gauges to reach 0."""
    await asyncio.sleep(args.settle)
    t_end = time.monotonic() + args.settle_timeout
    while True:
        s = await mon.sample("idle")
        gauges = {g: s[g.removeprefix("gpt2_")] for g in GAUGES}
        if all(v == 0 for v in gauges.values()) or time.monotonic() >= t_end or mon.server_dead():
            return gauges
        await asyncio.sleep(0.5)


def rss_summary(samples: list[dict], duration: float, warmup_s: float) -> dict:
    pts = [(s["t"], s["rss_bytes"]) for s in samples if s["rss_bytes"] is not None]
    load = [(t, b) for t, b in pts if t <= duration + 1e-6]
    after = [(t, b) for t, b in load if t >= warmup_s]
    slope = slope_per_minute([(t, b / 1e6) for t, b in after])
    return {
        "start_bytes": load[0][1] if load else None,
        "after_warmup_bytes": after[0][1] if after else None,
        "after_warmup_t_s": after[0][0] if after else None,
        "end_bytes": load[-1][1] if load else None,
        "idle_end_bytes": pts[-1][1] if pts else None,
        "peak_sampled_bytes": max((b for _, b in pts), default=None),
        "growth_mb_per_min_after_warmup": slope,
        "samples_after_warmup": len(after),
        "warmup_s": warmup_s,
    }


def scan_log(path: Path | None) -> dict:
    """Tracebacks and ERROR/WARNING lines in the server's log."""
    if path is None or not path.exists():
        return {}
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    first_tb = ""
    if "Traceback" in text:
        i = text.index("Traceback")
        first_tb = text[max(0, text.rfind("\n", 0, i - 200)):i + 3000]
    return {
        "path": str(path),
        "tracebacks": text.count("Traceback (most recent call last)"),
        "error_lines": sum(" ERROR " in ln for ln in lines),
        "warning_lines": sum(" WARNING " in ln for ln in lines),
        "first_error_lines": [ln[:300] for ln in lines if " ERROR " in ln][:5],
        "first_traceback": first_tb,
    }


def counters_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in sorted(after.items())
            if k.startswith(COUNTERS) and v - before.get(k, 0.0)}


def report(result: dict) -> str:
    mb = lambda b: benchlib.fmt(b / 1e6 if b is not None else None, "MB")  # noqa: E731
    cfg = result["config"]
    out = [f"soak: {cfg['clients']} clients x {cfg['duration_s']:.0f} s, disconnect rate {cfg['disconnect_rate']}, "
           f"server {cfg['url']} (pid {cfg['pid']})",
           f"  {'route':<16} {'sent':>7} {'ok':>7} {'disconn.':>8} {'done first':>10} {'errors':>7}"]
    keys = ("sent", "ok", "disconnected", "completed_before_disconnect", "errors")
    for name, c in result["routes"].items():
        out.append(f"  {name:<16} " + " ".join(f"{c.get(k, 0):>{w}}" for k, w in zip(keys, (7, 7, 8, 10, 7))))
    t = result["totals"]
    out.append(f"  {'total':<16} " + " ".join(f"{t[k]:>{w}}" for k, w in zip(keys, (7, 7, 8, 10, 7))))
    out.append("  (done first: meant to be disconnected mid-stream, but the stream completed before)")
    d = result["disconnects"]
    out.append(f"disconnects: {sum(d.values())} ({', '.join(f'{k} {v}' for k, v in sorted(d.items())) or 'none'})")
    if result["errors"]:
        for k, v in sorted(result["errors"].items()):
            out.append(f"errors: {k} x{v}, first: {result['error_examples'][k][:200]}")
    else:
        out.append("errors: none")
    r = result["rss"]
    slope = r["growth_mb_per_min_after_warmup"]
    out.append(f"RSS: start {mb(r['start_bytes'])}, after warm-up (t={r['after_warmup_t_s']} s) "
               f"{mb(r['after_warmup_bytes'])}, end of load {mb(r['end_bytes'])}, "
               f"after idle {mb(r['idle_end_bytes'])}, peak sampled {mb(r['peak_sampled_bytes'])} "
               f"(VmHWM {mb(r.get('hwm_bytes'))})")
    out.append(f"RSS growth after warm-up: {'-' if slope is None else f'{slope:+.3f}'} MB/min "
               f"(least squares over {r['samples_after_warmup']} samples)")
    g = result["gauges_after_idle"]
    out.append(f"after {cfg['settle_s']:.0f} s idle: "
               + ", ".join(f"{k.removeprefix('gpt2_')} {v}" for k, v in g.items())
               + (" (LEAKED)" if result["leaked_slots"] else " (ok)"))
    sc = result["server_counters"]
    tok = sc.get("gpt2_generation_tokens_total", 0.0)
    out.append(f"server: {tok:,.0f} tokens generated ({tok / max(result['load_s'], 1e-9):.1f} tok/s); "
               + ", ".join(f"{k.removeprefix('gpt2_request_')} {v:.0f}" for k, v in sc.items()
                           if k.startswith(("gpt2_request_success", "gpt2_request_failure"))))
    if result.get("server_log"):
        sl = result["server_log"]
        out.append(f"server log {sl['path']}: {sl['tracebacks']} tracebacks, {sl['error_lines']} ERROR lines, "
                   f"{sl['warning_lines']} WARNING lines")
        out += [f"  {ln}" for ln in sl["first_error_lines"][:3]]
    out.append("PASS" if result["passed"] else "FAIL: " + "; ".join(result["failures"]))
    return "\n".join(out)


async def soak(args, url: str, pid: int | None, proc, prompts: list[str], headers: dict) -> dict:
    """The load, the idle check and the verdict, as the JSON report."""
    mon = Monitor(url, pid, headers, proc)
    try:
        before = await mon.metrics() or {}
        tally, info = await run_load(args, url, prompts, headers, mon)
        gauges = await settle(args, mon)
        after = await mon.metrics() or {}
    finally:
        await mon.http.aclose()
    rss = rss_summary(mon.samples, args.duration, args.warmup_fraction * args.duration)
    hwm = procs.peak_rss_bytes(pid) if pid else None
    # Linux updates VmHWM lazily (RSS freed without a hiwater update): an earlier VmRSS sample can exceed it.
    rss["hwm_bytes"] = None if hwm is None else max(hwm, rss["peak_sampled_bytes"] or 0)
    leaked = any(v != 0 for v in gauges.values())
    failures = [f"{k} x{v}" for k, v in sorted(tally.errors.items()) if k not in TOLERATED]
    if leaked:
        failures.append(f"slots not freed after idle: {gauges}")
    if "server_died_at_s" in info or mon.server_dead():
        failures.append(f"server exited (code {proc.poll()}) at t={info.get('server_died_at_s')} s")
    if info["cut_at_end"]:
        failures.append(f"{info['cut_at_end']} clients still waiting {args.request_timeout + 30:.0f} s after the end")
    totals = {k: tally.total(k) for k in ("sent", "ok", "disconnected", "completed_before_disconnect", "errors")}
    return {
        "config": {"clients": args.clients, "duration_s": args.duration, "disconnect_rate": args.disconnect_rate,
                   "new_tokens": [args.min_new_tokens, args.max_new_tokens], "seed": args.seed, "url": url,
                   "pid": pid, "sample_every_s": args.sample_every, "settle_s": args.settle,
                   "warmup_fraction": args.warmup_fraction},
        "load_s": info["load_s"],
        "routes": {k: {**{n: 0 for n in totals}, **dict(c)} for k, c in tally.routes.items()},
        "totals": totals,
        "disconnects": dict(tally.disconnects),
        "errors": dict(tally.errors),
        "error_examples": tally.examples,
        "rss": rss,
        "gauges_after_idle": gauges,
        "leaked_slots": leaked,
        "metrics_failures": mon.metrics_failures,
        "server_counters": counters_delta(before, after),
        "samples": mon.samples,
        "failures": failures,
        "passed": not failures,
    }


def start_server(args) -> tuple[str, object, Path, list[str]]:
    """`python -m serving` on a free loopback port; returns (url, process, log, command) once /health is 200."""
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="soak-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / "server.log"
    port = procs.free_port()
    cmd = [sys.executable, "-m", "serving", "--model", str(args.model.resolve()), "--host", "127.0.0.1",
           "--port", str(port), "--max-queue", str(max(64, 2 * args.clients)), "--log-level", "warning",
           *shlex.split(args.server_args)]
    print(f"server: {shlex.join(cmd)}\n  log {log}", flush=True)
    url = f"http://127.0.0.1:{port}"
    proc = procs.spawn(cmd, log=log)
    try:
        startup = procs.wait_healthy(url, proc, timeout=args.start_timeout, poll=0.5)
    except (RuntimeError, TimeoutError) as e:
        print(f"server log {log}:\n{procs.tail(log)}", flush=True)
        procs.stop(proc)
        raise RuntimeError(f"{e}: {procs.last_line(log)}") from None
    print(f"  ready after {startup:.1f} s", flush=True)
    return url, proc, log, cmd


def main(argv: list[str] | None = None) -> int:
    p = benchlib.arg_parser(__doc__)
    p.add_argument("--model", type=Path, default=REPO / "models" / "default", help="model directory to serve")
    p.add_argument("--url", help="attach to this running server (loopback only) instead of starting one")
    p.add_argument("--pid", type=int, help="with --url: the server's pid, for its RSS")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    p.add_argument("--disconnect-rate", type=float, default=0.15)
    p.add_argument("--min-new-tokens", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompt-max", type=int, default=160, help="longest prompt, tokens (shortest: 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS and /metrics samples")
    p.add_argument("--print-every", type=float, default=30.0, help="seconds between progress lines")
    p.add_argument("--warmup-fraction", type=float, default=0.2)
    p.add_argument("--settle", type=float, default=5.0, help="idle seconds after the load before checking gauges")
    p.add_argument("--settle-timeout", type=float, default=30.0)
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--server-args", default="", help="extra flags for `python -m serving`, one string")
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--log-dir", type=Path, help="server log directory (default: a temp dir)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report")
    args = p.parse_args(argv)
    if args.clients < 1 or args.duration <= 0 or not 0 <= args.disconnect_rate <= 1:
        p.error("need --clients >= 1, --duration > 0 and --disconnect-rate in [0, 1]")
    if not 1 <= args.min_new_tokens <= args.max_new_tokens:
        p.error("need 1 <= --min-new-tokens <= --max-new-tokens")
    if args.url:
        try:
            check_loopback(args.url)
        except ValueError as e:
            p.error(str(e))
    procs.install_signal_handlers()
    headers = {"Authorization": f"Bearer {os.environ['GPT2_API_KEY']}"} if os.environ.get("GPT2_API_KEY") else {}

    proc = log = None
    cmd: list[str] = []
    if args.url:
        url, pid = args.url.rstrip("/"), args.pid
    else:
        url, proc, log, cmd = start_server(args)
        pid = proc.pid
    try:
        info = httpx.get(url + "/info", headers=headers, timeout=10).json()
        prompt_max = min(args.prompt_max, info["max_total_tokens"] - args.max_new_tokens - 8)
        if prompt_max < 4:
            raise ValueError(f"the server's {info['max_total_tokens']} total tokens leave no room for prompts")
        prompts, lengths = prompt_mix(256, 4, prompt_max, args.seed)
        result = asyncio.run(soak(args, url, pid, proc, prompts, headers))
    finally:
        code = procs.stop(proc) if proc is not None else None
    result["config"].update(
        model=None if args.url else str(args.model), server_cmd=cmd,
        prompt_tokens={"min": min(lengths), "max": max(lengths), "median": benchlib.percentile(lengths, 50)},
        server_info={k: info.get(k) for k in ("max_batch_size", "max_queue", "max_total_tokens", "max_batched_tokens")})
    result["server_exit_code"] = code
    result["server_log"] = scan_log(log)
    benchlib.write_json(args.out, result)
    print(report(result), flush=True)
    print(f"wrote {args.out}", flush=True)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
