"""The real server as a separate uvicorn process over a tiny random MindSpore GPT-2 (slow, but run in CI).

Two servers share one session-scoped model directory, both with the default engine settings: a 16-slot one for
clients, batching and validation, and a 2-slot one with a 1-deep queue for shared passes, disconnects, 429 and
graceful shutdown.
"""

import asyncio
import json
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from huggingface_hub import InferenceClient
from prometheus_client.parser import text_string_to_metric_families

from serving_helpers import REPO, ServerProcess, make_tiny_model, parse_sse

pytestmark = pytest.mark.slow

PROMPTS16 = [f"Request number {i}: the quick brown fox" + " jumps" * (i % 5) for i in range(16)]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def server(tiny_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    # The default settings: the batching tests compare concurrent greedy output with solo runs token for token.
    s = ServerProcess(tiny_model, "--max-batch-size", "16", "--max-queue", "32", "--prefill-chunk", "64",
                      "--compile-cache", str(logs / "graphs"),
                      log_path=logs / "server.log")
    try:
        s.wait_healthy()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="session")
def small_server(tiny_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs-small")
    s = ServerProcess(tiny_model, "--max-batch-size", "2", "--max-queue", "1", "--prefill-chunk", "64",
                      "--shutdown-timeout", "30", log_path=logs / "server.log")
    try:
        s.wait_healthy()
        yield s
    finally:
        s.stop()


def gen(url, prompt, **params):
    params.setdefault("max_new_tokens", 10)
    r = httpx.post(url + "/generate", json={"inputs": prompt, "parameters": {"details": True, **params}}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def ids_of(out):
    return [t["id"] for t in out["details"]["tokens"]]


def metric_samples(url) -> dict:
    out = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


# ---- clients ------------------------------------------------------------------------------------------------


def test_openai_client_completions_streaming_and_echo_scoring(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    model = client.models.list().data[0].id
    greedy = gen(server.url, "Hello there, general", max_new_tokens=8)["generated_text"]
    r = client.completions.create(model=model, prompt="Hello there, general", max_tokens=8, temperature=0)
    assert r.choices[0].text == greedy and r.usage.completion_tokens == 8
    streamed = client.completions.create(model=model, prompt="Hello there, general", max_tokens=8, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == greedy
    scored = client.completions.create(model=model, prompt="The cat sat on the mat", max_tokens=0, echo=True,
                                       logprobs=1)
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text == "The cat sat on the mat"
    assert "".join(lp.tokens) == "The cat sat on the mat" and lp.token_logprobs[0] is None
    ref = httpx.post(server.url + "/score", json={"texts": ["The cat sat on the mat"]}, timeout=60).json()
    res = ref["results"][0]
    assert [t["logprob"] for t in res["tokens"]][1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-5)
    assert res["perplexity"] > 1


def test_huggingface_hub_text_generation(server):
    client = InferenceClient(base_url=server.url)
    greedy = gen(server.url, "Once upon a time", max_new_tokens=6)
    assert client.text_generation("Once upon a time", max_new_tokens=6) == greedy["generated_text"]
    details = client.text_generation("Once upon a time", max_new_tokens=6, details=True, decoder_input_details=True)
    assert [t.id for t in details.details.tokens] == ids_of(greedy)
    assert details.details.finish_reason == "length" and len(details.details.prefill) == 4
    tokens = list(client.text_generation("Once upon a time", max_new_tokens=6, stream=True))
    assert "".join(tokens) == greedy["generated_text"]
    events = list(client.text_generation("Once upon a time", max_new_tokens=6, stream=True, details=True))
    assert events[-1].generated_text == greedy["generated_text"] and events[-1].details.generated_tokens == 6


def test_greedy_equals_the_models_own_generate(server, tiny_model):
    prompts = ["Hello, my name is", "In 1776, the", "def fibonacci(n):"]
    ids = [[t["id"] for t in httpx.post(server.url + "/tokenize", json={"inputs": p}).json()] for p in prompts]
    script = (
        "import json, sys\n"
        "from model.runtime import set_device\n"
        "set_device('CPU')\n"
        "from model.checkpoint import load_model_dir\n"
        "from model.inference import generate\n"
        "m = load_model_dir(sys.argv[1])\n"
        "print(json.dumps([generate(m, p, 24, eos_token_id=50256) for p in json.loads(sys.argv[2])]))\n"
    )
    res = subprocess.run([sys.executable, "-c", script, str(tiny_model), json.dumps(ids)], cwd=REPO,
                         capture_output=True, text=True, timeout=600, check=True)
    want = json.loads(res.stdout.strip().splitlines()[-1])
    for p, w in zip(prompts, want):
        assert ids_of(gen(server.url, p, max_new_tokens=24)) == w


# ---- batching -----------------------------------------------------------------------------------------------


async def _stream_ids(client: httpx.AsyncClient, url: str, prompt: str, n: int) -> list[int]:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": n}}
    out = []
    async with client.stream("POST", url + "/generate_stream", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            for payload in parse_sse([line]):
                event = json.loads(payload)
                assert "error" not in event, event
                out.append(event["token"]["id"])
    return out


def test_16_concurrent_streams_are_batched_and_each_matches_its_solo_run(server):
    n = 40
    alone = [ids_of(gen(server.url, p, max_new_tokens=n)) for p in PROMPTS16]
    before = metric_samples(server.url)

    async def run_all():
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(timeout=300, limits=limits) as c:
            return await asyncio.gather(*(_stream_ids(c, server.url, p, n) for p in PROMPTS16))

    together = asyncio.run(run_all())
    after = metric_samples(server.url)
    assert together == alone
    # Some decode step ran all 16 sequences: observations above the le=15 bucket grew.
    big = lambda m: m["gpt2_batch_size_count"] - m["gpt2_batch_size_bucket{le=15.0}"]  # noqa: E731
    assert big(after) - big(before) > 0
    assert after["gpt2_request_success_total{finish_reason=length}"] - before.get(
        "gpt2_request_success_total{finish_reason=length}", 0) == 16


def test_a_request_group_is_prefilled_in_one_pass(small_server):
    url = small_server.url
    solo = httpx.post(url + "/v1/completions", json={"prompt": "Packed together", "max_tokens": 12,
                                                       "temperature": 0}, timeout=120).json()
    before = metric_samples(url)
    both = httpx.post(url + "/v1/completions", json={"prompt": "Packed together", "max_tokens": 12,
                                                       "temperature": 0, "n": 2}, timeout=120).json()
    after = metric_samples(url)
    assert [c["text"] for c in both["choices"]] == [solo["choices"][0]["text"]] * 2
    # Both prompts (queued at once) shared one 2-row prefill pass, then 2-row decode steps.
    rows = lambda m, name: m[f"{name}_sum"]  # noqa: E731
    assert after["gpt2_prefill_batch_size_count"] - before["gpt2_prefill_batch_size_count"] == 1
    assert rows(after, "gpt2_prefill_batch_size") - rows(before, "gpt2_prefill_batch_size") == 2
    assert after["gpt2_batch_size_bucket{le=1.0}"] == before["gpt2_batch_size_bucket{le=1.0}"]


# ---- stop strings and validation ---------------------------------------------------------------------------


def test_stop_strings_never_leak_into_streamed_text(server):
    params = {"max_new_tokens": 30, "do_sample": True, "seed": 7, "temperature": 0.8}
    full = gen(server.url, "A story:", **params)["generated_text"]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = full[: full.index(stop)]
    body = {"inputs": "A story:", "parameters": {**params, "stop": [stop], "details": True}}
    with httpx.stream("POST", server.url + "/generate_stream", json=body, timeout=120) as r:
        events = [json.loads(p) for p in parse_sse(list(r.iter_lines()))]
    text = ""
    for e in events:
        text += e["token"]["text"]
        assert stop not in text
    assert text == cut == events[-1]["generated_text"]
    assert events[-1]["details"]["finish_reason"] == "stop_sequence"
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    chunks = client.completions.create(model="tiny", prompt="A story:", max_tokens=30, seed=7, temperature=0.8,
                                       top_p=1.0, stop=[stop], stream=True)
    assert stop not in "".join(c.choices[0].text for c in chunks if c.choices)


BAD_REQUESTS = [
    ("/generate", b'{"inputs": "x", ', 422, "JSON"),
    ("/generate", b'{"inputs": "\xff\xfe bytes"}', 422, "UTF-8"),
    ("/generate", b'{"inputs": 42}', 422, "inputs"),
    ("/generate", b'{"inputs": "x", "parameters": {"max_new_tokens": "ten"}}', 422, "max_new_tokens"),
    ("/generate", b'{"inputs": "x", "parameters": {"temperature": -0.5}}', 422, "temperature"),
    ("/generate", b'{"inputs": "x", "parameters": {"top_p": 1.5}}', 422, "top_p"),
    ("/generate", b'{"inputs": "x", "parameters": {"max_new_tokens": 100000000}}', 422, "max_new_tokens"),
    ("/generate", b'{"inputs": ""}', 422, "inputs"),
    ("/generate", json.dumps({"inputs": "word " * 400}).encode(), 422, "inputs"),
    ("/generate_stream", b'{"inputs": "x", "parameters": {"top_k": -3}}', 422, "top_k"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": -2}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "x", "bogus": true}', 400, "bogus"),
    ("/v1/completions", b'{"prompt": "", "max_tokens": 1}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": "x", "logprobs": 99}', 400, "logprobs"),
    ("/v1/completions", b'{"prompt": [50257]}', 400, "prompt"),
    ("/v1/completions", b'\x80\x81', 400, "UTF-8"),
    ("/score", b'{"texts": "not a list"}', 422, "texts"),
]


@pytest.mark.parametrize("path, body, status, needle", BAD_REQUESTS)
def test_bad_inputs_get_4xx_with_a_message_and_the_server_stays_healthy(server, path, body, status, needle):
    r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    message = err["message"] if isinstance(err, dict) else err
    assert needle in message, message
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_metrics_counters_match_the_requests_sent(server):
    before = metric_samples(server.url)
    outs = [gen(server.url, f"count me {i}", max_new_tokens=3 + i) for i in range(3)]
    httpx.post(server.url + "/generate", json={"inputs": "x", "parameters": {"top_k": 0}}, timeout=60)
    after = metric_samples(server.url)
    delta = lambda k: after.get(k, 0) - before.get(k, 0)  # noqa: E731
    assert delta("gpt2_request_success_total{finish_reason=length}") == 3
    assert delta("gpt2_generation_tokens_total") == sum(o["details"]["generated_tokens"] for o in outs) == 12
    assert delta("gpt2_prompt_tokens_total") == 3 * len(httpx.post(server.url + "/tokenize",
                                                                     json={"inputs": "count me 0"}).json())
    assert delta("gpt2_request_failure_total{reason=validation}") == 1
    assert delta("gpt2_time_to_first_token_seconds_count") == 3
    assert delta("gpt2_e2e_request_latency_seconds_count") == 3
    assert after["gpt2_requests_running"] == 0 and after["gpt2_kv_cache_slots_used"] == 0


# ---- slots, queue, shutdown (2 slots, 1 waiting) -----------------------------------------------------------


def test_disconnect_frees_the_slot_for_a_waiting_request_and_a_full_queue_is_429(small_server):
    url = small_server.url
    long_body = {"inputs": "Go on and on", "parameters": {"max_new_tokens": 240}}

    async def scenario():
        async with httpx.AsyncClient(timeout=120) as c:

            async def gauge(name: str) -> float:
                text = (await c.get(url + "/metrics")).text
                return next(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)

            async def wait_for(name: str, value: float) -> None:
                deadline = time.monotonic() + 30
                while await gauge(name) < value:
                    assert time.monotonic() < deadline, f"{name} never reached {value}"
                    await asyncio.sleep(0.02)

            started = {"a": asyncio.Event(), "b": asyncio.Event()}
            leave_a = asyncio.Event()

            async def open_stream(tag: str) -> int:
                got = 0
                async with c.stream("POST", url + "/generate_stream", json=long_body) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data:"):
                            got += 1
                            started[tag].set()
                            if tag == "a" and leave_a.is_set():
                                return got  # leaving the block closes the connection mid-stream
                return got

            a = asyncio.ensure_future(open_stream("a"))
            b = asyncio.ensure_future(open_stream("b"))
            await asyncio.wait_for(asyncio.gather(started["a"].wait(), started["b"].wait()), 60)
            waiting = asyncio.ensure_future(c.post(url + "/generate", json={
                "inputs": "me next", "parameters": {"max_new_tokens": 3}}))
            await wait_for("gpt2_requests_waiting", 1)
            t0 = time.monotonic()
            r = await c.post(url + "/generate", json={"inputs": "no room", "parameters": {"max_new_tokens": 3}})
            assert r.status_code == 429 and r.json()["error_type"] == "overloaded", r.text
            assert r.headers["retry-after"] == "1"
            assert time.monotonic() - t0 < 2.0
            leave_a.set()  # client A goes away at its next token
            got_a = await asyncio.wait_for(a, 30)
            done = await asyncio.wait_for(waiting, 60)
            assert done.status_code == 200 and done.json()["generated_text"]
            assert not b.done(), "the waiting request should have taken A's slot, not waited for B"
            assert got_a < 240
            b.cancel()

    asyncio.run(scenario())
    m = metric_samples(url)
    assert m["gpt2_request_failure_total{reason=aborted}"] >= 1
    assert m["gpt2_request_failure_total{reason=overloaded}"] == 1


def test_graceful_shutdown_lets_a_running_request_finish(small_server):
    body = {"inputs": "Finish me", "parameters": {"max_new_tokens": 60}}
    events = []
    with httpx.stream("POST", small_server.url + "/generate_stream", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
                if len(events) == 3:
                    small_server.proc.send_signal(signal.SIGTERM)
    assert len(events) == 60 and events[-1]["generated_text"] is not None
    assert small_server.proc.wait(60) == 0
