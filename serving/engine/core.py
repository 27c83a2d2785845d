"""The synchronous engine step: schedule, run the model (one pass), post-process (tokens, text, stop checks, slot
release).

Split in three so the engine thread can hold its lock while scheduling and post-processing, not while the model
runs. Knows sequences, the model runner and token bytes; nothing of threads, asyncio or HTTP.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import QueueTimeoutError, RequestFailedError, ServingError
from .model_runner import ChunkResult, ModelRunner, SampleFailure
from .outputs import FinalInfo, RequestOutput, TokenInfo
from .scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from .sequence import FinishReason, Sequence
from .stats import EngineStats
from .text import OutputText

log = logging.getLogger("serving.engine")


@dataclass
class _Request:
    seq: Sequence
    text: OutputText
    prompt: list[TokenInfo] | None = None  # prompt logprobs gathered chunk by chunk


@dataclass
class StepResult:
    prefill: list[ChunkResult] | None = None
    decode: list[TokenInfo | SampleFailure] | None = None
    error: BaseException | None = None  # the pass failed: every request in it fails
    time: float = 0.0

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def sample_error(self) -> Exception | None:
        """The first row whose sampling raised (its request failed alone; the step itself did not fail)."""
        rows = [c.token for c in self.prefill or []] + list(self.decode or [])
        return next((r.error for r in rows if isinstance(r, SampleFailure)), None)


@dataclass
class EngineCore:
    runner: ModelRunner
    scheduler_config: SchedulerConfig
    token_bytes: Callable[[int], bytes]
    stats: EngineStats = field(default_factory=EngineStats)
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self.scheduler = Scheduler(self.scheduler_config)
        self._requests: dict[str, _Request] = {}

    # ---- requests ------------------------------------------------------------------------------------------

    def add(self, seqs: list[Sequence]) -> None:
        """Queue sequences (all or none); raises OverloadedError when the queue is full."""
        self.scheduler.add(seqs)
        for s in seqs:
            text = OutputText(self.token_bytes, special_ids=self.runner.special_ids, stop=s.params.stop)
            self._requests[s.request_id] = _Request(s, text)
        self.stats.on_queue(self.scheduler)

    def abort(self, request_id: str) -> None:
        seq = self.scheduler.abort(request_id, self.clock())
        if seq is not None:
            self._requests.pop(request_id, None)
            self.stats.on_finish(seq)
            self.stats.on_queue(self.scheduler)

    def fail_all(self, error: ServingError) -> list[RequestOutput]:
        now = self.clock()
        outs = []
        for seq in self.scheduler.all_sequences():
            self.scheduler.finish(seq, FinishReason.ERROR, now)
            self._requests.pop(seq.request_id, None)
            self.stats.on_finish(seq)
            outs.append(RequestOutput(seq.request_id, error=error))
        self.stats.on_queue(self.scheduler)
        return outs

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- the step ------------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        return self.scheduler.schedule(self.clock())

    def execute(self, sched: SchedulerOutput) -> StepResult:
        """Run the step's one pass (without the engine lock), less the requests that ended since scheduling."""
        res = StepResult()
        sched.prefill = [c for c in sched.prefill if not c.seq.is_finished]
        sched.decode = [s for s in sched.decode if not s.is_finished]
        if sched.is_empty and not sched.copies:
            return res
        t0 = self.clock()
        try:
            # Prefix-cache copies first, in order (one may read rows an earlier one wrote), even for requests
            # aborted since scheduling: the cache already counts their rows as present.
            self.runner.copy_prefixes(sched.copies)
            if not sched.is_empty:
                res.prefill, res.decode = self.runner.run(sched.prefill, sched.decode)
        except Exception as e:  # noqa: BLE001 - reported to the affected requests
            log.exception("step failed")
            res.error = e
        res.time = self.clock() - t0
        return res

    def postprocess(self, sched: SchedulerOutput, res: StepResult) -> list[RequestOutput]:
        """Timed-out requests, then the pass's prompt chunks and decode tokens; records the step."""
        now = self.clock()
        outs: list[RequestOutput] = []
        for seq in sched.timed_out:
            self._requests.pop(seq.request_id, None)
            self.stats.on_finish(seq)
            waited = now - seq.arrival_time
            outs.append(RequestOutput(seq.request_id, error=QueueTimeoutError(
                f"Request timed out after waiting {waited:.1f} s in the queue")))
        if res.error is not None:
            for _, dst, _ in sched.copies:
                self.scheduler.forget(dst)
            outs += self._fail([c.seq for c in sched.prefill] + sched.decode, res.error, now)
        elif res.prefill is not None:
            for chunk, r in zip(sched.prefill, res.prefill):
                out = self._on_chunk(chunk, r, now)
                if out is not None:
                    outs.append(out)
            for seq, tok in zip(sched.decode, res.decode):
                if seq.is_finished:
                    continue
                if isinstance(tok, SampleFailure):
                    outs += self._fail([seq], tok.error, now)
                    continue
                self.scheduler.decoded(seq)
                outs.append(self._on_token(seq, tok, now))
        if sched.cache_queries:
            self.stats.on_prefix_cache(sched.cache_queries, sched.cache_hits)
        if not sched.is_empty:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("step: %d prompt chunks (%d tokens, %d cached), %d decode rows, %d copies, pass %.1f ms",
                          len(sched.prefill), sum(c.end - c.start for c in sched.prefill), sched.cache_hits,
                          len(sched.decode), len(sched.copies), res.time * 1e3)
            self.stats.on_step(
                prefill_rows=len(sched.prefill),
                prefill_tokens=sum(c.end - c.start for c in sched.prefill),
                decode_rows=len(sched.decode),
                step_time=res.time,
            )
        self.stats.on_queue(self.scheduler)
        return outs

    def step(self) -> list[RequestOutput]:
        """schedule + execute + postprocess in one call (tests and single-threaded use)."""
        sched = self.schedule()
        return self.postprocess(sched, self.execute(sched))

    # ---- post-processing -----------------------------------------------------------------------------------

    def _fail(self, seqs: list[Sequence], error: BaseException, now: float) -> list[RequestOutput]:
        outs = []
        err = RequestFailedError(f"Request failed during generation: {type(error).__name__}: {error}")
        for seq in seqs:
            if seq.is_finished:
                continue
            self.scheduler.finish(seq, FinishReason.ERROR, now)
            self._requests.pop(seq.request_id, None)
            self.stats.on_finish(seq)
            outs.append(RequestOutput(seq.request_id, error=err))
        return outs

    def _on_chunk(self, chunk, r: ChunkResult, now: float) -> RequestOutput | None:
        seq = chunk.seq
        if seq.is_finished:
            return None
        req = self._requests[seq.request_id]
        self.scheduler.prefilled(chunk)
        self.stats.on_prompt_tokens(chunk.end - chunk.start)
        if r.prompt is not None:
            if req.prompt is None:
                first = seq.prompt_ids[0]
                req.prompt = [TokenInfo(first, None, first in self.runner.special_ids, None)]
            req.prompt.extend(r.prompt)
        if not chunk.is_last:
            return None
        if seq.score_only:
            seq.first_token_time = now
            self.scheduler.finish(seq, FinishReason.LENGTH, now)
            return self._final(req, RequestOutput(seq.request_id, prompt=req.prompt), now)
        assert r.token is not None
        if isinstance(r.token, SampleFailure):
            return self._fail([seq], r.token.error, now)[0]
        out = self._on_token(seq, r.token, now)
        out.prompt = req.prompt
        return out

    def _on_token(self, seq: Sequence, tok: TokenInfo, now: float) -> RequestOutput:
        req = self._requests[seq.request_id]
        seq.output_ids.append(tok.id)
        self.stats.on_token(seq, now)
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.last_token_time = now
        out = RequestOutput(seq.request_id, tokens=[tok], text=req.text.add(tok.id))
        p = seq.params
        reason = None
        if req.text.stopped:
            reason = FinishReason.STOP
        elif tok.id == self.runner.eos_token_id and not p.ignore_eos:
            reason = FinishReason.EOS
        elif tok.id in p.stop_token_ids:
            reason = FinishReason.STOP_TOKEN
        elif seq.num_output >= p.max_new_tokens:
            reason = FinishReason.LENGTH
        if reason is not None:
            out.text += req.text.finish()
            self.scheduler.finish(seq, reason, now)
            self._final(req, out, now)
        return out

    def _final(self, req: _Request, out: RequestOutput, now: float) -> RequestOutput:
        seq = req.seq
        self._requests.pop(seq.request_id, None)
        self.stats.on_finish(seq)
        scheduled = seq.scheduled_time or now
        first = seq.first_token_time or now
        out.final = FinalInfo(
            text=req.text.text,
            finish_reason=seq.finish_reason,
            prompt_tokens=seq.num_prompt,
            cached_tokens=seq.num_cached_prompt,
            generated_tokens=seq.num_output,
            seed=seq.seed,
            queue_time=scheduled - seq.arrival_time,
            prefill_time=first - scheduled,
            inference_time=now - scheduled,
            total_time=now - seq.arrival_time,
        )
        return out
