"""The HTTP server process around the app: uvicorn with slow-client limits, a draining SIGTERM and an exit status.

- Slow and idle clients: uvicorn closes idle keep-alive connections but waits forever for a request's headers
  (an idle new connection, or slowloris headers at 1 byte/s). `guarded_protocol` adds a header deadline per
  request; the body deadline is the app's (`api/middleware.py`), the connection cap uvicorn's
  `limit_concurrency`.
- SIGTERM/SIGINT: the engine stops taking requests (503, `/health` 503), running requests get
  `--shutdown-timeout` seconds, the rest end with a final error event (streams) or a 503 body, and the process
  exits 0. A second signal exits at once.
- An engine that dies (the model failed to load, repeated failed steps) ends the process with status 1 after
  failing its requests, so that a supervisor restarts it instead of keeping a process that refuses everything.

Knows uvicorn, asyncio and the engine's lifecycle; nothing of routes or wire formats.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from types import FrameType

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .engine import AsyncEngine

log = logging.getLogger("serving.server")

# What a client that never finishes its headers gets before the connection is closed.
_TIMEOUT_RESPONSE = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"

# How long a timed-out connection stays half-closed, its input read and dropped, before it is closed (RFC 9112
# section 9.6, "lingering close"; nginx's lingering_timeout is 5 s). Closing a socket with unread input makes the
# kernel answer with a reset instead of a FIN, and a reset can reach a client that is still sending (a slowloris)
# before it has read the 408: it sees "connection reset" and no status.
LINGER_SECONDS = 2.0


def guarded_protocol(header_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline for each request's headers, from the connection's first byte (or
    its opening) to the end of the headers; past it the client gets 408 and a lingering close."""

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _linger_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._linger_timer is not None:
                return  # answered 408: what still arrives is dropped
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle:
                self._disarm()  # a request's headers arrived
            elif self._header_timer is None and (cycle is None or cycle.response_complete):
                self._arm()  # the first bytes of the next request on a kept-alive connection

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # a pipelined request's headers were already buffered

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._linger_timer is not None:
                self._linger_timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_timed_out)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_timed_out(self) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            self.transport.write(_TIMEOUT_RESPONSE)
            if not self.transport.can_write_eof():
                self.transport.close()
                return
            # Half-close (a FIN after the 408), keep reading, close when the client does (uvicorn's eof_received
            # lets asyncio close the transport) or after LINGER_SECONDS.
            self.transport.write_eof()
            self.transport.resume_reading()
            self._linger_timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)

    return GuardedH11Protocol


class Server(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains the engine before uvicorn's own shutdown, and whose
    `exit_code` says whether the engine died."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, *, drain_timeout: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.drain_timeout = drain_timeout
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._drain_task: asyncio.Future | None = None
        engine.on_dead = self._engine_died

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: runs between two bytecodes of the event loop's thread, so it only hands over.
        # Not recorded in uvicorn's `_captured_signals`, which it would re-raise at the end (exit 143).
        # Logging waits for the loop too: a write to stderr interrupted by a handler that writes would be reentrant.
        if self._draining or self.should_exit or self._loop is None:
            self.should_exit = self.force_exit = True
            if self._loop is not None:
                self._loop.call_soon_threadsafe(log.warning, "second signal: exiting now")
            return
        self._draining = True
        self._loop.call_soon_threadsafe(self._start_drain, signal.Signals(sig).name)

    def _start_drain(self, name: str) -> None:
        log.info("%s: draining (running requests get up to %g s)", name, self.drain_timeout)
        self._drain_task = asyncio.ensure_future(self._drain())  # held: the loop keeps only a weak reference

    async def _drain(self) -> None:
        await self.engine.shutdown(self.drain_timeout)
        # The final events and 503 bodies are on their way; uvicorn now waits for the connections to finish.
        self.should_exit = True

    def _engine_died(self, reason: str) -> None:
        log.error("the engine died (%s): exiting with status 1", reason)
        self.exit_code = 1
        self.should_exit = True
