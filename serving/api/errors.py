"""The one mapping from error types to HTTP: status codes and the two body formats.

TGI routes answer `{"error": ..., "error_type": ...}`; `/v1` routes answer OpenAI's
`{"error": {"message", "type", "param", "code"}}`. Inside a stream the same error becomes a final event.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from ..errors import (
    EngineUnavailableError,
    OverloadedError,
    QueueTimeoutError,
    RequestFailedError,
    ServingError,
    ValidationError,
)
from .responses import JSONResponse

# (TGI status, OpenAI status, OpenAI error type) per error class; the first matching class wins.
_MAP: list[tuple[type[ServingError], int, int, str]] = [
    (ValidationError, 422, 400, "invalid_request_error"),
    (OverloadedError, 429, 429, "overloaded_error"),
    (QueueTimeoutError, 503, 503, "timeout_error"),
    (RequestFailedError, 424, 500, "internal_server_error"),
    (EngineUnavailableError, 503, 503, "service_unavailable"),
]


class AuthError(ServingError):
    error_type = "authentication"


class PayloadTooLargeError(ServingError):
    error_type = "payload_too_large"


class NotFoundError(ServingError):
    error_type = "not_found"


class RequestTimeoutError(ServingError):
    error_type = "request_timeout"


_MAP += [
    (AuthError, 401, 401, "authentication_error"),
    (PayloadTooLargeError, 413, 413, "invalid_request_error"),
    (NotFoundError, 404, 404, "not_found_error"),
    (RequestTimeoutError, 408, 408, "timeout_error"),
]


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/") or path == "/v1"


def status_of(exc: ServingError, *, openai: bool) -> int:
    for cls, tgi_status, oai_status, _ in _MAP:
        if isinstance(exc, cls):
            return oai_status if openai else tgi_status
    return 500


def tgi_body(exc: ServingError) -> dict[str, Any]:
    msg = str(exc)
    if isinstance(exc, ValidationError) and not msg.startswith("Input validation error"):
        msg = f"Input validation error: {msg}"
    return {"error": msg, "error_type": exc.error_type}


def openai_body(exc: ServingError) -> dict[str, Any]:
    status = status_of(exc, openai=True)
    kind = next((k for cls, _, _, k in _MAP if isinstance(exc, cls)), "internal_server_error")
    return {"error": {"message": str(exc), "type": kind, "param": getattr(exc, "param", None), "code": status}}


# Seconds a client should wait before retrying a request refused for load or while the server starts or drains.
RETRY_AFTER = "1"


def error_response(exc: ServingError, *, openai: bool) -> JSONResponse:
    body = openai_body(exc) if openai else tgi_body(exc)
    status = status_of(exc, openai=openai)
    headers = {"Retry-After": RETRY_AFTER} if status in (429, 503) else None
    return JSONResponse(body, status_code=status, headers=headers)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "is-instance"})


def from_request_validation(exc: RequestValidationError) -> ValidationError:
    """Turn FastAPI/pydantic's list of errors into one message naming the first offending parameter."""
    errors = exc.errors()
    if not errors:
        return ValidationError("invalid request")
    e = errors[0]
    fields, tag = _split_loc(e)
    param = ".".join(fields) if fields else None
    kind = e.get("type", "")
    if tag is not None and param:
        # A union field (`prompt`, `stop`): pydantic reports one error per member; name every accepted form.
        tags = []
        for other in errors:
            f, t = _split_loc(other)
            if f == fields and t is not None and t not in tags:
                tags.append(t)
        return ValidationError(f"`{param}` has an invalid type: it must be one of {', '.join(tags)}", param=param)
    if kind == "json_invalid":
        ctx = e.get("ctx") or {}
        return ValidationError(f"the request body is not valid JSON: {ctx.get('error', e.get('msg'))}")
    if kind == "extra_forbidden":
        return ValidationError(f"Unrecognized request argument supplied: {param}", param=param)
    if kind == "missing" and not fields:
        return ValidationError("the request body is missing: send a JSON object")
    if kind == "model_attributes_type" and not fields:
        return ValidationError("the request body must be a JSON object")
    where = f"`{param}`: " if param else ""
    return ValidationError(f"{where}{e.get('msg', 'invalid value')}", param=param)


def _split_loc(e: dict) -> tuple[list[str], str | None]:
    """A pydantic error's location as (field path, union member tag or None): union members appear in loc as
    their type names ("str", "list[int]"), and the field ends before the first."""
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    for i, x in enumerate(loc):
        if x in _TYPE_TAGS or "[" in x:
            return loc[:i], x
    return loc, None


def body_parse_error(cause: BaseException | None) -> ValidationError:
    """What was wrong with a body that FastAPI could not parse (it answers a bare 400 `from` the cause)."""
    if isinstance(cause, RecursionError):
        return ValidationError("the request body is nested too deeply")
    if isinstance(cause, UnicodeDecodeError):
        return ValidationError("the request body is not valid UTF-8")
    if isinstance(cause, ValueError) and "digits" in str(cause):
        # Python refuses int(str) of more than 4,300 digits: no parameter of this server takes such a number.
        return ValidationError("the request body holds an integer with too many digits")
    return ValidationError("the request body is not valid JSON")


def install_handlers(app: FastAPI, on_error=None) -> None:
    """One handler per error type; `on_error(exc)` is told about each (for metrics)."""

    def respond(request: Request, exc: ServingError) -> JSONResponse:
        if on_error is not None:
            on_error(exc)
        return error_response(exc, openai=is_openai_path(request.url.path))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not a client error: a well-formed 500, and the connection closed (Starlette re-raises the
        # exception after this response so that it is logged, and uvicorn then drops the connection).
        resp = error_response(RequestFailedError(f"Internal server error: {type(exc).__name__}"),
                              openai=is_openai_path(request.url.path))
        resp.status_code = 500
        resp.headers["Connection"] = "close"
        return resp

    @app.exception_handler(ServingError)
    async def _serving(request: Request, exc: ServingError) -> JSONResponse:
        return respond(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return respond(request, from_request_validation(exc))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 400:
            return respond(request, body_parse_error(exc.__cause__))
        if exc.status_code == 404:
            return respond(request, NotFoundError(f"no route for {request.method} {request.url.path}"))
        body = {"error": str(exc.detail), "error_type": "http"}
        if is_openai_path(request.url.path):
            body = {"error": {"message": str(exc.detail), "type": "invalid_request_error", "param": None,
                              "code": exc.status_code}}
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))
