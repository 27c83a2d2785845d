"""A request's async stream of engine outputs; leaving it early (client gone) aborts the request.

Lives on the event loop: the engine thread hands outputs over with `loop.call_soon_threadsafe`. Knows asyncio and
`RequestOutput`; nothing of HTTP.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from .outputs import RequestOutput


class RequestStream:
    def __init__(self, request_id: str, abort: Callable[[str], None]) -> None:
        self.request_id = request_id
        self._abort = abort
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.done = False  # the final output (or error) was consumed, or the request was aborted

    def put(self, out: RequestOutput) -> None:
        """Called on the event loop by the engine's dispatcher."""
        self._queue.put_nowait(out)

    def abort(self) -> None:
        """Stop the request if it is still running (idempotent); frees its KV slot within one engine step."""
        if not self.done:
            self.done = True
            self._abort(self.request_id)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        # Any early exit (CancelledError while waiting, GeneratorExit from aclose, an exception in the consumer)
        # lands in `finally` and aborts the request.
        try:
            while True:
                out = await self._queue.get()
                if out.error is not None:
                    self.done = True
                    raise out.error
                if out.finished:
                    self.done = True
                yield out
                if out.finished:
                    return
        finally:
            self.abort()

    async def collect(self) -> list[RequestOutput]:
        """All outputs until the final one (raises the request's error, if any)."""
        return [out async for out in self]
