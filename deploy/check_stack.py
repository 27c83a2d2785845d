"""The deploy/ stack on loopback, without Docker: replicas of `python -m serving`, a real nginx and a real
Prometheus run with the very config files in deploy/ (filled in only with loopback ports and paths), then:

1. streaming and non-streaming load through nginx: both replicas serve (their JSON access logs name the request
   ids the client sent), and X-Request-Id comes back on every response;
2. replica 0 is killed with SIGKILL mid-load: requests started after the kill all succeed on the other replica,
   and the only failures are requests that were in flight at the kill;
3. replica 0 restarts (warm, from its compile cache) and serves again once its /health is 200;
4. every PromQL expression of deploy/grafana/gpt2-serving.json returns data from Prometheus.

    python deploy/check_stack.py --model models/default [--workdir DIR] [--json OUT]

Needs `nginx` and `prometheus` on PATH (Debian: apt-get install nginx prometheus). Everything it starts is a child
process with its files under --workdir (a temporary folder by default), listens on 127.0.0.1 only, and is stopped
at the end; every wait is bounded. Prints one JSON summary; exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

DEPLOY = Path(__file__).resolve().parent
REPO = DEPLOY.parent
RATE_INTERVAL = "1m"  # what Grafana's $__rate_interval is replaced with in the Prometheus queries


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float, interval: float = 0.2):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            value = check()
            if value:
                return value
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(interval)
    raise TimeoutError(f"{what}: not after {timeout:g} s")


# ---- the processes -----------------------------------------------------------------------------------------------

class Replica:
    def __init__(self, index: int, model: Path, port: int, workdir: Path, extra: list[str]) -> None:
        self.index, self.model, self.port, self.workdir, self.extra = index, model, port, workdir, extra
        self.url = f"http://127.0.0.1:{port}"
        self.starts = 0
        self.proc: subprocess.Popen | None = None
        self.log_paths: list[Path] = []

    def start(self) -> None:
        self.starts += 1
        log_path = self.workdir / f"replica{self.index}-{self.starts}.log"
        self.log_paths.append(log_path)
        cmd = [sys.executable, "-m", "serving", "--model", str(self.model), "--host", "127.0.0.1",
               "--port", str(self.port), "--compile-cache", str(self.workdir / f"compile-cache-{self.index}"),
               "--access-log", "json", *self.extra]
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout: float) -> float:
        t0 = time.monotonic()

        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"replica {self.index} exited:\n{self.log()[-3000:]}")
            return httpx.get(self.url + "/health", timeout=3).status_code == 200

        wait_for(f"replica {self.index} healthy", healthy, timeout, 0.25)
        return time.monotonic() - t0

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.log_paths if p.exists())

    def request_ids(self) -> set[str]:
        """The request ids of this replica's JSON access-log lines (every start)."""
        ids = set()
        for line in self.log().splitlines():
            if line.startswith("{"):
                try:
                    ids.add(json.loads(line)["request_id"])
                except (ValueError, KeyError):
                    pass
        return ids

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def render(template: str, values: dict[str, str]) -> str:
    """envsubst for the named variables only (as the nginx image does): nginx's own $variables stay."""
    for name, value in values.items():
        template = template.replace("${" + name + "}", value)
    leftover = re.findall(r"\$\{[A-Z_]+\}", template)
    if leftover:
        raise ValueError(f"unfilled placeholders {leftover}")
    return template


def nginx_config(workdir: Path, port: int, replica_ports: list[int]) -> Path:
    """deploy/nginx/gpt2.conf.template and upstreams.conf with loopback addresses, in a top-level config that keeps
    every file (pid, logs, temporary bodies) in workdir and stays in the foreground."""
    lines = [ln for ln in (DEPLOY / "nginx" / "upstreams.conf").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(lines) == 1 and "gpt2:8000" in lines[0], lines
    (workdir / "upstreams.conf").write_text("".join(lines[0].replace("gpt2:8000", f"127.0.0.1:{p}") + "\n"
                                                    for p in replica_ports))
    (workdir / "gpt2.conf").write_text(render((DEPLOY / "nginx" / "gpt2.conf.template").read_text(), {
        "NGINX_PORT": f"127.0.0.1:{port}",
        "GPT2_UPSTREAMS": str(workdir / "upstreams.conf"),
        "NGINX_ACCESS_LOG": str(workdir / "nginx-access.log"),
    }))
    tmp = workdir / "nginx-tmp"
    tmp.mkdir(exist_ok=True)
    temp_paths = "\n".join(f"    {kind}_temp_path {tmp / kind};" for kind in ("client_body", "proxy", "fastcgi",
                                                                              "uwsgi", "scgi"))
    main = workdir / "nginx.conf"
    main.write_text(f"""daemon off;
worker_processes 1;
pid {workdir / 'nginx.pid'};
error_log {workdir / 'nginx-error.log'} warn;
events {{ worker_connections 512; }}
http {{
{temp_paths}
    include {workdir / 'gpt2.conf'};
}}
""")
    return main


def prometheus_config(workdir: Path, replica_ports: list[int]) -> Path:
    """deploy/prometheus/prometheus.yml with the `gpt2` job's DNS discovery replaced by the loopback replicas."""
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "gpt2"]
    del job["dns_sd_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{p}" for p in replica_ports]}]
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", workdir / "alerts.yml")
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ---- load --------------------------------------------------------------------------------------------------------

@dataclass
class Result:
    request_id: str
    kind: str
    start: float
    end: float = 0.0
    ok: bool = False
    error: str = ""
    echoed_id: bool = False


PROMPTS = ["ROMEO.\n", "To be, or not to be", "KING HENRY.\nMy lords,", "Good morrow, my lord."]


def one_request(client: httpx.Client, base: str, n: int, tag: str, max_new_tokens: int, model: str) -> Result:
    kind = ("generate", "generate_stream", "completions_stream")[n % 3]
    rid = f"{tag}-{n}"
    r = Result(rid, kind, time.monotonic())
    headers = {"X-Request-Id": rid}
    prompt = PROMPTS[n % len(PROMPTS)]
    try:
        if kind == "generate":
            resp = client.post(base + "/generate", headers=headers,
                               json={"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens}})
            r.echoed_id = resp.headers.get("x-request-id") == rid
            r.ok = resp.status_code == 200 and "generated_text" in resp.json()
            r.error = "" if r.ok else f"HTTP {resp.status_code}: {resp.text[:200]}"
        else:
            path, body = (("/generate_stream", {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens}})
                          if kind == "generate_stream" else
                          ("/v1/completions", {"model": model, "prompt": prompt, "max_tokens": max_new_tokens,
                                               "stream": True}))
            with client.stream("POST", base + path, headers=headers, json=body) as resp:
                r.echoed_id = resp.headers.get("x-request-id") == rid
                done = False
                for line in resp.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        raise RuntimeError(f"error event {event}")
                    done = done or event.get("generated_text") is not None or any(
                        c.get("finish_reason") for c in event.get("choices", []))
                r.ok = resp.status_code == 200 and done
                r.error = "" if r.ok else f"HTTP {resp.status_code}, stream ended without its final event"
    except (httpx.HTTPError, RuntimeError, ValueError) as e:
        r.error = f"{type(e).__name__}: {e}"
    r.end = time.monotonic()
    return r


@dataclass
class Load:
    """`workers` clients in a loop through nginx until stopped (or `limit` requests)."""

    base: str
    tag: str
    model: str
    workers: int = 4
    max_new_tokens: int = 32
    limit: int = 2000
    results: list[Result] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._n = 0
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(self.workers)]

    def _work(self) -> None:
        with httpx.Client(timeout=httpx.Timeout(60, connect=5)) as client:
            while not self._stop.is_set():
                with self._lock:
                    if self._n >= self.limit:
                        return
                    n = self._n
                    self._n += 1
                r = one_request(client, self.base, n, self.tag, self.max_new_tokens, self.model)
                with self._lock:
                    self.results.append(r)

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def done(self) -> int:
        with self._lock:
            return len(self.results)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(90)


# ---- the checks --------------------------------------------------------------------------------------------------

def dashboard_expressions() -> list[str]:
    dash = json.loads((DEPLOY / "grafana" / "gpt2-serving.json").read_text())
    exprs = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            exprs.append(target["expr"])
    return exprs


def run(model: Path, workdir: Path, replicas: int, extra: list[str]) -> dict:
    for binary in ("nginx", "prometheus"):
        if shutil.which(binary) is None:
            raise SystemExit(f"check_stack: `{binary}` is not installed (Debian: apt-get install nginx prometheus)")
    summary: dict = {"checks": {}}
    checks = summary["checks"]
    ports = [free_port() for _ in range(replicas)]
    nginx_port, prom_port = free_port(), free_port()
    base = f"http://127.0.0.1:{nginx_port}"
    prom = f"http://127.0.0.1:{prom_port}"
    reps = [Replica(i, model, p, workdir, extra) for i, p in enumerate(ports)]
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        t0 = time.monotonic()
        for r in reps:
            r.start()
        conf = nginx_config(workdir, nginx_port, ports)
        subprocess.run(["nginx", "-t", "-q", "-p", str(workdir), "-e", str(workdir / "nginx-error.log"),
                        "-c", str(conf)], check=True, timeout=30)
        logs.append(open(workdir / "nginx.out", "wb"))
        procs.append(subprocess.Popen(["nginx", "-p", str(workdir), "-e", str(workdir / "nginx-error.log"),
                                       "-c", str(conf)], stdout=logs[-1], stderr=subprocess.STDOUT))
        pconf = prometheus_config(workdir, ports)
        logs.append(open(workdir / "prometheus.out", "wb"))
        procs.append(subprocess.Popen(["prometheus", f"--config.file={pconf}",
                                       f"--storage.tsdb.path={workdir / 'prometheus-data'}",
                                       f"--web.listen-address=127.0.0.1:{prom_port}"],
                                      stdout=logs[-1], stderr=subprocess.STDOUT))
        for r in reps:
            r.wait_healthy(600)
        summary["replicas_ready_s"] = round(time.monotonic() - t0, 1)
        wait_for("nginx", lambda: httpx.get(base + "/health", timeout=3).status_code == 200, 30)
        model = httpx.get(base + "/v1/models", timeout=10).json()["data"][0]["id"]
        wait_for("prometheus", lambda: httpx.get(prom + "/-/ready", timeout=3).status_code == 200, 60)

        # 1. Load through nginx: both replicas serve; ids echoed; a client error carries its id too.
        with Load(base, "warm", model, workers=4, limit=24) as load:
            wait_for("warm-up load", lambda: load.done() >= 24, 180)
        res = load.results
        served = [len(r.request_ids() & {x.request_id for x in res}) for r in reps]
        bad = httpx.post(base + "/generate", json={"inputs": ""}, headers={"X-Request-Id": "bad-1"}, timeout=10)
        generated = httpx.post(base + "/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}},
                               timeout=30)
        summary["load"] = {"requests": len(res), "failures": sum(not r.ok for r in res), "per_replica": served}
        checks["load_all_ok"] = all(r.ok for r in res)
        checks["both_replicas_served"] = all(n > 0 for n in served)
        checks["request_id_echoed"] = all(r.echoed_id for r in res) and bad.headers.get("x-request-id") == "bad-1"
        checks["request_id_generated"] = bool(re.fullmatch(r"[0-9a-f]{32}", generated.headers.get("x-request-id", "")))
        checks["client_error_passed_through"] = bad.status_code == 422

        # 2. SIGKILL replica 0 mid-load.
        with Load(base, "kill", model, workers=4, limit=400) as load:
            wait_for("load before the kill", lambda: load.done() >= 12, 120)
            kill_time = time.monotonic()
            reps[0].kill()
            after = lambda: [r for r in load.results if r.start > kill_time]  # noqa: E731
            wait_for("load after the kill", lambda: len(after()) >= 30, 180)
        res = load.results
        post = [r for r in res if r.start > kill_time]
        in_flight = [r for r in res if r.start <= kill_time < r.end]
        failed = [r for r in res if not r.ok]
        first_ok = min((r.end for r in post if r.ok), default=None)
        summary["failover"] = {
            "requests": len(res), "failures": len(failed), "in_flight_at_kill": len(in_flight),
            "started_after_kill": len(post), "failed_after_kill": sum(not r.ok for r in post),
            "failover_s": None if first_ok is None else round(first_ok - kill_time, 3),
            "max_latency_after_kill_s": round(max((r.end - r.start for r in post), default=0), 3),
            "failure_examples": [f"{r.kind}: {r.error}" for r in failed[:3]],
        }
        checks["failures_only_in_flight"] = all(r.start <= kill_time for r in failed) and len(failed) <= len(
            in_flight)
        checks["requests_after_kill_succeed"] = bool(post) and all(r.ok for r in post)

        # 3. Restart replica 0: warm from its compile cache, and back in the pool once /health is 200.
        restart = time.monotonic()
        reps[0].start()
        summary["restart_healthy_s"] = round(reps[0].wait_healthy(600), 1)
        with Load(base, "rejoin", model, workers=2, limit=400) as load:
            ids = lambda: {r.request_id for r in load.results}  # noqa: E731
            try:
                wait_for("the restarted replica serving", lambda: reps[0].request_ids() & ids(), 60, 0.5)
                checks["restarted_replica_rejoined"] = True
                summary["rejoin_s"] = round(time.monotonic() - restart, 1)
            except TimeoutError:
                checks["restarted_replica_rejoined"] = False
            checks["rejoin_load_ok"] = all(r.ok for r in load.results)

            # 4. Every dashboard expression returns data (load still running, so the rates are not empty).
            def query(expr: str) -> list:
                resp = httpx.get(prom + "/api/v1/query", params={"query": expr}, timeout=10).json()
                if resp.get("status") != "success":
                    raise ValueError(f"{expr}: {resp}")
                return resp["data"]["result"]

            wait_for("Prometheus to scrape both replicas", lambda: len(
                [x for x in query('up{job="gpt2"}') if x["value"][1] == "1"]) == replicas, 60, 1)
            # Client errors, so that the failure series exist (a restarted replica's counters start empty).
            for k in range(4):
                httpx.post(base + "/generate", json={"inputs": ""}, headers={"X-Request-Id": f"bad-{k + 2}"},
                           timeout=10)
            empty = []
            deadline = time.monotonic() + 90
            for expr in dashboard_expressions():
                q = expr.replace("$__rate_interval", RATE_INTERVAL)
                while not query(q) and time.monotonic() < deadline:
                    time.sleep(1)
                if not query(q):
                    empty.append(q)
            summary["prometheus"] = {"expressions": len(dashboard_expressions()), "without_data": empty}
            checks["dashboard_expressions_have_data"] = not empty
        summary["nginx_log_has_request_ids"] = "\"request_id\":\"warm-0\"" in (
            workdir / "nginx-access.log").read_text()
        checks["nginx_logs_request_ids"] = summary["nginx_log_has_request_ids"]
    finally:
        summary["replica_exit_codes"] = [r.stop() for r in reps]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGQUIT if p.args[0] == "nginx" else signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
        for f in logs:
            f.close()
    checks["replicas_drained_exit_0"] = all(c == 0 for c in summary["replica_exit_codes"])
    summary["ok"] = all(checks.values())
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="model directory the replicas serve")
    p.add_argument("--workdir", type=Path, help="where configs, logs and data go (default: a temporary folder)")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the summary here")
    p.add_argument("--replica-args", default="--max-batch-size 4 --prefill-chunk 64 --log-level warning",
                   help="extra options of every replica")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gpt2-stack-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        summary = run(args.model.resolve(), workdir.resolve(), args.replicas, args.replica_args.split())
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
