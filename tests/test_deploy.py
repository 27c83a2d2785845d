"""deploy/: request ids and JSON access logs (in-process), the Kubernetes manifests, the Compose file, the nginx and
Prometheus configs, the Grafana dashboard's metric names, and the whole stack on loopback (deploy/check_stack.py:
two replicas, real nginx and Prometheus, a replica killed mid-load)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from serving.api.access_log import valid_request_id
from serving.api.metrics import Metrics
from serving_helpers import REPO, make_tiny_model
from test_api import serve

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"


# ---- X-Request-Id and the access log --------------------------------------------------------------------------


@pytest.fixture()
def access_lines(caplog):
    caplog.set_level(logging.INFO, logger="serving.access")
    logging.getLogger("serving.access").propagate = True  # __main__'s configure_access_log is not run here
    return lambda: [json.loads(r.getMessage()) for r in caplog.records if r.name == "serving.access"]


def test_request_id_is_honoured_echoed_and_logged_with_token_counts(access_lines):
    with serve() as (client, _):
        r = client.post("/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 5}},
                        headers={"X-Request-Id": "client-id-1"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "client-id-1"
        with client.stream("POST", "/generate_stream", json={"inputs": "hey", "parameters": {"max_new_tokens": 3}},
                           headers={"X-Request-Id": "stream-1"}) as s:
            assert s.headers["x-request-id"] == "stream-1"
            s.read()
        r = client.post("/v1/completions", json={"model": "fake-gpt2", "prompt": ["ab", "cd"], "max_tokens": 4,
                                                 "n": 2, "temperature": 0}, headers={"X-Request-Id": "multi"})
        assert r.status_code == 200
    lines = {e["request_id"]: e for e in access_lines()}
    one = lines["client-id-1"]
    assert one["route"] == "/generate" and one["method"] == "POST" and one["status"] == 200
    assert one["prompt_tokens"] == 5 and one["generated_tokens"] == 5 and one["finish_reason"] == "length"
    assert one["total_ms"] >= one["ttft_ms"] >= one["queue_ms"] >= 0
    stream = lines["stream-1"]
    assert (stream["route"], stream["status"], stream["prompt_tokens"], stream["generated_tokens"]) == (
        "/generate_stream", 200, 3, 3)
    multi = lines["multi"]
    assert multi["sequences"] == 4 and multi["prompt_tokens"] == 8 and multi["generated_tokens"] == 16


def test_invalid_or_missing_request_ids_are_replaced_and_errors_carry_one(access_lines):
    with serve() as (client, _):
        for given in ("x" * 129, "caf\u00e9", "   ", "tab\there"):
            r = client.get("/health", headers={"X-Request-Id": given.encode("utf-8")})
            assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"]), given
        r = client.post("/generate", json={"inputs": ""}, headers={"X-Request-Id": "bad"})
        assert r.status_code == 422 and r.headers["x-request-id"] == "bad"
        # Refused by the guard middleware (body too large) before any route: still an id and a log line.
        r = client.post("/generate", content=b"x" * (3 * 1024 * 1024), headers={"X-Request-Id": "big"})
        assert r.status_code == 413 and r.headers["x-request-id"] == "big"
        assert client.get("/metrics", headers={"X-Request-Id": "y" * 128}).headers["x-request-id"] == "y" * 128
    lines = {e["request_id"]: e for e in access_lines()}
    assert lines["bad"]["status"] == 422 and lines["bad"]["generated_tokens"] is None
    assert lines["big"]["status"] == 413


def test_request_id_validation():
    assert valid_request_id(b"abc-123 x") == "abc-123 x"
    assert valid_request_id(b"~" * 128) == "~" * 128
    for bad in (b"", b"a" * 129, b"\x00a", b"caf\xc3\xa9", b"\x7f", b"  "):
        assert valid_request_id(bad) is None


def test_access_log_off_logs_nothing_but_keeps_ids(access_lines):
    from serving_helpers import fake_settings

    with serve(settings=fake_settings(access_log="off")) as (client, _):
        assert client.get("/health", headers={"X-Request-Id": "q"}).headers["x-request-id"] == "q"
    assert access_lines() == []


# ---- the Grafana dashboard and the alerts use metric names the server exports ----------------------------------


def exported_names() -> set[str]:
    """Every sample name the server's /metrics can carry (histogram buckets/sums/counts, counters' _total)."""
    m = Metrics(max_batch_size=4)
    names = set()
    for metric in m.registry.collect():
        names.add(metric.name)
        for suffix in ("_total", "_bucket", "_sum", "_count"):
            names.add(metric.name + suffix)
    return names


def promql_metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bgpt2_[a-z0-9_]+", expr))


def dashboard_exprs() -> list[str]:
    dash = json.loads((DEPLOY / "grafana" / "gpt2-serving.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_dashboard_covers_the_issue_and_uses_only_exported_metrics():
    exprs = dashboard_exprs()
    exported = exported_names()
    used = set().union(*map(promql_metric_names, exprs))
    assert used and used <= exported, used - exported
    text = "\n".join(exprs)
    for needed in ("gpt2_request_success_total", "gpt2_request_failure_total", "gpt2_time_to_first_token_seconds_bucket",
                   "gpt2_inter_token_latency_seconds_bucket", "gpt2_prompt_tokens_total",
                   "gpt2_generation_tokens_total", "gpt2_requests_running", "gpt2_requests_waiting",
                   "gpt2_kv_cache_slots_used", "gpt2_batch_size_sum"):
        assert needed in text, needed
    for q in ("0.5", "0.9", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(gpt2_time_to_first_token_seconds_bucket" in text
        assert f"histogram_quantile({q}, sum by (instance, le) (rate(gpt2_inter_token_latency_seconds_bucket" in text
    assert "by (instance)" in text and "by (reason)" in text
    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uids = {p["datasource"]["uid"] for p in json.loads((DEPLOY / "grafana" / "gpt2-serving.json").read_text())["panels"]
            if "datasource" in p}
    assert uids == {ds["datasources"][0]["uid"]}


def test_alert_rules_use_exported_metrics_and_pass_promtool():
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = set().union(*map(promql_metric_names, exprs))
    assert used and used <= exported_names()
    if shutil.which("promtool") is None:
        pytest.skip("promtool (Debian package prometheus) is not installed: `make deploy-tools` installs it")
    subprocess.run(["promtool", "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")], check=True,
                   capture_output=True, timeout=60)


def test_documented_metric_names_are_the_exported_ones():
    doc = (REPO / "docs" / "DEPLOY.md").read_text()
    documented = set(re.findall(r"`(gpt2_[a-z0-9_]+)", doc))
    families = {m.name + ("_total" if m.type == "counter" else "") for m in Metrics(max_batch_size=4).registry.collect()}
    assert families <= documented, families - documented
    assert documented <= exported_names(), documented - exported_names()


# ---- Kubernetes, Compose, nginx ----------------------------------------------------------------------------------


def k8s_docs() -> dict[str, dict]:
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and "kind" in doc and doc.get("apiVersion", "").find("kustomize") < 0:
                out[doc["kind"]] = doc
    return out


def test_kubernetes_manifests_have_the_fields_that_matter():
    docs = k8s_docs()
    dep, svc, pdb, hpa = docs["Deployment"], docs["Service"], docs["PodDisruptionBudget"], docs[
        "HorizontalPodAutoscaler"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    args = c["args"]
    shutdown = float(args[args.index("--shutdown-timeout") + 1])
    # SIGTERM drains for --shutdown-timeout, then uvicorn's 5 s for the last events: SIGKILL must come later.
    assert pod["terminationGracePeriodSeconds"] > shutdown + 5
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    live = c["livenessProbe"]
    assert "httpGet" not in live or live["httpGet"]["path"] != "/health"  # 503 while draining must not kill it
    assert live["periodSeconds"] * live["failureThreshold"] >= 60
    assert c["resources"]["requests"]["memory"] == "3Gi"  # the measured 3.12 GB peak RSS (docs/DEPLOY.md)
    assert any(m["mountPath"] == "/model" and m["readOnly"] for m in c["volumeMounts"])
    labels = dep["spec"]["selector"]["matchLabels"]
    assert dep["spec"]["template"]["metadata"]["labels"] == labels
    assert svc["spec"]["selector"] == labels and pdb["spec"]["selector"]["matchLabels"] == labels
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": dep["metadata"]["name"]}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "gpt2_requests_waiting"
    adapter = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert "gpt2_requests_waiting" in rule["seriesQuery"] and rule["name"]["as"] == "gpt2_requests_waiting"
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(p.name for p in K8S.glob("*.yaml")
                                               if p.name not in ("kustomization.yaml", "prometheus-adapter-values.yaml"))


def test_kubernetes_manifests_pass_the_schema_check():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (PyPI) is not installed: "
                             "`make deploy-tools` installs it; the field checks above still ran")
    for path in sorted(K8S.glob("*.yaml")):
        if path.name in ("kustomization.yaml", "prometheus-adapter-values.yaml"):
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            kv.validate(doc, "1.30", strict=True)


def test_compose_file():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    s = compose["services"]
    assert set(s) == {"gpt2", "nginx", "prometheus", "grafana"}
    gpt2 = s["gpt2"]
    assert gpt2["build"]["dockerfile"] == "Dockerfile" and (DEPLOY / gpt2["build"]["context"] / "Dockerfile").is_file()
    assert any(v.endswith(":/model:ro") for v in gpt2["volumes"])
    assert any(v.startswith("compile-cache:") for v in gpt2["volumes"]) and "compile-cache" in compose["volumes"]
    assert "--compile-cache" in " ".join(gpt2["command"])
    assert "replicas" in gpt2["deploy"]
    assert int(gpt2["stop_grace_period"].rstrip("s")) > 35
    for name, svc in s.items():
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("./"):
                assert (DEPLOY / src).exists(), (name, src)


def test_nginx_config_says_what_the_issue_asks():
    conf = (DEPLOY / "nginx" / "gpt2.conf.template").read_text()
    for directive in ("least_conn;", "proxy_buffering off;", "proxy_read_timeout 600s;", "client_header_timeout",
                      "client_body_timeout", "limit_conn ", "proxy_next_upstream error timeout",
                      "proxy_set_header X-Request-Id $gpt2_request_id;", "escape=json"):
        assert directive in conf, directive


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed: `make deploy-tools` installs it")
def test_nginx_accepts_the_config(tmp_path):
    sys.path.insert(0, str(DEPLOY))
    try:
        import check_stack
    finally:
        sys.path.remove(str(DEPLOY))
    conf = check_stack.nginx_config(tmp_path, 18080, [18001, 18002])
    subprocess.run(["nginx", "-t", "-q", "-p", str(tmp_path), "-e", str(tmp_path / "err.log"), "-c", str(conf)],
                   check=True, capture_output=True, timeout=30)


# ---- the stack on loopback -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_stack_on_loopback(tmp_path):
    """deploy/check_stack.py: 2 replicas behind a real nginx, scraped by a real Prometheus; one replica killed
    with SIGKILL mid-load, then restarted. Needs nginx and prometheus (`make deploy-tools` installs them as root);
    without them the test fails rather than skips, as the browser test does."""
    missing = [b for b in ("nginx", "prometheus") if shutil.which(b) is None]
    assert not missing, f"{missing} not installed: run `make deploy-tools` (apt-get install nginx prometheus)"
    model = make_tiny_model(tmp_path / "tiny")
    out = tmp_path / "summary.json"
    proc = subprocess.run([sys.executable, str(DEPLOY / "check_stack.py"), "--model", str(model), "--workdir",
                           str(tmp_path / "stack"), "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env={**os.environ})
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    print(json.dumps(summary, indent=2))
    failed = [k for k, v in summary["checks"].items() if not v]
    assert not failed and proc.returncode == 0, (failed, summary)
