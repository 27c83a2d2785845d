"""Server-Sent Events and client-disconnect handling shared by the generation routes.

A streamed response aborts its engine requests however it ends (finished, client gone, server error); a
non-streamed one is cancelled when the client disconnects while it waits. Knows Starlette/ASGI and
`RequestStream`; nothing of wire formats.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..engine import RequestOutput, RequestStream
from .responses import dumps

T = TypeVar("T")


def sse_event(data: Any, *, space: bool) -> bytes:
    """One SSE event: `data:{json}` (TGI) or `data: {json}` (OpenAI), then a blank line."""
    payload = data.encode() if isinstance(data, str) else dumps(data)
    return b"data: " + payload + b"\n\n" if space else b"data:" + payload + b"\n\n"


class EngineStreamingResponse(StreamingResponse):
    """An SSE response that aborts its engine requests when it ends, however it ends."""

    def __init__(self, content: AsyncIterator[bytes], streams: Sequence[RequestStream], **kw: Any) -> None:
        kw.setdefault("media_type", "text/event-stream")
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **kw.pop("headers", {})}
        super().__init__(content, headers=headers, **kw)
        self._streams = list(streams)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for st in self._streams:
                st.abort()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except RuntimeError:  # still running in a cancelled task: it is closing itself
                    pass


class ClientDisconnected(Exception):
    """The client went away before the response was ready."""


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and raising ClientDisconnected) if the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientDisconnected()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the client is gone; nobody to tell
                pass


async def merge(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several request streams as (index, output) in arrival order; errors propagate."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, st: RequestStream) -> None:
        try:
            async for out in st:
                await queue.put((i, out, None))
        except Exception as e:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((i, None, e))
            return
        await queue.put((i, None, None))

    tasks = [asyncio.ensure_future(pump(i, st)) for i, st in enumerate(streams)]
    remaining = len(streams)
    try:
        while remaining:
            i, out, err = await queue.get()
            if err is not None:
                raise err
            if out is None:
                remaining -= 1
                continue
            yield i, out
    finally:
        for t in tasks:
            t.cancel()
        for st in streams:
            st.abort()
