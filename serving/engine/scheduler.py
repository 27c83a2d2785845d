"""Continuous-batching scheduler: which sequences prefill (a bounded chunk) and which decode at each step.

Pure and synchronous: token ids and `Sequence` objects only; no tensors, no threads, no asyncio, no clock of its
own (callers pass `now`). The engine serialises every call.

Policy, per step:
- at most one prefill pass: either one generating sequence (alone, so its prefill is computed the same way
  whatever else runs) or a group of score-only sequences packed under the same token budget; a long prompt is
  split into chunks of `prefill_chunk` tokens, one chunk per step, so it delays the others' next token by at
  most one chunk's compute;
- every running sequence decodes one token;
- waiting sequences get a KV slot in arrival order as slots free up; a finished or aborted sequence frees its
  slot at once.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

from ..errors import OverloadedError
from .sequence import FinishReason, Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    num_slots: int  # KV-cache slots = the most sequences prefilling or decoding at once
    max_waiting: int  # queue bound; beyond it new requests are refused (overloaded)
    prefill_chunk: int  # tokens per prefill pass (rows x chunk length for a packed score group)
    queue_timeout: float | None = None  # seconds a request may wait for a slot; None waits forever
    # Row counts the model pads a prefill pass up to (its batch buckets); packing budgets the padded rows.
    prefill_row_buckets: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.num_slots < 1 or self.max_waiting < 0 or self.prefill_chunk < 1:
            raise ValueError(f"invalid scheduler config {self}")


@dataclass
class PrefillChunk:
    seq: Sequence
    start: int
    end: int

    @property
    def is_last(self) -> bool:
        return self.end == self.seq.num_prompt


@dataclass
class SchedulerOutput:
    prefill: list[PrefillChunk] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)
    timed_out: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []
        self._free_slots = list(range(config.num_slots))  # a heap: the lowest free slot is reused first
        self._row_chunk = config.prefill_chunk
        self._by_id: dict[str, Sequence] = {}

    # ---- queries -------------------------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        """Sequences holding a slot (prefilling or decoding)."""
        return len(self.prefilling) + len(self.running)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def get(self, request_id: str) -> Sequence | None:
        return self._by_id.get(request_id)

    # ---- admission and removal -----------------------------------------------------------------------------

    def add(self, seqs: list[Sequence]) -> None:
        """Queue sequences (all or none); raises OverloadedError when more than `max_waiting` would be left
        waiting once every free slot is taken."""
        if len(self.waiting) + len(seqs) > self.config.max_waiting + len(self._free_slots):
            raise OverloadedError()
        for s in seqs:
            assert s.request_id not in self._by_id, f"duplicate request id {s.request_id}"
            assert s.status is SequenceStatus.WAITING
            self._by_id[s.request_id] = s
            self.waiting.append(s)

    def finish(self, seq: Sequence, reason: FinishReason, now: float) -> None:
        """Mark a sequence finished, remove it from its queue and free its slot (no-op if already finished)."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is SequenceStatus.PREFILLING:
            self.prefilling.remove(seq)
        else:
            self.running.remove(seq)
        if seq.slot is not None:
            heapq.heappush(self._free_slots, seq.slot)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.finish_time = now
        del self._by_id[seq.request_id]

    def abort(self, request_id: str, now: float) -> Sequence | None:
        seq = self._by_id.get(request_id)
        if seq is not None:
            self.finish(seq, FinishReason.ABORTED, now)
        return seq

    def all_sequences(self) -> list[Sequence]:
        return list(self._by_id.values())

    # ---- the step ------------------------------------------------------------------------------------------

    def schedule(self, now: float) -> SchedulerOutput:
        out = SchedulerOutput()
        timeout = self.config.queue_timeout
        if timeout is not None:
            out.timed_out = [s for s in self.waiting if now - s.arrival_time > timeout]
            for s in out.timed_out:
                self.finish(s, FinishReason.TIMEOUT, now)
        if not self.prefilling:
            self._admit(now)
        for s in self.prefilling:
            n = min(s.prefill_remaining, self._row_chunk)
            out.prefill.append(PrefillChunk(s, s.num_cached, s.num_cached + n))
        out.decode = list(self.running)
        return out

    def _admit(self, now: float) -> None:
        if not self.waiting or not self._free_slots:
            return
        budget = self.config.prefill_chunk
        group = [self.waiting[0]]
        if group[0].score_only:
            # Pack score-only prompts while (padded) rows x longest row chunk stays within one chunk's budget.
            longest = min(group[0].num_prompt, budget)
            for s in list(self.waiting)[1:]:
                if not s.score_only or len(group) >= len(self._free_slots):
                    break
                cand = max(longest, min(s.num_prompt, budget))
                if self._padded_rows(len(group) + 1) * cand > budget:
                    break
                group.append(s)
                longest = cand
        self._row_chunk = max(1, budget // self._padded_rows(len(group)))
        for s in group:
            self.waiting.popleft()
            s.slot = heapq.heappop(self._free_slots)
            s.status = SequenceStatus.PREFILLING
            s.scheduled_time = now
            self.prefilling.append(s)

    def _padded_rows(self, rows: int) -> int:
        buckets = self.config.prefill_row_buckets
        return next((b for b in sorted(buckets) if b >= rows), rows) if buckets else rows

    def prefilled(self, chunk: PrefillChunk) -> None:
        """Record a computed chunk; a fully cached generating prompt starts decoding at the next step."""
        seq = chunk.seq
        if seq.is_finished:
            return
        assert seq.status is SequenceStatus.PREFILLING and chunk.start == seq.num_cached
        seq.num_cached = chunk.end
        if chunk.is_last and not seq.score_only:
            self.prefilling.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)

    def decoded(self, seq: Sequence) -> None:
        """Record that a running sequence's last token is now in the cache."""
        if not seq.is_finished:
            seq.num_cached += 1
