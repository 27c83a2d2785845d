"""Hostile input in-process (fake model): numbers at every edge, lone surrogates on every echoing route, malformed
bodies, and a request whose parameters make sampling raise. Each gets a clear 4xx naming the problem (or fails
alone), never a 5xx, and never harms the requests batched with it."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

import model.sampler
from serving.api.app import create_app
from serving.config import EngineConfig
from serving.sampling_params import MAX_SEED
from serving_helpers import FAKE_INFO, FakeTokenizer, fake_greedy, fake_parts, fake_settings, parse_sse
from test_api import metrics, serve

TOK = FakeTokenizer()
HUGE = 10**20


@pytest.fixture(scope="module")
def client():
    with serve(settings=fake_settings(max_score_texts=64)) as (c, _):
        yield c


def gen(**parameters):
    return {"inputs": "hi", "parameters": parameters}


def comp(**fields):
    return {"prompt": "hi", "max_tokens": 4, **fields}


# Every numeric parameter of every route at its edges: huge, negative, beyond float32, NaN.
EDGES = [
    ("/generate", gen(top_k=HUGE), "top_k"),
    ("/generate", gen(top_k=2**31), "top_k"),
    ("/generate", gen(max_new_tokens=HUGE), "max_new_tokens"),
    ("/generate", gen(max_new_tokens=-1), "max_new_tokens"),
    ("/generate", gen(seed=MAX_SEED + 1), "seed"),
    ("/generate", gen(seed=-1), "seed"),
    ("/generate", gen(truncate=HUGE), "truncate"),
    ("/generate", gen(top_n_tokens=HUGE), "top_n_tokens"),
    ("/generate", gen(best_of=HUGE), "best_of"),
    ("/generate", gen(temperature=1e300), "temperature"),
    ("/generate", gen(repetition_penalty=1e-300), "repetition_penalty"),
    ("/generate", gen(repetition_penalty=1e300), "repetition_penalty"),
    ("/generate", gen(frequency_penalty=1e300), "frequency_penalty"),
    ("/generate", gen(top_p=1e-400), "top_p"),
    ("/generate_stream", gen(top_k=HUGE), "top_k"),
    ("/v1/completions", comp(top_k=HUGE), "top_k"),
    ("/v1/completions", comp(n=HUGE), "n"),
    ("/v1/completions", comp(max_tokens=HUGE), "max_tokens"),
    ("/v1/completions", comp(logprobs=HUGE), "logprobs"),
    ("/v1/completions", comp(prompt_logprobs=-1), "prompt_logprobs"),
    ("/v1/completions", comp(min_tokens=HUGE), "min_tokens"),
    ("/v1/completions", comp(stop_token_ids=[HUGE]), "stop_token_ids"),
    ("/v1/completions", comp(stop_token_ids=[-1]), "stop_token_ids"),
    ("/v1/completions", comp(seed=HUGE), "seed"),
    ("/v1/completions", comp(prompt=[HUGE]), "prompt"),
    ("/v1/completions", comp(prompt=[[1, -5]]), "prompt"),
    ("/v1/completions", comp(logit_bias={"1": 1e300}), "logit_bias"),
    ("/v1/completions", comp(repetition_penalty=1e-300), "repetition_penalty"),
    ("/v1/completions", comp(min_p=1e300), "min_p"),
    ("/v1/completions", comp(typical_p=-1.0), "typical_p"),
    ("/v1/completions", comp(temperature=1e300), "temperature"),
    ("/v1/completions", comp(best_of=HUGE), "best_of"),
    # Keys are ASCII decimal token ids: "²" passes str.isdigit(), and int("١٢") reads 12.
    ("/v1/completions", comp(logit_bias={"²": 1}), "logit_bias"),
    ("/v1/completions", comp(logit_bias={"١٢": 1}), "logit_bias"),
    ("/v1/completions", comp(logit_bias={"1" * 5000: 1}), "logit_bias"),
    ("/v1/completions", comp(logit_bias={" 1": 1}), "logit_bias"),
    # Long lists cost per-token work on the engine thread, for every request in the batch.
    ("/v1/completions", comp(stop_token_ids=list(range(257))), "stop_token_ids"),
    ("/v1/completions", comp(logit_bias={str(i): 1.0 for i in range(301)}), "logit_bias"),
    ("/v1/completions", comp(stop=["x" * 513]), "stop"),
    ("/generate", gen(stop=["x" * 513]), "stop"),
    ("/score", {"texts": ["hi"], "top_n": HUGE}, "top_n"),
    ("/detokenize", {"ids": [HUGE]}, "ids"),
    ("/detokenize", {"ids": [-1]}, "ids"),
]


@pytest.mark.parametrize("route,body,param", EDGES)
def test_every_numeric_edge_is_a_4xx_naming_the_parameter(client, route, body, param):
    r = client.post(route, json=body)
    assert r.status_code in (400, 422), (r.status_code, r.text)
    err = r.json()["error"]
    message = err["message"] if isinstance(err, dict) else err
    assert f"`{param}" in message or (isinstance(err, dict) and err["param"] == param), message


def test_nan_and_infinity_are_refused(client):
    for route, body in (("/generate", '{"inputs": "hi", "parameters": {"temperature": NaN}}'),
                        ("/v1/completions", '{"prompt": "hi", "top_p": Infinity}'),
                        ("/v1/completions", '{"prompt": "hi", "min_p": NaN}')):
        r = client.post(route, content=body, headers={"content-type": "application/json"})
        assert r.status_code in (400, 422), r.text


def test_a_tiny_temperature_samples_the_most_likely_token_not_token_zero(client):
    # 1e-38 used to overflow float32 logits / T into NaN and give a run of token 0 ("!!!!" in GPT-2).
    greedy = client.post("/generate", json=gen(max_new_tokens=8, do_sample=False)).json()["generated_text"]
    for t in (1e-38, 1e-300, 5e-324):
        r = client.post("/generate", json=gen(max_new_tokens=8, do_sample=True, temperature=t, seed=1))
        assert r.status_code == 200 and r.json()["generated_text"] == greedy, (t, r.text)
    r = client.post("/v1/completions", json=comp(max_tokens=8, temperature=1e-30, seed=1))
    assert r.json()["choices"][0]["text"] == greedy


# ---- every text the server returns encodes -------------------------------------------------------------------

LONE = "a\ud800b"
REPLACED = "a\ufffdb"


def raw(body) -> dict:
    # As a client would send it: JSON's \\ud800 escape (a str with a lone surrogate has no UTF-8 form).
    return {"content": json.dumps(body), "headers": {"content-type": "application/json"}}


def test_lone_surrogates_on_every_echoing_route(client):
    r = client.post("/score", **raw({"texts": [LONE]}))
    assert r.status_code == 200 and r.json()["results"][0]["text"] == REPLACED
    full = {"inputs": LONE, "parameters": {"max_new_tokens": 2, "return_full_text": True}}
    r = client.post("/generate", **raw(full))
    assert r.status_code == 200 and r.json()["generated_text"].startswith(REPLACED)
    with client.stream("POST", "/generate_stream", **raw(full)) as r:
        events = [json.loads(x) for x in parse_sse(list(r.iter_lines()))]
    assert events[-1]["generated_text"].startswith(REPLACED)
    r = client.post("/v1/completions", **raw(comp(prompt=LONE, echo=True, max_tokens=2)))
    assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith(REPLACED)
    with client.stream("POST", "/v1/completions", **raw(comp(prompt=LONE, echo=True, stream=True))) as r:
        payloads = parse_sse(list(r.iter_lines()))
    assert payloads[-1] == "[DONE]" and json.loads(payloads[0])["choices"][0]["text"].startswith(REPLACED)
    r = client.post("/v1/completions", **raw(comp(model=LONE)))
    assert r.status_code == 404 and "\ufffd" in r.json()["error"]["message"]
    r = client.post("/v1/completions", **raw({**comp(), LONE: 1}))
    assert r.status_code == 400, r.text
    r = client.post("/tokenize", **raw({"inputs": LONE}))
    assert r.status_code == 200 and [t["stop"] for t in r.json()][-1] == 3


# ---- errors that say what is wrong -----------------------------------------------------------------------------


def test_malformed_bodies_say_what_is_wrong(client):
    headers = {"content-type": "application/json"}
    cases = [
        ("[" * 50_000 + "]" * 50_000, "nested too deeply"),
        ('{"inputs": "x", "parameters": {"seed": ' + "9" * 5000 + "}}", "too many digits"),
        (b'{"inputs": "\xff\xfe"}', "UTF-8"),
        ('{"inputs": ', "not valid JSON"),
    ]
    for body, says in cases:
        for route in ("/generate", "/v1/completions"):
            r = client.post(route, content=body, headers=headers)
            assert r.status_code in (400, 422), (route, r.status_code, r.text[:200])
            assert says in r.text, (route, says, r.text[:300])


def test_union_fields_name_the_accepted_forms(client):
    r = client.post("/v1/completions", json=comp(prompt=[1.5]))
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and "`prompt`" in message and "list[int]" in message and "str" in message, message


def test_a_seed_at_the_top_of_its_range_works_with_n(client):
    r = client.post("/v1/completions", json=comp(seed=MAX_SEED, n=2, temperature=1.0))
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 2


def test_more_sequences_than_the_server_can_ever_hold_is_400_not_429(client):
    # fake settings: 4 slots + 8 waiting = 12 sequences at most; 4 prompts x n=4 = 16 never fit.
    r = client.post("/v1/completions", json=comp(prompt=["a", "b", "c", "d"], n=4))
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text


def test_stream_options_need_stream(client):
    r = client.post("/v1/completions", json=comp(stream_options={"include_usage": True}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"


def test_an_unexpected_exception_is_a_well_formed_500_that_closes_the_connection():
    def boom():
        raise RuntimeError("bug")

    app = create_app(fake_settings(), loader=fake_parts(EngineConfig())[0], model_info=FAKE_INFO)
    app.add_api_route("/boom", boom)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/boom")
        assert r.status_code == 500 and r.headers["connection"] == "close"
        assert r.json()["error"].startswith("Internal server error")


def test_a_queue_timeout_says_queue_timeout_on_the_wire_and_in_the_metrics():
    # One slot, a slow model: the second request waits past --queue-timeout.
    with serve(settings=fake_settings(max_batch_size=1, queue_timeout=0.2), delay=0.05) as (c, _):
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(c.post, "/generate", json=gen(max_new_tokens=20))
            while metrics(c).get("gpt2_requests_running", 0) < 1:
                pass
            second = c.post("/generate", json=gen(max_new_tokens=2))
            assert first.result().status_code == 200
        assert second.status_code == 503 and second.json()["error_type"] == "queue_timeout", second.text
        assert second.headers["retry-after"] == "1"
        assert metrics(c)["gpt2_request_failure_total{reason=queue_timeout}"] == 1


def test_refusals_before_the_routes_are_counted():
    with serve(settings=fake_settings(max_body_bytes=100, api_key="k")) as (c, _):
        ok = {"Authorization": "Bearer k"}
        assert c.post("/generate", json=gen()).status_code == 401
        assert c.post("/generate", json={"inputs": "x" * 200}, headers=ok).status_code == 413
        text = c.get("/metrics", headers=ok).text
        assert 'gpt2_request_failure_total{reason="authentication"} 1.0' in text, text
        assert 'gpt2_request_failure_total{reason="payload_too_large"} 1.0' in text


def test_the_batch_size_gauge_reads_zero_when_idle(client):
    assert client.post("/generate", json=gen(max_new_tokens=3)).status_code == 200
    assert metrics(client)["gpt2_batch_current_size"] == 0


# ---- one request's fault never reaches its neighbours ---------------------------------------------------------


def test_a_request_whose_sampling_raises_fails_alone(monkeypatch):
    real = model.sampler.sample
    batches = []

    def faulty(logits, rows):
        # Stands for a parameter that makes the sampler raise (a validation gap); seed 666 marks it.
        batches.append(len(rows))
        if any(r.params.seed == 666 for r in rows):
            raise OverflowError("injected")
        return real(logits, rows)

    bodies = [
        {"inputs": "abc", "parameters": {"max_new_tokens": 12, "do_sample": False}},
        {"inputs": "defg", "parameters": {"max_new_tokens": 12, "do_sample": True, "seed": 7}},
        {"inputs": "hijkl", "parameters": {"max_new_tokens": 12, "do_sample": False}},
    ]
    bad = {"inputs": "xyz", "parameters": {"max_new_tokens": 12, "do_sample": True, "seed": 666}}
    with serve(delay=0.02) as (c, _):
        solo = [c.post("/generate", json=b).json()["generated_text"] for b in bodies]
        assert solo[0] == TOK.decode(fake_greedy(TOK.encode("abc"), 12))
        monkeypatch.setattr(model.sampler, "sample", faulty)
        for _ in range(4):  # more than max_consecutive_failures: the engine must stay up
            with ThreadPoolExecutor(4) as pool:
                futures = [pool.submit(c.post, "/generate", json=b) for b in [bad, *bodies]]
                results = [f.result() for f in futures]
            assert results[0].status_code == 424 and "injected" in results[0].json()["error"]
            assert [r.json()["generated_text"] for r in results[1:]] == solo
        assert max(batches) > 1, "the faulty request never shared a batch"
        health = c.get("/health")
        assert health.status_code == 200 and "injected" in health.json()["last_error"]


def test_sampling_params_bound_what_costs_per_token_work():
    from serving.errors import ValidationError
    from serving.sampling_params import SamplingParams

    for kwargs, says in [
        ({"logit_bias": tuple((i, 1.0) for i in range(301))}, "at most 300"),
        ({"stop_token_ids": tuple(range(257))}, "at most 256"),
        ({"stop": ("x" * 513,)}, "at most 512"),
        ({"top_k": 2**31}, "top_k"),
        ({"temperature": 101.0}, "temperature"),
    ]:
        with pytest.raises(ValidationError, match=says):
            SamplingParams(**kwargs)
    assert SamplingParams(temperature=1e-300).temperature == 0.01  # raised to what float32 logits can take
    assert SamplingParams(temperature=0.0).greedy
