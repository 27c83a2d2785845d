"""The OpenAPI document in-process (no model): statuses per route family, stream and metrics media types, the
settings-dependent ranges, the API-key variant, and the answers the schema fuzz test (tests/test_fuzz.py, against
a healthy real server) never sees: 503 while loading, 401, 413."""

import re
import threading

import schemathesis
from fastapi.testclient import TestClient
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from serving.api.app import create_app
from serving.api.openapi import _digits_below
from serving.config import EngineConfig
from serving_helpers import FAKE_INFO, fake_parts, fake_settings


def document(**overrides) -> dict:
    s = fake_settings(**overrides)
    loader, _ = fake_parts(EngineConfig.from_settings(s, FAKE_INFO))
    return create_app(s, loader=loader, model_info=FAKE_INFO).openapi()


def responses(doc, method, path) -> dict:
    return doc["paths"][path][method]["responses"]


def test_statuses_per_route_family():
    doc = document()
    assert set(responses(doc, "post", "/generate")) == {"200", "408", "413", "422", "424", "429", "503"}
    # A stream's later errors are its final event: only the errors raised before it starts have a status.
    assert set(responses(doc, "post", "/generate_stream")) == {"200", "408", "413", "422", "429", "503"}
    assert set(responses(doc, "post", "/v1/completions")) == {"200", "400", "404", "408", "413", "429", "500", "503"}
    # 503 everywhere: past --max-connections uvicorn answers `Service Unavailable` in plain text.
    assert set(responses(doc, "get", "/v1/models")) == {"200", "503"}
    assert set(responses(doc, "get", "/health")) == {"200", "503"}
    assert set(responses(doc, "post", "/generate")["503"]["content"]) == {"application/json", "text/plain"}
    tgi_422 = responses(doc, "post", "/generate")["422"]["content"]["application/json"]["schema"]
    oai_400 = responses(doc, "post", "/v1/completions")["400"]["content"]["application/json"]["schema"]
    assert tgi_422 == {"$ref": "#/components/schemas/ErrorResponse"}
    assert oai_400 == {"$ref": "#/components/schemas/OpenAIErrorResponse"}
    assert "Retry-After" in responses(doc, "post", "/generate")["429"]["headers"]
    # FastAPI's own 422 body is never sent.
    assert "HTTPValidationError" not in doc["components"]["schemas"]


def test_media_types():
    doc = document()
    assert set(responses(doc, "post", "/generate_stream")["200"]["content"]) == {"text/event-stream"}
    assert set(responses(doc, "post", "/")["200"]["content"]) == {"application/json", "text/event-stream"}
    assert set(responses(doc, "post", "/v1/completions")["200"]["content"]) == {"application/json",
                                                                                "text/event-stream"}
    assert set(responses(doc, "get", "/metrics")["200"]["content"]) == {"text/plain"}


def test_ranges_follow_the_settings():
    doc = document(max_top_n_tokens=7, max_stop_sequences=3, max_n=5, max_score_texts=9, max_total_tokens=100)
    schemas = doc["components"]["schemas"]
    params = schemas["GenerateParameters"]["properties"]
    assert params["top_n_tokens"]["anyOf"][0]["maximum"] == 7
    assert params["stop"]["maxItems"] == 3
    assert params["max_new_tokens"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 99}
    completion = schemas["CompletionRequest"]["properties"]
    assert completion["n"]["maximum"] == 5
    assert completion["model"]["anyOf"][0]["enum"] == ["fake-gpt2"]
    assert schemas["ScoreRequest"]["properties"]["texts"]["maxItems"] == 9
    assert schemas["DetokenizeRequest"]["properties"]["ids"]["items"]["maximum"] == FAKE_INFO.vocab_size - 1
    # /tokenize parses `parameters` but never checks their values: its schema has no ranges.
    tokenize = schemas["TokenizeParameters"]["properties"]
    assert tokenize["top_n_tokens"] == {"anyOf": [{"type": "integer"}, {"type": "null"}], "title": "Top N Tokens"}
    assert schemas["GenerateStreamParameters"]["properties"]["decoder_input_details"]["const"] is False


def test_api_key_adds_401_and_bearer_security_except_on_health():
    doc = document(api_key="secret")
    assert doc["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    assert "401" in responses(doc, "post", "/generate") and "401" in responses(doc, "get", "/v1/models")
    assert doc["paths"]["/generate"]["post"]["security"] == [{"bearer": []}]
    assert "401" not in responses(doc, "get", "/health") and "security" not in doc["paths"]["/health"]["get"]
    assert "401" not in responses(document(), "post", "/generate")


def test_served_at_openapi_json():
    s = fake_settings()
    loader, _ = fake_parts(EngineConfig.from_settings(s, FAKE_INFO))
    app = create_app(s, loader=loader, model_info=FAKE_INFO)
    with TestClient(app) as client:
        assert client.get("/openapi.json").json() == app.openapi()


def test_digits_below_matches_exactly_the_token_ids():
    for n in (1, 10, 257, 1000, 50257):
        pattern = re.compile(_digits_below(n))
        for k in {0, 1, 9, 10, 99, 100, 256, 257, 999, 1000, 50256, 50257, 99999}:
            assert bool(pattern.fullmatch(str(k))) == (k < n), (n, k)
            assert bool(pattern.fullmatch("00" + str(k))) == (k < n), (n, k)
        assert not pattern.fullmatch("") and not pattern.fullmatch("1a")


DOCUMENTED = [status_code_conformance, content_type_conformance, response_schema_conformance,
              response_headers_conformance]
REQUESTS = [
    ("GET", "/health", None), ("GET", "/info", None), ("GET", "/v1/models", None),
    ("POST", "/generate", {"inputs": "a"}), ("POST", "/generate_stream", {"inputs": "a"}),
    ("POST", "/", {"inputs": "a", "stream": True}), ("POST", "/tokenize", {"inputs": "a"}),
    ("POST", "/detokenize", {"ids": [1]}), ("POST", "/score", {"texts": ["a"]}),
    ("POST", "/v1/completions", {"prompt": "a", "stream": True}),
]


def answers(settings, gate: threading.Event | None = None, **headers):
    """(request, response, schema) for each of REQUESTS against an app whose model loads once `gate` is set."""
    loader, _ = fake_parts(EngineConfig.from_settings(settings, FAKE_INFO))

    def gated():
        gate.wait(10)
        return loader()

    app = create_app(settings, loader=gated if gate else loader, model_info=FAKE_INFO)
    schema = schemathesis.openapi.from_dict(app.openapi())
    with TestClient(app) as client:
        try:
            for method, path, body in REQUESTS:
                yield (method, path, body), client.request(method, path, json=body, headers=headers), schema
        finally:
            if gate:
                gate.set()


def validate(schema, method, path, body, response):
    schema[path][method].Case(body=body, media_type="application/json").validate_response(response,
                                                                                          checks=DOCUMENTED)


def test_loading_answers_are_documented():
    for (method, path, body), r, schema in answers(fake_settings(), gate=threading.Event()):
        expected = 200 if path in ("/info", "/v1/models") else 503
        assert r.status_code == expected, (path, r.text)
        validate(schema, method, path, body, r)


def test_auth_answers_are_documented():
    for (method, path, body), r, schema in answers(fake_settings(api_key="k")):
        assert r.status_code == (200 if path == "/health" else 401), (path, r.text)
        validate(schema, method, path, body, r)


def test_body_too_large_is_documented():
    s = fake_settings(max_body_bytes=16)
    loader, _ = fake_parts(EngineConfig.from_settings(s, FAKE_INFO))
    app = create_app(s, loader=loader, model_info=FAKE_INFO)
    schema = schemathesis.openapi.from_dict(app.openapi())
    with TestClient(app) as client:
        for path, body in [("/generate", {"inputs": "x" * 32}), ("/v1/completions", {"prompt": "x" * 32})]:
            r = client.post(path, json=body)
            assert r.status_code == 413
            validate(schema, "POST", path, body, r)
