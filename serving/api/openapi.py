"""The OpenAPI document (`/openapi.json`): what each route really answers and the limits the server enforces.

FastAPI derives the request bodies from the pydantic models; this module adds what it cannot see: per route the
status codes the one error mapping (`errors.status_of`) gives the errors the route can raise, with their bodies;
`text/event-stream` for streams (OpenAPI 3.1: the schema describes one event, its `data` a JSON document);
`text/plain` for /metrics; the response bodies; and the value ranges checked in the route code and in
`SamplingParams`, the settings-dependent ones read once from the app's settings. Documentation only: nothing here
validates a request, so a range written here and not enforced there is a bug the schema fuzz test reports.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from ..config import EngineConfig, ModelInfo, Settings
from ..errors import (
    EngineUnavailableError,
    OverloadedError,
    QueueTimeoutError,
    RequestFailedError,
    ServingError,
    ValidationError,
)
from ..sampling_params import (
    LOGIT_BIAS_RANGE,
    MAX_INT32,
    MAX_LOGIT_BIAS,
    MAX_SEED,
    MAX_STOP_CHARS,
    MAX_STOP_TOKEN_IDS,
    MAX_TEMPERATURE,
    PENALTY_RANGE,
    REPETITION_PENALTY_RANGE,
)
from . import schemas
from .errors import (
    RETRY_AFTER,
    AuthError,
    NotFoundError,
    PayloadTooLargeError,
    RequestTimeoutError,
    is_openai_path,
    openai_body,
    status_of,
    tgi_body,
)
from .middleware import OPEN_PATHS

_WHY: dict[type[ServingError], str] = {
    ValidationError: "invalid request",
    NotFoundError: "unknown model",
    AuthError: "missing or wrong API key",
    PayloadTooLargeError: "request body larger than --max-body-bytes",
    RequestTimeoutError: "request body not received within --body-timeout",
    OverloadedError: "queue full: retry later",
    QueueTimeoutError: "waited longer than --queue-timeout for a slot",
    RequestFailedError: "a generation step failed",
    EngineUnavailableError: "loading, shutting down, or the engine died",
}

# Errors a route can raise. A stream's later errors are its final event, not a status.
_ENGINE = (ValidationError, OverloadedError, QueueTimeoutError, RequestFailedError, EngineUnavailableError)
_STREAM_START = (ValidationError, OverloadedError, EngineUnavailableError)
_NO_QUEUE = (ValidationError, EngineUnavailableError)

_RESPONSES: list[type[BaseModel]] = [
    schemas.GenerateResponse, schemas.StreamResponse, schemas.ErrorResponse, schemas.TokenSpan,
    schemas.DetokenizeResponse, schemas.ScoreResponse, schemas.Health, schemas.HealthUnavailable, schemas.Info,
    schemas.OpenAIErrorResponse, schemas.Completion, schemas.CompletionChunk, schemas.ModelList,
    schemas.ChatCompletion, schemas.ChatCompletionChunk,
]

_TIMING_HEADERS = {
    name: {"description": what, "schema": {"type": "string", "pattern": "^[0-9]+$"}}
    for name, what in [
        ("x-total-time", "milliseconds from arrival to the last token"),
        ("x-queue-time", "milliseconds waiting for a slot"),
        ("x-inference-time", "milliseconds from getting a slot to the last token"),
        ("x-time-per-token", "inference milliseconds per generated token"),
        ("x-prompt-tokens", "prompt tokens (after `truncate`)"),
        ("x-generated-tokens", "generated tokens"),
    ]
}


def install_openapi(app: FastAPI, settings: Settings, config: EngineConfig, model_info: ModelInfo) -> None:
    """Make `app.openapi()` (and so `/openapi.json`) return the document described above, built on first use."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            app.openapi_schema = _complete(doc, settings, config, model_info)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _sse(event: dict[str, Any], *, done: bool = False) -> dict[str, Any]:
    """`text/event-stream` whose events' `data` is a JSON document (or OpenAI's closing `[DONE]`)."""
    data: dict[str, Any] = {"type": "string", "contentMediaType": "application/json", "contentSchema": event}
    if done:
        data = {"anyOf": [{"const": "[DONE]"}, data]}
    return {"text/event-stream": {"schema": {"type": "object", "required": ["data"], "properties": {"data": data}}}}


def _routes() -> dict[tuple[str, str], tuple[dict[str, Any], tuple[type[ServingError], ...]]]:
    """(method, path) -> (the 200 content by media type, the errors it can answer with)."""
    tgi_stream = _sse({"anyOf": [_ref("StreamResponse"), _ref("ErrorResponse")]})
    oai_stream = _sse({"anyOf": [_ref("CompletionChunk"), _ref("OpenAIErrorResponse")]}, done=True)
    chat_stream = _sse({"anyOf": [_ref("ChatCompletionChunk"), _ref("OpenAIErrorResponse")]}, done=True)
    return {
        ("get", "/health"): (_json(_ref("Health")), ()),
        ("get", "/info"): (_json(_ref("Info")), ()),
        ("get", "/metrics"): ({"text/plain": {"schema": {"type": "string"}}}, ()),
        ("post", "/tokenize"): (_json({"type": "array", "items": _ref("TokenSpan")}), _NO_QUEUE),
        ("post", "/detokenize"): (_json(_ref("DetokenizeResponse")), _NO_QUEUE),
        ("post", "/score"): (_json(_ref("ScoreResponse")), _ENGINE),
        ("post", "/generate"): (_json(_ref("GenerateResponse")), _ENGINE),
        ("post", "/generate_stream"): (tgi_stream, _STREAM_START),
        ("post", "/"): ({**_json(_ref("GenerateResponse")), **tgi_stream}, _ENGINE),
        ("get", "/v1/models"): (_json(_ref("ModelList")), ()),
        ("post", "/v1/completions"): ({**_json(_ref("Completion")), **oai_stream}, (NotFoundError, *_ENGINE)),
        ("post", "/v1/chat/completions"): ({**_json(_ref("ChatCompletion")), **chat_stream},
                                           (NotFoundError, *_ENGINE)),
    }


def _complete(doc: dict[str, Any], s: Settings, config: EngineConfig, info: ModelInfo) -> dict[str, Any]:
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    # FastAPI's own 422 body ({"detail": [...]}) is never sent: every error goes through errors.py.
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    _, defs = models_json_schema([(m, "serialization") for m in _RESPONSES],
                                 ref_template="#/components/schemas/{model}")
    components.update(defs["$defs"])
    _constrain(components, s, config.max_total_tokens, info.vocab_size)

    routes = _routes()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if (method, path) not in routes:
                raise KeyError(f"{method.upper()} {path} has no entry in serving/api/openapi.py's _routes()")
            ok, raised = routes[(method, path)]
            openai = is_openai_path(path)
            if path not in OPEN_PATHS and s.api_key:
                raised = (*raised, AuthError)
            if method == "post":
                raised = (*raised, PayloadTooLargeError, RequestTimeoutError)
            responses: dict[str, Any] = {"200": {"description": "OK", "content": ok}}
            if (method, path) in (("post", "/generate"), ("post", "/")):
                responses["200"]["headers"] = _TIMING_HEADERS
            responses.update(_error_responses(raised, openai=openai))
            if path == "/health":
                responses["503"] = {"description": "not ready: `Loading model`, `Shutting down` or the engine's error",
                                    "content": _json(_ref("HealthUnavailable"))}
            # Past --max-connections uvicorn answers before any route runs, in plain text.
            cap = responses.setdefault("503", {"description": "", "content": {}})
            cap["description"] = "; ".join(filter(None, [cap["description"], "more than --max-connections open"]))
            cap["content"] = {**cap["content"], "text/plain": {"schema": {"const": "Service Unavailable"}}}
            op["responses"] = dict(sorted(responses.items()))
            if path not in OPEN_PATHS and s.api_key:
                op["security"] = [{"bearer": []}]
    if s.api_key:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    _cross_field(doc, components)
    return doc


def _error_responses(raised: tuple[type[ServingError], ...], *, openai: bool) -> dict[str, Any]:
    """One response per status the error mapping gives these errors, with the body that route family sends."""
    by_status: dict[str, list[str]] = {}
    for cls in raised:
        exc = cls("example")
        kind = openai_body(exc)["error"]["type"] if openai else tgi_body(exc)["error_type"]
        field = "error.type" if openai else "error_type"
        by_status.setdefault(str(status_of(exc, openai=openai)), []).append(f"{_WHY[cls]} ({field} `{kind}`)")
    body = _json(_ref("OpenAIErrorResponse" if openai else "ErrorResponse"))
    out = {}
    for status, whys in by_status.items():
        out[status] = {"description": "; ".join(whys), "content": body}
        if status == "401":
            out[status]["headers"] = {"WWW-Authenticate": {"schema": {"type": "string", "const": "Bearer"}}}
        if status in ("429", "503"):
            out[status]["headers"] = {"Retry-After": {"description": "seconds",
                                                      "schema": {"type": "string", "const": RETRY_AFTER}}}
    return out


# ---- value ranges ------------------------------------------------------------------------------------------


def _constrain(components: dict[str, Any], s: Settings, max_total: int, vocab: int) -> None:
    """Write the enforced ranges into the request schemas. A rule with `type` or `anyOf` replaces the property's
    schema; any other rule is merged into its non-null branch. Prompt + new tokens <= max_total_tokens, counted
    in tokens, cannot be written in JSON Schema: each bound below is one that holds whatever the prompt."""
    # TokenizeRequest's `parameters` are parsed (types) but never used: they keep the unconstrained schema.
    components["TokenizeParameters"] = copy.deepcopy(components["GenerateParameters"])
    components["TokenizeParameters"]["title"] = "TokenizeParameters"
    components["TokenizeRequest"]["properties"]["parameters"]["anyOf"][0] = _ref("TokenizeParameters")

    new_tokens = {"minimum": 1, "maximum": max_total - 1}  # a prompt has at least one token
    token_id = {"type": "integer", "minimum": 0, "maximum": vocab - 1}
    nonempty = {"type": "string", "minLength": 1}
    stop = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
    stops = {"type": "array", "maxItems": s.max_stop_sequences, "items": stop}
    top_n = {"minimum": 0, "maximum": s.max_top_n_tokens}
    penalty = _between(PENALTY_RANGE)
    seed = {"minimum": 0, "maximum": MAX_SEED}
    open_unit = {"exclusiveMinimum": 0.0, "exclusiveMaximum": 1.0}
    repetition = _between(REPETITION_PENALTY_RANGE)
    tgi_inputs = {"inputs": {"minLength": 1}}
    rules: dict[str, dict[str, dict[str, Any]]] = {
        "GenerateRequest": tgi_inputs,
        "CompatGenerateRequest": tgi_inputs,
        "GenerateParameters": {
            "best_of": {"minimum": 1, "maximum": 1},
            "frequency_penalty": penalty,
            "max_new_tokens": new_tokens,
            "repetition_penalty": repetition,
            "seed": seed,
            "stop": stops,
            # Not `maximum`: with `do_sample: false` the temperature is never used, and not checked.
            "temperature": {"exclusiveMinimum": 0.0, "description": f"at most {MAX_TEMPERATURE:g} when sampling"},
            "top_k": {"minimum": 1, "maximum": MAX_INT32},
            "top_n_tokens": top_n,
            "top_p": open_unit,
            "truncate": new_tokens,
            "typical_p": open_unit,
            "watermark": {"const": False},
            "grammar": {"type": "null", "description": "not supported: only null is accepted"},
            "adapter_id": {"maxLength": 0},
        },
        "DetokenizeRequest": {"ids": {"type": "array", "items": token_id}},
        "ScoreRequest": {
            "texts": {"type": "array", "minItems": 1, "maxItems": s.max_score_texts, "items": nonempty},
            "top_n": top_n,
        },
        "CompletionRequest": {
            "model": {"enum": [s.model_name]},
            "prompt": {"anyOf": [
                nonempty,
                {"type": "array", "minItems": 1, "maxItems": s.max_score_texts, "items": nonempty},
                {"type": "array", "minItems": 1, "maxItems": max_total, "items": token_id},
                {"type": "array", "minItems": 1, "maxItems": s.max_score_texts,
                 "items": {"type": "array", "minItems": 1, "maxItems": max_total, "items": token_id}},
            ]},
            "max_tokens": {"minimum": 0, "maximum": max_total - 1},
            "temperature": {"minimum": 0.0, "maximum": 2.0},
            "top_p": {"exclusiveMinimum": 0.0, "maximum": 1.0},
            "n": {"minimum": 1, "maximum": s.max_n},
            "logprobs": top_n,
            "stop": {"anyOf": [stop, stops, {"type": "null"}]},
            "presence_penalty": penalty,
            "frequency_penalty": penalty,
            "best_of": {"minimum": 1, "maximum": s.max_n, "description": "must equal `n`"},
            "logit_bias": {"maxProperties": MAX_LOGIT_BIAS,
                           "propertyNames": {"pattern": _digits_below(vocab), "maxLength": 10},
                           "additionalProperties": {"type": "number", **_between(LOGIT_BIAS_RANGE)}},
            "seed": seed,
            "suffix": {"type": "null", "description": "not supported: only null is accepted"},
            "top_k": {"minimum": -1, "maximum": MAX_INT32, "description": "-1 or 0: disabled"},
            "min_p": {"minimum": 0.0, "maximum": 1.0},
            "typical_p": {"exclusiveMinimum": 0.0, "maximum": 1.0},
            "repetition_penalty": repetition,
            "min_tokens": {"minimum": 0, "maximum": max_total - 1, "description": "at most `max_tokens`"},
            "stop_token_ids": {"maxItems": MAX_STOP_TOKEN_IDS, "items": token_id},
            "prompt_logprobs": top_n,
        },
    }
    # Chat shares completions' sampling fields and their checks (openai.sampling_params).
    completion = rules["CompletionRequest"]
    shared = ("model", "max_tokens", "temperature", "top_p", "n", "stop", "presence_penalty", "frequency_penalty",
              "logit_bias", "seed", "top_k", "min_p", "typical_p", "repetition_penalty", "min_tokens",
              "stop_token_ids")
    rules["ChatCompletionRequest"] = copy.deepcopy({
        **{name: completion[name] for name in shared},
        "messages": {"minItems": 1},
        "max_completion_tokens": completion["max_tokens"],
        "top_logprobs": top_n,
        "chat_template": {"type": "null", "description": "not supported: the server's is set with --chat-template"},
    })
    rules["ChatContentPart"] = {"type": {"const": "text", "description": "text only: other kinds are refused"}}
    for model, fields in rules.items():
        props = components[model]["properties"]
        for name, rule in fields.items():
            prop = props[name]  # KeyError: a rule for a field the model no longer has
            if "type" in rule or "anyOf" in rule:
                kept = {k: prop[k] for k in ("title", "default") if k in prop}
                props[name] = {**kept, **rule}
            else:
                branches = [b for b in prop.get("anyOf", [prop]) if b.get("type") != "null"]
                assert len(branches) == 1, f"{model}.{name}: say which branch the rule is for"
                branches[0].update(rule)


def _between(bounds: tuple[float, float]) -> dict[str, float]:
    """The enforced range (lo, hi) of SamplingParams as JSON Schema bounds."""
    return {"minimum": bounds[0], "maximum": bounds[1]}


def _cross_field(doc: dict[str, Any], components: dict[str, Any]) -> None:
    """Rules between fields. Streaming refuses `decoder_input_details` (TGI): /generate_stream gets request schemas
    that say so, and POST / says it for `stream: true`; /v1 takes `stream_options` only with `stream: true`, and
    chat `top_logprobs` only with `logprobs: true`."""
    params = copy.deepcopy(components["GenerateParameters"])
    params["title"] = "GenerateStreamParameters"
    params["properties"]["decoder_input_details"]["const"] = False
    components["GenerateStreamParameters"] = params
    request = copy.deepcopy(components["GenerateRequest"])
    request["title"] = "GenerateStreamRequest"
    request["properties"]["parameters"]["anyOf"][0] = _ref("GenerateStreamParameters")
    components["GenerateStreamRequest"] = request
    doc["paths"]["/generate_stream"]["post"]["requestBody"]["content"]["application/json"]["schema"] = \
        _ref("GenerateStreamRequest")
    components["CompatGenerateRequest"]["if"] = {"properties": {"stream": {"const": True}}, "required": ["stream"]}
    components["CompatGenerateRequest"]["then"] = {
        "properties": {"parameters": {"anyOf": [_ref("GenerateStreamParameters"), {"type": "null"}]}}
    }
    components["CompletionRequest"]["if"] = {"properties": {"stream_options": {"type": "object"}},
                                              "required": ["stream_options"]}
    components["CompletionRequest"]["then"] = {"properties": {"stream": {"const": True}}, "required": ["stream"]}
    components["ChatCompletionRequest"]["allOf"] = [
        copy.deepcopy({key: components["CompletionRequest"][key] for key in ("if", "then")}),
        {"if": {"properties": {"top_logprobs": {"type": "integer"}}, "required": ["top_logprobs"]},
         "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]}},
    ]


def _digits_below(n: int) -> str:
    """A regex for the decimal strings (leading zeros allowed) of the integers in [0, n): `logit_bias` keys."""
    top = str(n - 1)
    alternatives = [f"[0-9]{{1,{len(top) - 1}}}"] if len(top) > 1 else []
    for i, d in enumerate(top):
        rest = len(top) - i - 1
        last = rest == 0
        if last:
            alternatives.append(f"{top[:i]}[0-{d}]")
        elif d != "0":
            alternatives.append(f"{top[:i]}[0-{int(d) - 1}][0-9]{{{rest}}}")
    return f"^0*(?:{'|'.join(alternatives)})$"
