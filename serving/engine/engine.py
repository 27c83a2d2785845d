"""The engine: one thread that loads the model and loops schedule -> run -> post-process, and the asyncio-facing
side that admits requests and hands each one an async stream of outputs.

The event loop never runs a model step: it only takes the engine lock for the short scheduling bookkeeping
(admission, abort). Errors: a failed step fails the requests in it ("request failed"); repeated failures or an
unexpected exception mark the whole engine dead ("engine unavailable") and fail every request. Knows threads,
asyncio, sequences and the tokenizer interface; nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import EngineConfig
from ..errors import EngineUnavailableError, OverloadedError, ValidationError
from ..sampling_params import SamplingParams
from .core import EngineCore
from .model_runner import ModelRunner
from .outputs import RequestOutput, TokenInfo
from .scheduler import SchedulerConfig
from .sequence import Sequence
from .stats import EngineStats
from .stream import RequestStream

log = logging.getLogger("serving.engine")

# Background work runs once the engine has been idle QUIET s (a closed-loop client's next request comes within
# milliseconds), or after waiting IDLE_WAIT s whatever the engine does.
QUIET = 0.5
IDLE_WAIT = 5.0


class EngineState(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    STOPPING = "stopping"
    DEAD = "dead"


@dataclass
class EngineParts:
    """What the loader returns: the runner (with its session), the tokenizer and any background work."""

    runner: ModelRunner
    tokenizer: Any  # encode / decode / token_bytes / eos_token_id / vocab_size
    # Work for once the engine serves (the packed-weights cache's writing): called once, with a function that
    # returns when no request is running (or after IDLE_WAIT s: under constant load the work still advances).
    background: Callable[[Callable[[], None]], Any] | None = None


class AsyncEngine:
    def __init__(
        self, loader: Callable[[], EngineParts], config: EngineConfig, stats: EngineStats | None = None
    ) -> None:
        self.config = config
        self.stats = stats or EngineStats()
        self._loader = loader
        self.state = EngineState.LOADING
        self.dead_reason: str | None = None
        self.last_error: str | None = None  # the latest failed step (its requests failed; the engine went on)
        self.tokenizer: Any = None
        self.vocab_size: int | None = None
        self.special_ids: frozenset[int] = frozenset()
        self._core: EngineCore | None = None
        self._cv = threading.Condition()
        self._stop = False
        self._idle_since: float | None = None  # when the engine thread last found no work (None: it has work)
        self._streams: dict[str, RequestStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # Called on the event loop with the reason once the engine is dead (its requests already failed): the
        # server process exits so that a supervisor restarts it. None (tests, embedding): /health stays 503.
        self.on_dead: Callable[[str], None] | None = None

    # ---- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread (loads the model, then serves); call from the event loop."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._main, name="engine", daemon=True)
        self._thread.start()

    async def wait_ready(self, timeout: float | None = None) -> None:
        t0 = time.monotonic()
        while self.state is EngineState.LOADING:
            if timeout is not None and time.monotonic() - t0 > timeout:
                raise TimeoutError("engine still loading")
            await asyncio.sleep(0.02)
        self._check_ready()

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Refuse new requests, let running ones finish for up to `timeout` s, then fail the rest and stop."""
        with self._cv:
            if self.state in (EngineState.READY, EngineState.LOADING):
                self.state = EngineState.STOPPING
        deadline = time.monotonic() + timeout
        while self._thread is not None and self._thread.is_alive() and time.monotonic() < deadline:
            with self._cv:
                busy = self._core is not None and self._core.has_work()
            if not busy:
                break
            await asyncio.sleep(0.05)
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)
        # Anything the thread could not answer (it died or is stuck in a step) is failed here.
        self._deliver([RequestOutput(rid, error=EngineUnavailableError("The server is shutting down"))
                       for rid in list(self._streams)])

    def _check_ready(self) -> None:
        if self.state is EngineState.READY:
            return
        if self.state is EngineState.LOADING:
            raise EngineUnavailableError("Loading model")
        if self.state is EngineState.STOPPING:
            raise EngineUnavailableError("The server is shutting down")
        raise EngineUnavailableError(f"The engine is not running: {self.dead_reason}")

    # ---- requests (event loop) -----------------------------------------------------------------------------

    def add_requests(self, prompts: Seq[Seq[int]], params: Seq[SamplingParams]) -> list[RequestStream]:
        """Admit requests now, all or none: raises ValidationError, OverloadedError or EngineUnavailableError."""
        try:
            self._check_ready()
        except EngineUnavailableError:
            self.stats.on_rejected("unavailable")
            raise
        assert len(prompts) == len(params)
        capacity = self.config.max_batch_size + self.config.max_queue
        if len(prompts) > capacity:
            # Never admissible, however idle the server: a client error, not a 429 to retry.
            raise ValidationError(
                f"the request needs {len(prompts)} sequences (prompts x n); this server holds at most {capacity} "
                "at once", param="n")
        seqs = [self._make_sequence(p, sp) for p, sp in zip(prompts, params)]
        with self._cv:
            # Checked again under the lock: the engine may have died or begun stopping meanwhile.
            try:
                self._check_ready()
            except EngineUnavailableError:
                self.stats.on_rejected("unavailable")
                raise
            try:
                self._core.add(seqs)
            except OverloadedError:
                self.stats.on_rejected("overloaded")
                raise
            self._cv.notify_all()
        streams = [RequestStream(s.request_id, self.abort) for s in seqs]
        for st in streams:
            self._streams[st.request_id] = st
        return streams

    def add_request(self, prompt_ids: Seq[int], params: SamplingParams) -> RequestStream:
        return self.add_requests([prompt_ids], [params])[0]

    def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        if self._core is None:
            return
        with self._cv:
            self._core.abort(request_id)
            self._cv.notify_all()

    async def score(self, prompts: Seq[Seq[int]], top_n: int = 0) -> list[list[TokenInfo]]:
        """Per-token logprobs of each prompt (first token: None), computed in batched prefill passes."""
        params = SamplingParams(max_new_tokens=0, prompt_logprobs=top_n)
        streams = self.add_requests(prompts, [params] * len(prompts))
        try:
            results = await asyncio.gather(*(st.collect() for st in streams))
        finally:
            for st in streams:
                st.abort()
        return [outs[-1].prompt or [] for outs in results]

    def _make_sequence(self, prompt_ids: Seq[int], params: SamplingParams) -> Sequence:
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise ValidationError("the prompt must contain at least one token", param="prompt")
        limit = self.config.max_total_tokens
        if len(ids) + params.max_new_tokens > limit:
            raise ValidationError(
                f"prompt tokens + max_new_tokens must be <= {limit}. "
                f"Given: {len(ids)} prompt tokens and {params.max_new_tokens} max_new_tokens",
                param="max_new_tokens",
            )
        v = self.vocab_size
        bad = [t for t in ids if not 0 <= t < v]
        if bad:
            raise ValidationError(f"token ids must be in [0, {v}), got {bad[:5]}", param="prompt")
        biased = [t for t, _ in params.logit_bias]
        for name, toks in (("stop_token_ids", params.stop_token_ids), ("logit_bias", biased)):
            if any(t >= v for t in toks):
                raise ValidationError(f"`{name}` token ids must be < {v}", param=name)
        if params.min_new_tokens and len(set(params.stop_token_ids) | {self.tokenizer.eos_token_id}) >= v:
            raise ValidationError("`stop_token_ids` suppress every token until `min_tokens`: nothing could be "
                                  "sampled", param="stop_token_ids")
        seq = Sequence(uuid.uuid4().hex, ids, params)
        if not params.greedy:
            seq.seed = params.seed if params.seed is not None else secrets.randbits(63)
            seq.rng = np.random.default_rng(seq.seed)
        return seq

    def num_waiting_and_running(self) -> tuple[int, int]:
        if self._core is None:
            return 0, 0
        with self._cv:
            return self._core.scheduler.num_waiting, self._core.scheduler.num_running

    def wait_idle(self, timeout: float = IDLE_WAIT, quiet: float = QUIET) -> None:
        """Block until no request has been queued or running for `quiet` s, the engine stops, or `timeout` s pass
        (for background work: a cache written between requests, not during them)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._cv:
                # has_work too: a request queued since the engine thread last looked makes it busy already
                since = self._idle_since
                if self._stop or (since is not None and time.monotonic() - since >= quiet
                                  and not (self._core is not None and self._core.has_work())):
                    return
            time.sleep(0.05)

    # ---- the engine thread ---------------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            parts = self._loader()
            self.tokenizer = parts.tokenizer
            self.vocab_size = int(parts.tokenizer.vocab_size)
            self.special_ids = frozenset(parts.runner.special_ids)
            c = self.config
            sched = SchedulerConfig(
                num_slots=c.max_batch_size,
                max_waiting=c.max_queue,
                max_step_tokens=c.max_step_tokens,
                prefill_chunk=c.prefill_chunk,
                stagger_tokens=c.stagger_tokens,
                queue_timeout=c.queue_timeout,
                prefix_block=c.prefix_block if c.prefix_caching else 0,
                prefix_copy=parts.runner.can_copy_prefix,
            )
            self._core = EngineCore(parts.runner, sched, parts.tokenizer.token_bytes, self.stats)
        except BaseException as e:  # noqa: BLE001 - reported by /health
            log.exception("model failed to load")
            self._die(f"model failed to load: {type(e).__name__}: {e}")
            return
        with self._cv:
            if self.state is not EngineState.LOADING:  # shut down while loading
                return
            self.state = EngineState.READY
        log.info("engine ready")
        if parts.background is not None:
            try:
                parts.background(self.wait_idle)
            except Exception:  # noqa: BLE001 - optional work (a cache for the next start): serve without it
                log.exception("background work failed to start")
        try:
            self._serve()
        except BaseException as e:  # noqa: BLE001
            log.exception("engine thread died")
            self._die(f"{type(e).__name__}: {e}")

    def _serve(self) -> None:
        core = self._core
        failures = 0
        while True:
            with self._cv:
                while not self._stop and not core.has_work():
                    if self._idle_since is None:
                        self._idle_since = time.monotonic()
                    self._cv.wait()
                self._idle_since = None
                if self._stop:
                    self._deliver_threadsafe(core.fail_all(EngineUnavailableError("The server is shutting down")))
                    return
                sched = core.schedule()
            res = core.execute(sched)
            with self._cv:
                outs = core.postprocess(sched, res)
            err = res.error or res.sample_error
            if err is not None:
                # /health and /info report it (a sampler that raises for every row fails every request alone);
                # recorded before the failed requests hear of it, so a client that then asks /health sees it.
                self.last_error = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {type(err).__name__}: {err}"
            self._deliver_threadsafe(outs)
            failures = failures + 1 if res.failed else 0
            if failures >= self.config.max_consecutive_failures:
                raise RuntimeError(f"{failures} consecutive engine steps failed")
            if sched.is_empty and not outs:
                time.sleep(0.001)

    def _die(self, reason: str) -> None:
        with self._cv:
            self.state = EngineState.DEAD
            self.dead_reason = reason
            outs = self._core.fail_all(EngineUnavailableError(f"The engine died: {reason}")) if self._core else []
        self._deliver_threadsafe(outs)
        if self.on_dead is not None and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self.on_dead, reason)
            except RuntimeError:  # the loop is closed: the process is ending anyway
                pass

    def _deliver_threadsafe(self, outs: list[RequestOutput]) -> None:
        if outs and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._deliver, outs)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    def _deliver(self, outs: list[RequestOutput]) -> None:
        for out in outs:
            st = self._streams.get(out.request_id)
            if st is None:
                continue
            st.put(out)
            if out.finished:
                del self._streams[out.request_id]
