"""The synchronous engine step: schedule, run the model, post-process (tokens, text, stop checks, slot release).

Split so the engine thread can hold its lock only while scheduling and post-processing, not while the model
runs, and so a step's prefill results (first tokens) go out before its decode pass runs: schedule, then
execute_prefill + postprocess_prefill, then execute_decode + postprocess_decode. With flat prefill (the CPU
kernels) execute_prefill runs a step's decode tokens too, after the prompt chunks in the same pass, so the
weights are read once per step rather than twice, and execute_decode has nothing left to do. Knows sequences,
the model runner and token bytes; nothing of threads, asyncio or HTTP.
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
    prefill_error: BaseException | None = None
    decode: list[TokenInfo | SampleFailure] | None = None
    decode_error: BaseException | None = None
    prefill_time: float = 0.0
    decode_time: float = 0.0
    fused: bool = False  # the prefill pass also ran the decode tokens (EngineCore.execute_prefill)

    @property
    def failed(self) -> bool:
        return self.prefill_error is not None or self.decode_error is not None

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
        """Run the model for a whole schedule (prefill pass, then decode pass; one pass when they fuse)."""
        res = StepResult()
        self.execute_prefill(sched, res)
        self.execute_decode(sched, res)
        return res

    def execute_prefill(self, sched: SchedulerOutput, res: StepResult) -> None:
        """Run the step's prefill pass (without the engine lock); with flat prefill it takes the step's decode
        tokens along when they fit the pass (res.fused), leaving execute_decode nothing to do."""
        if not sched.prefill:
            return
        sched.decode = [s for s in sched.decode if not s.is_finished]
        res.fused = self.can_fuse(sched)
        t0 = self.clock()
        try:
            if res.fused:
                res.prefill, res.decode = self.runner.prefill_and_decode(sched.prefill, sched.decode)
            else:
                res.prefill = self.runner.prefill(sched.prefill)
        except Exception as e:  # noqa: BLE001 - reported to the affected requests
            log.exception("prefill step failed")
            res.prefill_error = e
            if res.fused:
                res.decode_error = e
        res.prefill_time = self.clock() - t0

    def can_fuse(self, sched: SchedulerOutput) -> bool:
        """Whether the step's decode tokens can join its prefill pass: flat prefill, and they fit the pass's
        largest chunk bucket (the scheduler leaves them room unless more sequences run than that)."""
        if not (self.runner.flat_prefill and sched.prefill and sched.decode):
            return False
        buckets = self.scheduler_config.prefill_chunk_buckets
        tokens = sum(c.end - c.start for c in sched.prefill) + len(sched.decode)
        return not buckets or tokens <= max(buckets)

    def execute_decode(self, sched: SchedulerOutput, res: StepResult) -> None:
        """Run the step's decode pass (without the engine lock), less the requests that ended since scheduling."""
        if res.fused:
            return
        sched.decode = [s for s in sched.decode if not s.is_finished]
        if not sched.decode:
            return
        t0 = self.clock()
        try:
            res.decode = self.runner.decode(sched.decode)
        except Exception as e:  # noqa: BLE001
            log.exception("decode step failed")
            res.decode_error = e
        res.decode_time = self.clock() - t0

    def postprocess(self, sched: SchedulerOutput, res: StepResult) -> list[RequestOutput]:
        return self.postprocess_prefill(sched, res) + self.postprocess_decode(sched, res)

    def postprocess_prefill(self, sched: SchedulerOutput, res: StepResult) -> list[RequestOutput]:
        """Timed-out requests and the prefill pass's results."""
        now = self.clock()
        outs: list[RequestOutput] = []
        for seq in sched.timed_out:
            self._requests.pop(seq.request_id, None)
            self.stats.on_finish(seq)
            waited = now - seq.arrival_time
            outs.append(RequestOutput(seq.request_id, error=QueueTimeoutError(
                f"Request timed out after waiting {waited:.1f} s in the queue")))
        if res.prefill_error is not None:
            outs += self._fail([c.seq for c in sched.prefill], res.prefill_error, now)
        elif res.prefill is not None:
            for chunk, r in zip(sched.prefill, res.prefill):
                out = self._on_chunk(chunk, r, now)
                if out is not None:
                    outs.append(out)
        return outs

    def postprocess_decode(self, sched: SchedulerOutput, res: StepResult) -> list[RequestOutput]:
        """The decode pass's tokens; records the step."""
        now = self.clock()
        outs: list[RequestOutput] = []
        if res.decode_error is not None:
            outs += self._fail(sched.decode, res.decode_error, now)
        elif res.decode is not None:
            for seq, tok in zip(sched.decode, res.decode):
                if seq.is_finished:
                    continue
                if isinstance(tok, SampleFailure):
                    outs += self._fail([seq], tok.error, now)
                    continue
                self.scheduler.decoded(seq)
                outs.append(self._on_token(seq, tok, now))
        self.stats.on_step(
            prefill_rows=len(sched.prefill),
            prefill_tokens=sum(c.end - c.start for c in sched.prefill),
            decode_rows=len(sched.decode),
            prefill_time=res.prefill_time,
            decode_time=res.decode_time,
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
            generated_tokens=seq.num_output,
            seed=seq.seed,
            queue_time=scheduled - seq.arrival_time,
            prefill_time=first - scheduled,
            inference_time=now - scheduled,
            total_time=now - seq.arrival_time,
        )
        return out
