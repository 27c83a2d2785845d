"""Request ids and structured access logs: one JSON line per HTTP request on the `serving.access` logger.

`AccessLogMiddleware` (pure ASGI, outermost, so 401/408/413 answers carry the id too) takes the client's
`X-Request-Id` when it is 1-128 printable ASCII characters, else makes one; echoes it on every response of the app
(streams included: it is a header of the response start; not the 500 of an unexpected exception, which Starlette
answers outside this middleware, though its log line has the id); and, when the response ends, logs the request id, method, route,
status, prompt and generated tokens, finish reasons and the queue / time-to-first-token / total times.

The generation routes report what the engine told them through `note_final(final)`: a context variable carries
the request's record from the middleware to the route and its stream (tasks copy the context, and the record is
shared, not copied). Knows ASGI and `FinalInfo`; nothing of the routes or wire formats.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..engine import FinalInfo

log = logging.getLogger("serving.access")

HEADER = b"x-request-id"
MAX_ID_LENGTH = 128
# Probes and scrapes come every few seconds from every replica's supervisor and Prometheus: logged only when
# they do not answer 200.
QUIET_PATHS = frozenset({"/health", "/metrics"})


@dataclass
class AccessRecord:
    request_id: str
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finish_reasons: list[str] = field(default_factory=list)
    # Over a request's sequences (n > 1, several prompts): the longest wait and the earliest first token.
    queue_time: float | None = None
    ttft: float | None = None
    sequences: int = 0


_current: ContextVar[AccessRecord | None] = ContextVar("gpt2_access_record", default=None)


def note_final(final: FinalInfo) -> None:
    """Add one finished sequence of the current HTTP request to its access-log record (no-op outside one)."""
    rec = _current.get()
    if rec is None:
        return
    rec.sequences += 1
    rec.prompt_tokens += final.prompt_tokens
    rec.generated_tokens += final.generated_tokens
    rec.finish_reasons.append(final.finish_reason.value)
    ttft = final.queue_time + final.prefill_time
    rec.queue_time = final.queue_time if rec.queue_time is None else max(rec.queue_time, final.queue_time)
    rec.ttft = ttft if rec.ttft is None else min(rec.ttft, ttft)


def valid_request_id(raw: bytes) -> str | None:
    """The client's id if it is 1-128 printable ASCII characters (space to tilde, not blank), else None."""
    if not 0 < len(raw) <= MAX_ID_LENGTH or not all(0x20 <= b <= 0x7E for b in raw) or not raw.strip():
        return None
    return raw.decode("ascii")


def new_request_id() -> str:
    return uuid.uuid4().hex


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp, *, enabled: bool = True) -> None:
        self.app = app
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope.get("headers", []) if k == HEADER), None)
        request_id = (valid_request_id(given) if given is not None else None) or new_request_id()
        # Routes and handlers see the id too (request.state.request_id).
        scope.setdefault("state", {})["request_id"] = request_id
        rec = AccessRecord(request_id)
        token = _current.set(rec)
        start = time.monotonic()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER]
                headers.append((HEADER, request_id.encode("ascii")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            status = status or 500  # what the server's error middleware answers, outside this one
            raise
        finally:
            _current.reset(token)
            quiet = status == 200 and scope.get("path") in QUIET_PATHS
            if self.enabled and not quiet and log.isEnabledFor(logging.INFO):
                log.info(_line(scope, rec, status, time.monotonic() - start))


def _line(scope: Scope, rec: AccessRecord, status: int, total: float) -> str:
    ms = lambda s: None if s is None else round(s * 1000, 1)  # noqa: E731
    client = scope.get("client")
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "request_id": rec.request_id,
        "method": scope.get("method"),
        "route": scope.get("path"),
        # 0: the client left before any response started (the request was aborted).
        "status": status,
        "client": client[0] if client else None,
        "prompt_tokens": rec.prompt_tokens if rec.sequences else None,
        "generated_tokens": rec.generated_tokens if rec.sequences else None,
        "sequences": rec.sequences,
        "finish_reason": ",".join(sorted(set(rec.finish_reasons))) or None,
        "queue_ms": ms(rec.queue_time),
        "ttft_ms": ms(rec.ttft),
        "total_ms": ms(total),
    }
    return json.dumps(entry, separators=(",", ":"))


def configure_access_log(mode: str) -> None:
    """`json`: the `serving.access` lines go to stdout, one JSON document each, at INFO whatever --log-level says
    (so `--log-level warning` silences uvicorn's plain-text access log and keeps these). `off`: nothing."""
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
    if mode == "off":
        log.setLevel(logging.CRITICAL + 1)
        return
    import sys

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
