"""ASGI middleware in front of every route: optional bearer-token check, a request body size limit and a deadline
for the body to arrive (a client that sends less than its Content-Length would otherwise hold its connection open).

Pure ASGI (no BaseHTTPMiddleware) so streaming responses and disconnect detection pass through untouched.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ServingError
from .errors import AuthError, PayloadTooLargeError, RequestTimeoutError, error_response, is_openai_path

# What _read_body returns for a client that disconnected mid-body.
_GONE = object()

# Liveness probes and the web playground's own files (api/ui.py) work without credentials: the page asks for the
# key and sends it on its API calls. The page at "/" is open to GET and HEAD only: POST / is TGI's generate route.
OPEN_PATHS = frozenset({"/health", "/ui/app.js", "/ui/style.css", "/ui/favicon.svg"})
OPEN_PAGES = frozenset({"/"})


class GuardMiddleware:
    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int, body_timeout: float,
                 on_reject: Callable[[ServingError], None] | None = None) -> None:
        self.app = app
        self.on_reject = on_reject  # told about each 401/408/413 answered here (metrics)
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        openai = is_openai_path(path)
        is_open = path in OPEN_PATHS or (path in OPEN_PAGES and scope.get("method") in ("GET", "HEAD"))
        if self.api_key is not None and not is_open and not self._authorized(scope):
            denied = AuthError("Missing or invalid API key: send `Authorization: Bearer <key>`")
            self._rejected(denied)
            resp = error_response(denied, openai=openai)
            resp.headers["WWW-Authenticate"] = "Bearer"
            await resp(scope, receive, send)
            return
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            try:
                async with asyncio.timeout(self.body_timeout):
                    body = await self._read_body(receive)
            except TimeoutError:
                body = RequestTimeoutError(f"The request body did not arrive within {self.body_timeout:g} s")
            if body is None:
                body = PayloadTooLargeError(f"The request body exceeds {self.max_body_bytes} bytes")
            if body is _GONE:
                return  # the client left before sending its body: nobody to answer
            if isinstance(body, Exception):
                # The rest of the body is never read: the connection cannot carry another request.
                self._rejected(body)
                resp = error_response(body, openai=openai)
                resp.headers["Connection"] = "close"
                await resp(scope, receive, send)
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    def _rejected(self, exc: ServingError) -> None:
        if self.on_reject is not None:
            self.on_reject(exc)

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)
        return False

    async def _read_body(self, receive: Receive) -> bytes | object | None:
        """The whole body, None when it is larger than the limit (checked as it arrives), or _GONE when the
        client disconnected first."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return _GONE
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that first returns the buffered body, then defers to the real one (disconnect notices)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
