"""Continuous-batching scheduler: one token budget per step, as in vLLM's v1 engine.

Pure and synchronous: token ids and `Sequence` objects only; no tensors, no threads, no asyncio, no clock of its
own (callers pass `now`). The engine serialises every call.

Policy, per step (the runner computes the whole step as one flat pass):
- every running sequence gets its next token (one token of the budget each);
- prompts in progress, then waiting ones in arrival order, fill the rest of the budget (`max_step_tokens`) in
  chunks of at most `prefill_chunk` tokens each: the oldest prompt first, so it gets its first token first, and a
  long prompt goes in over several steps, each delaying the running sequences' next token by one pass at most;
- staggered starts: a short prompt (at most `stagger_tokens` tokens to compute, past its cached prefix) starts
  only while the step's short prompts hold fewer than `stagger_tokens` tokens; the rest wait for the next steps,
  two at most (see below);
- waiting sequences get a KV slot in arrival order when they are given their first chunk; a finished or aborted
  sequence frees its slot at once;
- automatic prefix caching (`prefix_block` > 0, see prefix_cache.py): a sequence starts past the longest prefix
  of its prompt that some slot holds (found by whole blocks, then token by token). It takes that slot if it is
  free; otherwise it gets a free slot and the step copies the rows first (`SchedulerOutput.copies`, run before the pass, in order). Free slots are
  handed out least recently freed first, so the prefixes of recent requests stay cached longest.

Nothing here depends on how a row is computed: the kernels give a sequence the same logits whatever else is in its
pass and however its prompt was chunked, so this policy is free to pack as much work as the budget allows.

Why running sequences decode in every step, rather than vLLM's prefill-first (prefill whenever prompts wait): with
closed-loop clients prefill-first keeps them in lockstep. A wave of prompts is prefilled before anyone decodes, so
the wave decodes and finishes together and its clients come back together: a much higher steady-state TTFT p99
for the same throughput in bench/sim_scheduler.py (`--prefill-first`; docs/PERFORMANCE.md).

Why short prompts are staggered: requests that start in one step decode in lockstep and, with equal output
lengths, finish in one step; clients that send their next request when one ends then come back together, so a
burst stays a burst. Short prompts (a cached few-shot prefix and a question of its own, a chat turn) are where
this costs most: each waits for the whole burst's prompts in one pass, where apart each pass would be mostly the
running requests' decode. Starting about `stagger_tokens` tokens of them per step spreads their finishes over
steps and the burst does not come back (bench_prefix.py at 16 clients: TTFT p50 0.33x of no caching became
0.21x). A sequence is held back two steps at most, which bounds what a large burst's last requests pay
(`bench/sim_scheduler.py --budgets 256 --clients 32 --requests-per-client 8 --lo 4 --hi 20 --new-tokens 8
--stagger 32`: TTFT p99 0.47 s, and 0.75 s with the bound removed). Long prompts are not held back (their own size spreads them over
steps), but arrival order is kept: one queued behind a held-back short prompt waits with it. The sequences of one
`add` (a request's `n`, /score's texts) start together.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from ..errors import OverloadedError
from .prefix_cache import PrefixCache
from .sequence import FinishReason, Sequence, SequenceStatus

# Most steps a short prompt is held back by the stagger (see the module docstring).
MAX_HOLD_STEPS = 2


@dataclass(frozen=True)
class SchedulerConfig:
    num_slots: int  # KV-cache slots = the most sequences prefilling or decoding at once
    max_waiting: int  # queue bound; beyond it new requests are refused (overloaded)
    max_step_tokens: int  # tokens per step, decode and prompt tokens together (the largest pass the model runs)
    prefill_chunk: int  # most prompt tokens of one sequence per step
    queue_timeout: float | None = None  # seconds a request may wait for a slot; None waits forever
    prefix_block: int = 0  # prefix caching's block of tokens; 0: off
    prefix_copy: bool = False  # the session can copy rows between slots (else a hit must take the slot itself)
    # Staggered starts: a short prompt (at most this many tokens to compute) starts only while the step's short
    # prompts hold fewer than this many tokens, and is held back two steps at most (0: as the budget allows).
    stagger_tokens: int = 0

    def __post_init__(self) -> None:
        # The budget must leave room for a prompt token after every running sequence's decode token.
        if (self.num_slots < 1 or self.max_waiting < 0 or self.prefill_chunk < 1
                or self.max_step_tokens <= self.num_slots or self.prefix_block < 0 or self.stagger_tokens < 0):
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
    copies: list[tuple[int, int, int]] = field(default_factory=list)  # (src slot, dst slot, tokens): before the pass
    cache_queries: int = 0  # prompt tokens looked up in the prefix cache this step
    cache_hits: int = 0  # of which found (not computed)

    @property
    def is_empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []
        # Free slots, least recently freed first (a free slot's K/V stay valid until it is reused).
        self._free_slots: OrderedDict[int, None] = OrderedDict.fromkeys(range(config.num_slots))
        self.prefix_cache = PrefixCache(config.num_slots, config.prefix_block) if config.prefix_block else None
        self._by_id: dict[str, Sequence] = {}
        self._groups = 0  # `add` calls so far: the sequences of one call start together
        self._steps = 0  # schedule calls so far

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

    @property
    def free_slots(self) -> tuple[int, ...]:
        """Free slots in the order they are handed out (least recently freed first)."""
        return tuple(self._free_slots)

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
        self._groups += 1
        for s in seqs:
            assert s.request_id not in self._by_id, f"duplicate request id {s.request_id}"
            assert s.status is SequenceStatus.WAITING
            s.group = self._groups
            s.queued_step = self._steps
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
            self._free_slots[seq.slot] = None
            if reason is FinishReason.ERROR and self.prefix_cache is not None:
                self.prefix_cache.truncate(seq.slot, 0)  # a failed pass may have left its rows half-written
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.finish_time = now
        del self._by_id[seq.request_id]

    def forget(self, slot: int) -> None:
        """The slot's rows are not what the prefix cache thinks (a copy into it failed)."""
        if self.prefix_cache is not None:
            self.prefix_cache.truncate(slot, 0)

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
        out.decode = list(self.running)
        budget = self.config.max_step_tokens - len(out.decode)
        self._steps += 1
        short, group = 0, None  # tokens to compute of the short prompts this step starts; the group started last
        for s in self.prefilling + list(self.waiting)[: len(self._free_slots)]:
            if budget <= 0:
                break
            if s.status is SequenceStatus.WAITING:
                best, hit = self._lookup(s)
                todo = s.num_prompt - hit
                if self._holds_back(s, todo, short, group):
                    break
                self._start(s, now, out, best, hit)
                group = s.group
                if todo <= self.config.stagger_tokens:
                    short += todo
            n = min(s.prefill_remaining, self.config.prefill_chunk, budget)
            out.prefill.append(PrefillChunk(s, s.num_cached, s.num_cached + n))
            budget -= n
        return out

    def _holds_back(self, s: Sequence, todo: int, short: int, group: int | None) -> bool:
        """Staggered starts: the oldest waiting sequence, if its prompt is short (at most `stagger_tokens` tokens to
        compute), waits for a later step once this one has started `stagger_tokens` or more of short prompts,
        unless it belongs to the group this step started last (one `add`; a group the budget split goes on at the
        head of the next step, where nothing holds it back) or was queued more than MAX_HOLD_STEPS steps ago.
        Arrival order is kept: whatever waits behind it waits too."""
        stagger = self.config.stagger_tokens
        return (stagger > 0 and todo <= stagger and short >= stagger and s.group != group
                and self._steps - s.queued_step <= MAX_HOLD_STEPS)

    def _lookup(self, s: Sequence) -> tuple[int | None, int]:
        """The slot holding the longest cached prefix of the sequence's prompt that it may use, and its length."""
        cache = self.prefix_cache
        held: dict[int, int] = {}
        if cache is not None and not (s.wants_prompt_logprobs or s.score_only):
            # At least the prompt's last token is computed: its logits give the first output token.
            held = cache.lookup(s.prompt_ids, s.num_prompt - 1)
        if not self.config.prefix_copy:
            held = {x: n for x, n in held.items() if x in self._free_slots}
        # The longest hit; a free slot (nothing to copy) over a busy one of the same length; then the lowest.
        best = min(held, key=lambda x: (-held[x], x not in self._free_slots, x), default=None)
        return best, held.get(best, 0)

    def _start(self, s: Sequence, now: float, out: SchedulerOutput, best: int | None, hit: int) -> None:
        """Give the oldest waiting sequence a slot: it starts prefilling past its prompt's cached prefix (`hit`
        tokens, in slot `best`)."""
        assert self.waiting[0] is s
        self.waiting.popleft()
        cache = self.prefix_cache
        if cache is not None and not (s.wants_prompt_logprobs or s.score_only):
            out.cache_queries += s.num_prompt
        own = best in self._free_slots
        s.slot = best if own else next(iter(self._free_slots))
        del self._free_slots[s.slot]
        if hit and not own:
            out.copies.append((best, s.slot, hit))
        if cache is not None:
            # What the slot held past the hit (all of it, unless the hit is its own) is about to be overwritten;
            # a copy's rows count as present at once (the copy runs before anything reads them).
            cache.assign(s.slot, s.prompt_ids, s.output_ids, hit, own)
        out.cache_hits += hit
        s.num_cached = s.num_cached_prompt = hit
        s.status = SequenceStatus.PREFILLING
        s.scheduled_time = now
        self.prefilling.append(s)

    def prefilled(self, chunk: PrefillChunk) -> None:
        """Record a computed chunk; a fully cached generating prompt starts decoding at the next step."""
        seq = chunk.seq
        if seq.is_finished:
            return
        assert seq.status is SequenceStatus.PREFILLING and chunk.start == seq.num_cached
        seq.num_cached = chunk.end
        if self.prefix_cache is not None:
            self.prefix_cache.extend(seq.slot, seq.num_cached)
        if chunk.is_last and not seq.score_only:
            self.prefilling.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)

    def decoded(self, seq: Sequence) -> None:
        """Record that a running sequence's last token is now in the cache."""
        if not seq.is_finished:
            seq.num_cached += 1
            if self.prefix_cache is not None:
                self.prefix_cache.extend(seq.slot, seq.num_cached)
