"""The HTTP layer in-process (FastAPI TestClient) over the fake model: wire formats, validation, errors, metrics."""

import contextlib
import json
import threading
import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from serving.api.app import create_app
from serving.config import EngineConfig
from serving_helpers import FAKE_INFO, FakeTokenizer, fake_greedy, fake_parts, fake_settings, parse_sse

TOK = FakeTokenizer()


@contextlib.contextmanager
def serve(wait=True, settings=None, **session_kwargs):
    s = settings or fake_settings()
    loader, box = fake_parts(EngineConfig.from_settings(s, FAKE_INFO), **session_kwargs)
    app = create_app(s, loader=loader, model_info=FAKE_INFO)
    with TestClient(app) as client:
        if wait:
            for _ in range(500):
                if client.get("/health").status_code == 200:
                    break
                time.sleep(0.01)
        yield client, box


@pytest.fixture(scope="module")
def client():
    with serve() as (c, _):
        yield c


def metrics(client) -> dict:
    out = {}
    for fam in text_string_to_metric_families(client.get("/metrics").text):
        for s in fam.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
            out[key] = s.value
    return out


# ---- health, info, tokenize ----------------------------------------------------------------------------------


def test_health_is_503_while_loading_then_200():
    gate = threading.Event()
    s = fake_settings()
    loader, _ = fake_parts(EngineConfig.from_settings(s, FAKE_INFO))

    def slow_loader():
        gate.wait(10)
        return loader()

    app = create_app(s, loader=slow_loader, model_info=FAKE_INFO)
    with TestClient(app) as c:
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["error"]["message"] == "Loading model"
        assert c.post("/generate", json={"inputs": "x"}).status_code == 503
        gate.set()
        for _ in range(500):
            if c.get("/health").status_code == 200:
                break
            time.sleep(0.01)
        assert c.get("/health").json() == {"status": "ok"}


def test_info_and_models(client):
    info = client.get("/info").json()
    assert info["model_id"] == "fake-gpt2" and info["max_total_tokens"] == 128 and info["max_input_tokens"] == 127
    assert info["stagger_tokens"] == 32 and info["max_batched_tokens"] == 128
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == "fake-gpt2"


def test_tokenize_and_detokenize(client):
    toks = client.post("/tokenize", json={"inputs": "hé"}).json()
    assert [t["id"] for t in toks] == [104, 195, 169]
    assert [(t["start"], t["stop"]) for t in toks] == [(0, 1), (1, 1), (1, 2)]
    assert client.post("/detokenize", json={"ids": [104, 105]}).json() == {"text": "hi"}
    assert client.post("/detokenize", json={"ids": [999]}).status_code == 422


# ---- TGI ----------------------------------------------------------------------------------------------------


def test_generate_details_and_headers(client):
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 6, "details": True, "decoder_input_details": True,
                                              "top_n_tokens": 2, "return_full_text": True}}
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    ref = fake_greedy(TOK.encode("Hello"), 6)
    out = r.json()
    assert out["generated_text"] == "Hello" + TOK.decode(ref)
    d = out["details"]
    assert d["finish_reason"] == "length" and d["generated_tokens"] == 6 and d["seed"] is None
    assert [t["id"] for t in d["tokens"]] == ref
    assert [t["id"] for t in d["prefill"]] == TOK.encode("Hello") and d["prefill"][0]["logprob"] is None
    assert all(len(tt) == 2 for tt in d["top_tokens"])
    assert d["top_tokens"][0][0]["id"] == ref[0]  # greedy: the chosen token is the best one
    for h in ("x-total-time", "x-queue-time", "x-inference-time", "x-time-per-token"):
        assert int(r.headers[h]) >= 0
    assert r.headers["x-prompt-tokens"] == "5" and r.headers["x-generated-tokens"] == "6"


def test_generate_stream_sse_format(client):
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 5, "details": True}}
    with client.stream("POST", "/generate_stream", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = list(r.iter_lines())
    assert all(not ln.startswith("data: ") for ln in lines)  # TGI writes `data:{...}`
    events = [json.loads(x) for x in parse_sse(lines)]
    assert [e["index"] for e in events] == [1, 2, 3, 4, 5]
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    last = events[-1]
    assert last["generated_text"] == "".join(e["token"]["text"] for e in events) == TOK.decode(
        fake_greedy(TOK.encode("Hello"), 5))
    assert last["details"] == {"finish_reason": "length", "generated_tokens": 5, "seed": None, "input_length": 5}


def test_compat_route_dispatches_on_stream(client):
    r = client.post("/", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 200 and "generated_text" in r.json()
    with client.stream("POST", "/", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}, "stream": True}) as r:
        assert len(parse_sse(list(r.iter_lines()))) == 2


def test_stop_sequences_never_reach_the_stream(client):
    full = TOK.decode(fake_greedy(TOK.encode("Story:"), 40))
    stop = full[12:15]
    body = {"inputs": "Story:", "parameters": {"max_new_tokens": 40, "stop": [stop], "details": True}}
    with client.stream("POST", "/generate_stream", json=body) as r:
        events = [json.loads(x) for x in parse_sse(list(r.iter_lines()))]
    streamed = "".join(e["token"]["text"] for e in events)
    assert streamed == full[: full.index(stop)] == events[-1]["generated_text"]
    assert events[-1]["details"]["finish_reason"] == "stop_sequence"


def test_sampling_is_seeded_and_do_sample_semantics(client):
    def gen(params):
        return client.post("/generate", json={"inputs": "Seed", "parameters": {"max_new_tokens": 8, "details": True,
                                                                              **params}}).json()

    a, b = gen({"do_sample": True, "seed": 42}), gen({"do_sample": True, "seed": 42})
    assert a == b and a["details"]["seed"] == 42
    greedy = TOK.decode(fake_greedy(TOK.encode("Seed"), 8))
    assert gen({})["generated_text"] == greedy
    # An explicit do_sample=false is a true argmax even with sampling parameters; absent do_sample samples.
    assert gen({"do_sample": False, "temperature": 5.0, "top_k": 50})["generated_text"] == greedy
    assert gen({"temperature": 5.0, "seed": 1})["details"]["seed"] == 1


def test_truncate_keeps_the_last_tokens(client):
    r = client.post("/generate", json={"inputs": "abcdefgh", "parameters": {"max_new_tokens": 3, "truncate": 3,
                                                                          "details": True}})
    assert r.json()["generated_text"] == TOK.decode(fake_greedy(TOK.encode("fgh"), 3))


@pytest.mark.parametrize(
    "body, param",
    [
        ({"inputs": "x", "parameters": {"temperature": 0}}, "temperature"),
        ({"inputs": "x", "parameters": {"temperature": -1.0}}, "temperature"),
        ({"inputs": "x", "parameters": {"top_p": 1.0}}, "top_p"),
        ({"inputs": "x", "parameters": {"top_p": 0}}, "top_p"),
        ({"inputs": "x", "parameters": {"top_k": 0}}, "top_k"),
        ({"inputs": "x", "parameters": {"typical_p": 1.5}}, "typical_p"),
        ({"inputs": "x", "parameters": {"repetition_penalty": 0}}, "repetition_penalty"),
        ({"inputs": "x", "parameters": {"frequency_penalty": 3}}, "frequency_penalty"),
        ({"inputs": "x", "parameters": {"max_new_tokens": 0}}, "max_new_tokens"),
        ({"inputs": "x", "parameters": {"max_new_tokens": -5}}, "max_new_tokens"),
        ({"inputs": "x", "parameters": {"max_new_tokens": 10**9}}, "max_new_tokens"),
        ({"inputs": "x" * 200, "parameters": {"max_new_tokens": 1}}, "inputs"),
        ({"inputs": "x", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}, "stop"),
        ({"inputs": "x", "parameters": {"top_n_tokens": 10}}, "top_n_tokens"),
        ({"inputs": "x", "parameters": {"best_of": 2}}, "best_of"),
        ({"inputs": "x", "parameters": {"watermark": True}}, "watermark"),
        ({"inputs": "x", "parameters": {"seed": -1}}, "seed"),
        ({"inputs": "x", "parameters": {"truncate": 0}}, "truncate"),
        ({"inputs": "x", "parameters": {"temperature": "hot"}}, "temperature"),
        ({"inputs": "x", "parameters": {"max_new_tokens": 1.5}}, "max_new_tokens"),
        ({"inputs": "x", "parameters": {"do_sample": "yes"}}, "do_sample"),
        ({"inputs": ""}, "inputs"),
        ({"inputs": 5}, "inputs"),
        ({}, "inputs"),
    ],
)
def test_tgi_validation_is_422_and_names_the_parameter(client, body, param):
    r = client.post("/generate", json=body)
    assert r.status_code == 422, r.text
    err = r.json()
    assert err["error_type"] == "validation" and param in err["error"], err


@pytest.mark.parametrize("raw", [b'{"inputs": "a\xff\xfe"}', b"{not json", b"[1, 2]", b"", b"null"])
def test_malformed_bodies_are_422(client, raw):
    r = client.post("/generate", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    r = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_tgi_ignores_unknown_fields_but_own_routes_refuse_them(client):
    r = client.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 1, "made_up": 1}, "x": 2})
    assert r.status_code == 200
    r = client.post("/score", json={"texts": ["ab"], "made_up": 1})
    assert r.status_code == 422 and "made_up" in r.json()["error"]


def test_decoder_input_details_is_refused_when_streaming(client):
    r = client.post("/generate_stream", json={"inputs": "x", "parameters": {"decoder_input_details": True}})
    assert r.status_code == 422 and "decoder_input_details" in r.json()["error"]


# ---- OpenAI -------------------------------------------------------------------------------------------------


def test_completions_prompt_forms_n_and_usage(client):
    for prompt, n_prompts in (("Hi", 1), (["Hi", "Yo"], 2), (TOK.encode("Hi"), 1), ([TOK.encode("Hi"), [104]], 2)):
        r = client.post("/v1/completions", json={"model": "fake-gpt2", "prompt": prompt, "max_tokens": 3, "n": 2})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion" and len(body["choices"]) == 2 * n_prompts
        assert [c["index"] for c in body["choices"]] == list(range(2 * n_prompts))
        assert body["usage"]["completion_tokens"] == 6 * n_prompts
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    greedy = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "temperature": 0}).json()
    assert greedy["choices"][0]["text"] == TOK.decode(fake_greedy(TOK.encode("Hi"), 4))
    assert greedy["choices"][0]["finish_reason"] == "length"


def test_echo_logprobs_scoring_with_max_tokens_zero(client):
    r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 0, "echo": True, "logprobs": 1})
    assert r.status_code == 200, r.text
    ch = r.json()["choices"][0]
    assert ch["text"] == "Hello"
    lp = ch["logprobs"]
    assert lp["tokens"] == list("Hello") and lp["token_logprobs"][0] is None
    assert all(isinstance(x, float) for x in lp["token_logprobs"][1:])
    assert lp["text_offset"] == [0, 1, 2, 3, 4]
    scored = client.post("/score", json={"texts": ["Hello"]}).json()["results"][0]
    assert [t["logprob"] for t in scored["tokens"]] == lp["token_logprobs"]


def test_completions_stream_ends_with_done(client):
    body = {"prompt": "Hi", "max_tokens": 4, "stream": True, "temperature": 0,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as r:
        lines = list(r.iter_lines())
    assert all(ln.startswith("data: ") for ln in lines if ln)
    payloads = parse_sse(lines)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == TOK.decode(
        fake_greedy(TOK.encode("Hi"), 4))
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "x", "temperature": 3}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "n": 1000}, "n"),
        ({"prompt": "x", "logprobs": 50}, "logprobs"),
        ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 10**9}, "max_tokens"),
        ({"prompt": "x" * 200}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [99999]}, "prompt"),
        ({"prompt": "x", "presence_penalty": -3}, "presence_penalty"),
        ({"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "seed": -2}, "seed"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": "x", "max_tokens": "10"}, "max_tokens"),
        ({"prompt": "x", "unknown_field": 1}, "unknown_field"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"prompt": 3}, "prompt"),
        ({}, "prompt"),
    ],
)
def test_openai_validation_is_400_with_param(client, body, param):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"], err


def test_unknown_model_is_404(client):
    r = client.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"})
    assert r.status_code == 404 and "gpt-4" in r.json()["error"]["message"]


# ---- scoring ------------------------------------------------------------------------------------------------


def test_score_perplexity(client):
    r = client.post("/score", json={"texts": ["hello there", "a"], "add_bos": True, "top_n": 2})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert res[0]["num_tokens"] == 11 and res[0]["num_scored"] == 11  # add_bos: every text token is scored
    mean = res[0]["total_logprob"] / 11
    assert abs(res[0]["mean_logprob"] - mean) < 1e-9
    assert abs(res[0]["perplexity"] - 2.718281828459045 ** (-mean)) < 1e-6
    assert len(res[0]["tokens"][0]["top"]) == 2
    plain = client.post("/score", json={"texts": ["a"]}).json()["results"][0]
    assert plain["num_scored"] == 0 and plain["perplexity"] is None
    assert client.post("/score", json={"texts": []}).status_code == 422
    assert client.post("/score", json={"texts": [""]}).status_code == 422


# ---- auth, limits, errors, metrics --------------------------------------------------------------------------


def test_api_key_and_body_limit():
    with serve(settings=fake_settings(api_key="sekret", max_body_bytes=200)) as (c, _):
        assert c.get("/health").status_code == 200  # probes need no key
        r = c.post("/generate", json={"inputs": "x"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert c.post("/v1/completions", json={"prompt": "x"}).json()["error"]["code"] == 401
        bad = {"Authorization": "Bearer wrong"}
        assert c.post("/generate", json={"inputs": "x"}, headers=bad).status_code == 401
        ok = {"Authorization": "Bearer sekret"}
        one = {"inputs": "x", "parameters": {"max_new_tokens": 1}}
        assert c.post("/generate", json=one, headers=ok).status_code == 200
        r = c.post("/generate", json={"inputs": "x" * 500}, headers=ok)
        assert r.status_code == 413


def test_engine_failure_is_424_then_stream_error_event_and_health_reports_death():
    def fail(ids, pos):
        raise RuntimeError("device lost")

    with serve(fail=fail) as (c, _):
        r = c.post("/generate", json={"inputs": "x"})
        assert r.status_code == 424 and r.json()["error_type"] == "generation"
        h = c.get("/health")
        assert h.status_code == 200 and "device lost" in h.json()["last_error"]
        with c.stream("POST", "/generate_stream", json={"inputs": "x"}) as r:
            events = [json.loads(x) for x in parse_sse(list(r.iter_lines()))]
        assert "error" in events[-1]
        c.post("/v1/completions", json={"prompt": "x"})
        for _ in range(200):
            if c.get("/health").status_code == 503:
                break
            time.sleep(0.01)
        h = c.get("/health")
        assert h.status_code == 503 and "consecutive" in h.json()["error"]["message"]
        assert c.post("/generate", json={"inputs": "x"}).status_code == 503


def test_metrics_parse_and_count_requests():
    with serve() as (c, _):
        for i in range(3):
            assert c.post("/generate", json={"inputs": f"m{i}", "parameters": {"max_new_tokens": 4}}).status_code == 200
        c.post("/v1/completions", json={"prompt": "abc", "max_tokens": 2})
        c.post("/generate", json={"inputs": "x", "parameters": {"top_k": -1}})
        m = metrics(c)
    assert m["gpt2_request_success_total{finish_reason=length}"] == 4
    assert m["gpt2_generation_tokens_total"] == 14
    assert m["gpt2_prompt_tokens_total"] == 2 * 3 + 3
    assert m["gpt2_request_failure_total{reason=validation}"] == 1
    assert m["gpt2_time_to_first_token_seconds_count"] == 4
    assert m["gpt2_e2e_request_latency_seconds_count"] == 4
    assert m["gpt2_inter_token_latency_seconds_count"] == 14 - 4
    assert m["gpt2_requests_running"] == 0 and m["gpt2_requests_waiting"] == 0
    assert m["gpt2_kv_cache_slots_total"] == 4 and m["gpt2_kv_cache_usage_ratio"] == 0
    assert m["gpt2_batch_size_count"] > 0


def test_the_waiting_gauge_counts_requests_beyond_the_free_slots():
    """gpt2_requests_waiting is what the autoscaler scales on: requests the stagger holds back a step or two
    while slots are free are not waiting for capacity."""
    from serving.api.metrics import Metrics
    from serving.engine.scheduler import Scheduler, SchedulerConfig
    from serving.engine.sequence import Sequence
    from serving.sampling_params import SamplingParams

    def waiting(m):
        return next(s.value for f in m.registry.collect() for s in f.samples if s.name == "gpt2_requests_waiting")

    s = Scheduler(SchedulerConfig(num_slots=2, max_waiting=8, max_step_tokens=64, prefill_chunk=64, stagger_tokens=4))
    m = Metrics(max_batch_size=2)
    for i in range(3):
        s.add([Sequence(str(i), [1, 2, 3], SamplingParams(max_new_tokens=4))])
    m.on_queue(s)
    assert waiting(m) == 1  # 3 waiting, 2 free slots
    s.schedule(0.0)  # starts 0 and 1 (the second one's 3 tokens reach the stagger), slots full
    m.on_queue(s)
    assert (s.num_waiting, waiting(m)) == (1, 1)
    s2 = Scheduler(SchedulerConfig(num_slots=8, max_waiting=8, max_step_tokens=64, prefill_chunk=64,
                                   stagger_tokens=4))
    for i in range(4):
        s2.add([Sequence(str(i), [1, 2, 3], SamplingParams(max_new_tokens=4))])
    s2.schedule(0.0)  # two start, two are held back with six slots free
    m.on_queue(s2)
    assert (s2.num_waiting, waiting(m)) == (2, 0)


def test_vllm_prompt_logprobs(client):
    r = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 1, "prompt_logprobs": 2})
    assert r.status_code == 200, r.text
    pl = r.json()["choices"][0]["prompt_logprobs"]
    assert pl[0] is None and len(pl) == 3
    assert str(ord("b")) in pl[1] and 2 <= len(pl[1]) <= 3
    echo = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 0, "echo": True, "logprobs": 0}).json()
    assert pl[1][str(ord("b"))]["logprob"] == echo["choices"][0]["logprobs"]["token_logprobs"][1]
    with client.stream("POST", "/v1/completions", json={"prompt": "abc", "max_tokens": 2, "stream": True,
                                                         "prompt_logprobs": 0}) as r:
        chunks = [json.loads(p) for p in parse_sse(list(r.iter_lines()))[:-1]]
    assert chunks[0]["choices"][0]["prompt_logprobs"][0] is None
