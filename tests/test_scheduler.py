"""Unit tests of the pure scheduler: one token budget per step (running sequences' decode tokens plus prompt chunks,
oldest prompt first), slots, queue bound, timeouts, chunked and score-only prompts."""

import pytest
from hypothesis import event, given, settings, target
from hypothesis import strategies as st

from serving.engine.scheduler import MAX_HOLD_STEPS, Scheduler, SchedulerConfig
from serving.engine.sequence import FinishReason, Sequence, SequenceStatus
from serving.errors import OverloadedError
from serving.sampling_params import SamplingParams


def seq(rid, n_prompt=4, max_new=3, t=0.0):
    return Sequence(rid, list(range(1, n_prompt + 1)), SamplingParams(max_new_tokens=max_new), arrival_time=t)


def score_seq(rid, n_prompt):
    return Sequence(rid, [1] * n_prompt, SamplingParams(max_new_tokens=0, prompt_logprobs=0))


def sched(num_slots=4, budget=64, chunk=16, max_waiting=100, queue_timeout=None, stagger=0) -> Scheduler:
    return Scheduler(SchedulerConfig(num_slots=num_slots, max_waiting=max_waiting, max_step_tokens=budget,
                                     prefill_chunk=chunk, queue_timeout=queue_timeout, stagger_tokens=stagger))


def finish_if_done(s: Scheduler, q: Sequence, now: float) -> None:
    if q.num_output >= q.params.max_new_tokens:
        s.finish(q, FinishReason.LENGTH, now)


def run_step(s: Scheduler, now=0.0):
    """Schedule, then pretend the model ran, as the engine does: chunks are recorded, a prompt's last chunk gives
    its first token (a score-only prompt finishes instead), every decoded sequence gets a token."""
    out = s.schedule(now)
    for c in out.prefill:
        s.prefilled(c)
        if c.is_last:
            if c.seq.score_only:
                s.finish(c.seq, FinishReason.LENGTH, now)
            else:
                c.seq.output_ids.append(7)
                finish_if_done(s, c.seq, now)
    for q in out.decode:
        s.decoded(q)
        q.output_ids.append(7)
        finish_if_done(s, q, now)
    return out


def chunks(out):
    return [(c.seq.request_id, c.start, c.end) for c in out.prefill]


def ids(seqs):
    return [q.request_id for q in seqs]


def step_tokens(out) -> int:
    return len(out.decode) + sum(c.end - c.start for c in out.prefill)


# ---- configuration ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [
    dict(num_slots=4, max_step_tokens=4),  # no room for a prompt token after every decode token
    dict(num_slots=4, max_step_tokens=3),
    dict(num_slots=0, max_step_tokens=8),
    dict(num_slots=2, max_step_tokens=8, prefill_chunk=0),
    dict(num_slots=2, max_step_tokens=8, max_waiting=-1),
    dict(num_slots=2, max_step_tokens=8, stagger_tokens=-1),
])
def test_invalid_config_is_refused(kw):
    args = dict(num_slots=2, max_waiting=4, max_step_tokens=8, prefill_chunk=4) | kw
    with pytest.raises(ValueError):
        SchedulerConfig(**args)


def test_smallest_valid_budget_is_one_more_than_the_slots():
    cfg = SchedulerConfig(num_slots=4, max_waiting=0, max_step_tokens=5, prefill_chunk=1)
    assert cfg.max_step_tokens == 5 and cfg.queue_timeout is None


# ---- the step: decode tokens, then prompt chunks ------------------------------------------------------------


def test_short_prompts_share_one_step_then_decode_together():
    s = sched(num_slots=4, budget=64)
    s.add([seq("a"), seq("b")])
    out = run_step(s)
    assert chunks(out) == [("a", 0, 4), ("b", 0, 4)] and out.decode == []
    assert (s.get("a").slot, s.get("b").slot) == (0, 1)
    assert s.get("a").output_ids == [7] and s.get("b").status is SequenceStatus.RUNNING
    out = run_step(s)
    assert out.prefill == [] and ids(out.decode) == ["a", "b"]


def test_every_running_sequence_decodes_and_counts_against_the_budget():
    s = sched(num_slots=8, budget=20, chunk=100)
    s.add([seq(f"r{i}", 1, max_new=50) for i in range(6)])
    out = run_step(s)  # six one-token prompts: 6 tokens, all running afterwards
    assert len(out.prefill) == 6 and step_tokens(out) == 6
    s.add([seq("long", 400)])
    out = run_step(s)
    # 20 - 6 decode tokens leaves 14 prompt tokens.
    assert ids(out.decode) == [f"r{i}" for i in range(6)]
    assert chunks(out) == [("long", 0, 14)] and step_tokens(out) == 20
    out = run_step(s)
    assert len(out.decode) == 6 and chunks(out) == [("long", 14, 28)]


def test_a_step_never_exceeds_max_step_tokens():
    s = sched(num_slots=4, budget=25, chunk=16)
    s.add([seq("a", 10), seq("b", 10), seq("c", 10)])
    out = run_step(s)
    assert chunks(out) == [("a", 0, 10), ("b", 0, 10), ("c", 0, 5)] and step_tokens(out) == 25
    assert s.get("c").status is SequenceStatus.PREFILLING and s.get("c").num_cached == 5
    out = run_step(s)
    assert ids(out.decode) == ["a", "b"] and chunks(out) == [("c", 5, 10)] and step_tokens(out) == 7


def test_the_oldest_prompt_is_served_first_and_younger_ones_fill_the_rest():
    s = sched(num_slots=4, budget=300, chunk=256)
    s.add([seq("old", 600), seq("young", 30), seq("third", 30)])
    out = run_step(s)
    assert chunks(out) == [("old", 0, 256), ("young", 0, 30), ("third", 0, 14)]
    out = run_step(s)
    # young decodes (1 token); old continues before third, which gets what is left (here all it needs).
    assert ids(out.decode) == ["young"]
    assert chunks(out) == [("old", 256, 512), ("third", 14, 30)]
    out = run_step(s)
    assert ids(out.decode) == ["young", "third"] and chunks(out) == [("old", 512, 600)]
    assert s.get("old").status is SequenceStatus.RUNNING and s.get("old").num_cached == 600


def test_prompts_in_progress_go_first_in_admission_order():
    s = sched(num_slots=4, budget=12, chunk=8)
    s.add([seq("first", 20)])
    out = run_step(s)
    assert chunks(out) == [("first", 0, 8)]
    s.add([seq("second", 20)])
    out = run_step(s)
    assert chunks(out) == [("first", 8, 16), ("second", 0, 4)]
    out = run_step(s)
    assert chunks(out) == [("first", 16, 20), ("second", 4, 12)]
    out = run_step(s)
    assert ids(out.decode) == ["first"] and chunks(out) == [("second", 12, 20)]


def test_each_chunk_is_at_most_prefill_chunk_and_others_keep_decoding():
    s = sched(num_slots=2, budget=100, chunk=8)
    s.add([seq("short", 3, max_new=50)])
    run_step(s)
    s.add([seq("long", 20, max_new=2)])
    got = []
    for _ in range(3):
        out = run_step(s)
        got += [(c.start, c.end) for c in out.prefill]
        assert ids(out.decode)[:1] == ["short"]  # never stalled by the long prompt
    assert got == [(0, 8), (8, 16), (16, 20)]
    assert s.get("long").status is SequenceStatus.RUNNING and s.get("long").num_cached == 20


def test_several_prompts_each_capped_at_prefill_chunk():
    s = sched(num_slots=4, budget=64, chunk=10)
    s.add([seq("a", 25), seq("b", 25), seq("c", 4)])
    out = run_step(s)
    assert chunks(out) == [("a", 0, 10), ("b", 0, 10), ("c", 0, 4)]


def test_waiting_sequences_start_only_into_free_slots_and_take_the_lowest():
    s = sched(num_slots=2, budget=64)
    a, b, c = seq("a", 5), seq("b", 5), seq("c", 5)
    s.add([a, b, c])
    out = run_step(s)  # a and b prefilled together; c waits for a slot although the budget has room
    assert ids(x.seq for x in out.prefill) == ["a", "b"] and c.slot is None
    assert c.status is SequenceStatus.WAITING and s.num_free_slots == 0 and s.num_waiting == 1
    s.finish(a, FinishReason.STOP, 0.0)  # e.g. its first token was a stop token
    assert s.num_free_slots == 1
    out = run_step(s)
    assert chunks(out) == [("c", 0, 5)] and c.slot == a.slot == 0
    assert ids(out.decode) == ["b"]


def test_freed_slots_are_reused_least_recently_freed_first():
    # The slot freed longest ago goes first: the K/V of recent requests stay available to the prefix cache.
    s = sched(num_slots=3, budget=64)
    first = [seq(f"s{i}", 2, max_new=100) for i in range(3)]
    s.add(first)
    run_step(s)
    assert [q.slot for q in first] == [0, 1, 2]
    s.finish(first[2], FinishReason.STOP, 0.0)
    s.finish(first[0], FinishReason.STOP, 0.0)
    assert s.num_free_slots == 2 and s.num_running == 1
    x, y = seq("x", 2), seq("y", 2)
    s.add([x])
    run_step(s)
    assert x.slot == 2
    s.add([y])
    run_step(s)
    assert y.slot == 0


def test_finished_sequence_frees_its_slot_for_a_waiting_one():
    s = sched(num_slots=1, budget=64)
    a, b = seq("a", max_new=2), seq("b")
    s.add([a, b])
    run_step(s)  # a prefilled, first token
    assert s.num_free_slots == 0 and s.num_waiting == 1
    run_step(s)  # a decodes its 2nd token and finishes
    assert a.is_finished and a.finish_reason is FinishReason.LENGTH and s.num_free_slots == 1
    out = run_step(s)
    assert ids(c.seq for c in out.prefill) == ["b"] and b.slot == a.slot


def test_abort_frees_slot_at_once_from_any_state():
    s = sched(num_slots=2, budget=3, chunk=2)
    s.add([seq("run", 2, 100), seq("pre", 6, 100), seq("wait", 2, 100)])
    out = run_step(s)  # run: its whole prompt; pre: the one token left
    assert chunks(out) == [("run", 0, 2), ("pre", 0, 1)]
    out = run_step(s)
    assert ids(out.decode) == ["run"] and chunks(out) == [("pre", 1, 3)]
    assert s.get("pre").status is SequenceStatus.PREFILLING and s.get("wait").status is SequenceStatus.WAITING
    for rid in ("wait", "pre", "run"):
        q = s.abort(rid, 1.0)
        assert q.finish_reason is FinishReason.ABORTED and q.is_finished and s.get(rid) is None
    assert s.num_free_slots == 2 and not s.has_work()
    assert s.abort("unknown", 1.0) is None
    assert s.schedule(2.0).is_empty


def test_finished_sequences_are_dropped_from_decode_and_prefill():
    s = sched(num_slots=2, budget=8, chunk=4)
    s.add([seq("a", 2, 100), seq("b", 10, 100)])
    run_step(s)
    a = s.get("a")
    s.finish(a, FinishReason.STOP, 0.0)
    s.finish(a, FinishReason.ERROR, 0.0)  # a second finish is a no-op: same reason, slot not freed twice
    assert a.finish_reason is FinishReason.STOP and s.num_free_slots == 1
    out = s.schedule(0.0)
    assert out.decode == [] and chunks(out) == [("b", 4, 8)]


def test_queue_bound_counts_requests_that_will_wait_and_is_all_or_none():
    s = sched(num_slots=1, max_waiting=2)
    s.add([seq("a", max_new=100)])
    run_step(s)  # "a" holds the only slot
    with pytest.raises(OverloadedError):
        s.add([seq("b"), seq("c"), seq("d")])
    assert s.num_waiting == 0 and s.get("b") is None
    s.add([seq("b"), seq("c")])
    with pytest.raises(OverloadedError):
        s.add([seq("d")])
    # With free slots, as many more requests are accepted: they will not wait for long.
    s2 = sched(num_slots=2, max_waiting=0)
    s2.add([seq("x"), seq("y")])
    with pytest.raises(OverloadedError):
        s2.add([seq("z")])


def test_queue_timeout_drops_only_waiting_requests():
    s = sched(num_slots=1, max_waiting=5, queue_timeout=1.0)
    s.add([seq("a", max_new=100, t=0.0), seq("b", t=0.0), seq("c", t=0.9)])
    run_step(s, now=0.1)
    out = run_step(s, now=1.5)
    assert ids(out.timed_out) == ["b"]
    assert out.timed_out[0].finish_reason is FinishReason.TIMEOUT and out.timed_out[0].slot is None
    assert s.get("b") is None and s.get("a") is not None and s.get("c") is not None
    assert ids(out.decode) == ["a"] and out.prefill == []
    assert s.num_waiting == 1


def test_queue_timeout_is_checked_before_a_freed_slot_is_given():
    s = sched(num_slots=1, max_waiting=5, queue_timeout=1.0)
    a, b, c = seq("a", max_new=100, t=0.0), seq("b", t=0.0), seq("c", t=0.5)
    s.add([a, b, c])
    run_step(s, now=0.0)
    s.finish(a, FinishReason.STOP, 1.2)
    out = run_step(s, now=1.2)
    # b waited 1.2 s (> 1 s): it fails, and c, which waited 0.7 s, gets the slot.
    assert ids(out.timed_out) == ["b"] and chunks(out) == [("c", 0, 4)] and c.slot == 0


def test_no_timeout_means_waiting_forever():
    s = sched(num_slots=1, max_waiting=5)
    s.add([seq("a", max_new=100, t=0.0), seq("b", t=0.0)])
    run_step(s, now=0.0)
    out = run_step(s, now=1e6)
    assert out.timed_out == [] and s.get("b").status is SequenceStatus.WAITING


# ---- score-only prompts -----------------------------------------------------------------------------------------


def test_score_only_prompts_share_the_budget_and_finish_after_their_last_chunk():
    s = sched(num_slots=8, budget=32, chunk=32)
    scores = [score_seq(f"s{i}", 7) for i in range(6)]
    s.add(scores + [seq("g", 4)])
    out = run_step(s)
    # 4 x 7 = 28 tokens, then the fifth prompt gets the 4 that are left.
    assert chunks(out) == [("s0", 0, 7), ("s1", 0, 7), ("s2", 0, 7), ("s3", 0, 7), ("s4", 0, 4)]
    assert all(q.is_finished and q.finish_reason is FinishReason.LENGTH for q in scores[:4])
    assert s.get("s4").status is SequenceStatus.PREFILLING
    out = run_step(s)
    assert chunks(out) == [("s4", 4, 7), ("s5", 0, 7), ("g", 0, 4)] and out.decode == []
    out = run_step(s)
    assert ids(out.decode) == ["g"] and out.prefill == []
    assert all(q.is_finished for q in scores) and s.num_running == 1


def test_a_long_score_prompt_goes_in_chunks_and_never_decodes():
    s = sched(num_slots=4, budget=64, chunk=8)
    long = score_seq("long", 20)
    s.add([long])
    for expected in [(0, 8), (8, 16), (16, 20)]:
        out = s.schedule(0.0)
        assert out.decode == [] and [(c.start, c.end) for c in out.prefill] == [expected]
        s.prefilled(out.prefill[0])
        # Still prefilling after its last chunk: it is never moved to the running sequences.
        assert long.status is SequenceStatus.PREFILLING and long not in s.running
    assert out.prefill[0].is_last and long.num_cached == 20 and long.output_ids == []
    s.finish(long, FinishReason.LENGTH, 0.0)
    assert s.num_free_slots == 4 and not s.has_work()


def test_score_only_and_generating_prompts_mix_in_one_step():
    s = sched(num_slots=4, budget=64)
    s.add([score_seq("s1", 10), seq("g", 10), score_seq("s2", 10)])
    out = run_step(s)
    assert ids(c.seq for c in out.prefill) == ["s1", "g", "s2"]
    assert ids(s.running) == ["g"] and s.get("s1") is None and s.get("s2") is None


# ---- first tokens in arrival order ------------------------------------------------------------------------------


def test_first_tokens_come_in_arrival_order_when_chunks_hold_whole_prompts():
    s = sched(num_slots=4, budget=10, chunk=64)
    qs = [seq("a", 6, 50), seq("b", 6, 50), seq("c", 3, 50), seq("d", 1, 50)]
    s.add(qs)
    first = {}
    for step in range(10):
        run_step(s, now=float(step))
        for q in qs:
            if q.output_ids and q.request_id not in first:
                first[q.request_id] = step
    # a: 6 tokens at step 0; b: 4 at step 0 and 2 at step 1; c and d at step 1 (1 decode + 2 + 3 + 1 = 7).
    assert first == {"a": 0, "b": 1, "c": 1, "d": 1}


# ---- staggered starts -------------------------------------------------------------------------------------------


def test_short_prompts_arriving_together_start_a_few_per_step_and_finish_apart():
    s = sched(num_slots=8, budget=64, stagger=8)
    qs = [seq(r, n_prompt=4, max_new=3) for r in "abcd"]
    for q in qs:
        s.add([q])  # four requests, each its own add (as four clients' requests are)
    out = run_step(s, now=0.0)
    assert chunks(out) == [("a", 0, 4), ("b", 0, 4)]  # 8 tokens of short prompts: the next one waits
    out = run_step(s, now=1.0)
    assert chunks(out) == [("c", 0, 4), ("d", 0, 4)] and ids(out.decode) == ["a", "b"]
    for now in range(2, 8):
        run_step(s, now=float(now))
    # Started in two steps, they finished in two: their clients come back apart.
    assert [q.finish_time for q in qs] == [2.0, 2.0, 3.0, 3.0]


def test_a_short_prompt_waits_two_steps_at_most():
    s = sched(num_slots=8, budget=64, stagger=1)
    for r in "abcde":
        s.add([seq(r, n_prompt=1, max_new=20)])
    assert [chunks(run_step(s, now=float(t))) for t in range(3)] == [
        [("a", 0, 1)], [("b", 0, 1)], [("c", 0, 1), ("d", 0, 1), ("e", 0, 1)]]


def test_long_prompts_are_not_held_back_and_do_not_count():
    """A prompt with more than stagger_tokens to compute starts as the budget allows, as without the stagger."""
    s = sched(num_slots=8, budget=64, chunk=16, stagger=8)
    s.add([seq("long1", n_prompt=9)])
    s.add([seq("long2", n_prompt=30)])
    s.add([seq("short1", n_prompt=5)])
    s.add([seq("short2", n_prompt=3)])
    s.add([seq("long3", n_prompt=12)])
    s.add([seq("short3", n_prompt=1)])
    out = run_step(s)
    # 8 tokens of short prompts: long3 still starts, short3 waits
    assert chunks(out) == [("long1", 0, 9), ("long2", 0, 16), ("short1", 0, 5), ("short2", 0, 3), ("long3", 0, 12)]
    assert chunks(run_step(s)) == [("long2", 16, 30), ("short3", 0, 1)]


def test_only_the_tokens_past_a_cached_prefix_make_a_prompt_short():
    s = Scheduler(SchedulerConfig(num_slots=4, max_waiting=100, max_step_tokens=64, prefill_chunk=64,
                                  prefix_block=4, prefix_copy=True, stagger_tokens=8))
    shared = list(range(100, 140))
    s.add([Sequence("first", shared + [1], SamplingParams(max_new_tokens=1))])
    run_step(s)  # 41 tokens: long, and now cached
    for r, own in (("a", [2, 3]), ("b", [4, 5, 6, 7, 8, 9]), ("c", [10])):
        s.add([Sequence(r, shared + own, SamplingParams(max_new_tokens=5))])
    assert chunks(run_step(s)) == [("a", 40, 42), ("b", 40, 46)]  # 2 + 6 = 8 short tokens: c waits
    assert chunks(run_step(s)) == [("c", 40, 41)]


def test_the_sequences_of_one_add_start_together_whatever_the_stagger():
    """A request's n completions (or /score's texts) are one add: they start in the same step."""
    s = sched(num_slots=8, budget=64, stagger=4)
    s.add([seq(f"n{i}", n_prompt=3) for i in range(3)])
    s.add([seq("other", n_prompt=1)])
    assert chunks(run_step(s)) == [("n0", 0, 3), ("n1", 0, 3), ("n2", 0, 3)]  # 9 short tokens; `other` waits
    assert chunks(run_step(s)) == [("other", 0, 1)]


def test_stagger_zero_starts_as_many_as_the_budget_allows():
    s = sched(num_slots=8, budget=64, stagger=0)
    for r in "abcde":
        s.add([seq(r, n_prompt=4)])
    assert len(run_step(s).prefill) == 5


# ---- random workloads -------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    num_slots=st.integers(1, 10),
    extra=st.integers(1, 80),
    chunk=st.integers(1, 64),
    timeout=st.sampled_from([None, 3.0, 40.0]),
    stagger=st.sampled_from([0, 2, 4, 8]),
    reqs=st.lists(
        st.tuples(st.one_of(st.integers(1, 6), st.integers(1, 120)), st.integers(0, 6),
                  st.one_of(st.just(0), st.integers(0, 3), st.integers(0, 15)),
                  st.one_of(st.none(), st.integers(0, 30)), st.booleans()),
        min_size=1, max_size=20,
    ),
)
def test_random_workloads_keep_the_policy_and_finish(num_slots, extra, chunk, timeout, stagger, reqs):
    """reqs: (prompt tokens, max new tokens (0: score-only), arrival step, abort at step or None, joins the add
    of the request before it in the same step: one group, as a request's `n` sequences are)."""
    budget = num_slots + extra
    s = sched(num_slots=num_slots, budget=budget, chunk=chunk, max_waiting=100, queue_timeout=timeout,
              stagger=stagger)
    seqs = [Sequence(str(i), [1] * n, SamplingParams(max_new_tokens=m), arrival_time=float(t))
            for i, (n, m, t, _, _) in enumerate(reqs)]
    # Requests arrive in id order (arrival order = id order).
    order = sorted(range(len(seqs)), key=lambda i: reqs[i][2])
    seqs = [seqs[i] for i in order]
    reqs = [reqs[i] for i in order]
    for i, q in enumerate(seqs):
        q.request_id = str(i)
    timed_out = set()
    last_group = None  # the group of the sequence started last
    holds = 0  # steps in which the stagger held a sequence back
    step = 0
    while step < 100 or s.has_work():
        assert step < 20000, "the workload did not finish"
        now = float(step)
        groups: list[list[Sequence]] = []
        for q, r in zip(seqs, reqs):
            if r[2] == step:
                if groups and r[4]:
                    groups[-1].append(q)
                else:
                    groups.append([q])
        for g in groups:
            s.add(g)
        for q, r in zip(seqs, reqs):
            if r[3] == step and r[2] <= step:
                s.abort(q.request_id, now)

        running = list(s.running)
        prefilling = list(s.prefilling)
        waiting = list(s.waiting)
        cached = {q.request_id: q.num_cached for q in seqs}
        held = {q.slot for q in running + prefilling}
        free = list(s.free_slots)  # in the order they are handed out: least recently freed first
        assert sorted(free) == sorted(set(range(num_slots)) - held)
        expired = [q for q in waiting if timeout is not None and now - q.arrival_time > timeout]
        still_waiting = [q for q in waiting if q not in expired]

        out = run_step(s, now)

        assert out.timed_out == expired
        assert all(q.finish_reason is FinishReason.TIMEOUT and q.slot is None for q in out.timed_out)
        timed_out |= {q.request_id for q in out.timed_out}
        # Every running sequence decodes one token.
        assert out.decode == running
        # The budget holds, and each chunk is a non-empty continuation of at most prefill_chunk tokens.
        assert step_tokens(out) <= budget
        for c in out.prefill:
            assert 1 <= c.end - c.start <= chunk and c.start == cached[c.seq.request_id]
        # Prompts in progress first (admission order), then waiting ones in arrival order, into free slots only.
        eligible = prefilling + still_waiting[: len(free)]
        served = [c.seq for c in out.prefill]
        assert served == eligible[: len(served)]
        # Greedy: everyone before the last chunk got all it may take; anyone left out means the budget is spent.
        for c in out.prefill[:-1]:
            assert c.end - c.start == min(chunk, c.seq.num_prompt - c.start)
        if out.prefill and out.prefill[-1].end - out.prefill[-1].start < min(
                chunk, out.prefill[-1].seq.num_prompt - out.prefill[-1].start):
            assert step_tokens(out) == budget
        started = [q for q in served if q in still_waiting]

        def held_back(q, short, group):
            # the stagger: a short prompt (nothing cached here: all of it to compute) waits while this step's short
            # prompts hold `stagger` tokens, unless of the group started last or held MAX_HOLD_STEPS steps already
            return (stagger > 0 and q.num_prompt <= stagger and short >= stagger and q.group != group
                    and step + 1 - int(q.arrival_time) <= MAX_HOLD_STEPS)

        short, group = 0, last_group
        for q in started:
            assert not held_back(q, short, group)
            short += q.num_prompt if q.num_prompt <= stagger else 0
            group = q.group
        if len(served) < len(eligible):  # left out: the budget is spent, or the next one is held back
            nxt = eligible[len(served)]
            assert step_tokens(out) == budget or (nxt in still_waiting and held_back(nxt, short, group))
            if step_tokens(out) < budget:
                holds += 1
        last_group = group
        # A prompt in progress always advances (the budget exceeds the slots).
        if prefilling:
            assert served[:1] == prefilling[:1]
        # Newly started sequences are the oldest waiting ones and take the least recently freed slots.
        assert started == still_waiting[: len(started)]
        assert [q.slot for q in started] == free[: len(started)]
        # No waiting sequence started while an older one waits.
        if s.waiting:
            oldest_waiting = min(int(q.request_id) for q in s.waiting)
            assert all(int(q.request_id) < oldest_waiting for q in seqs if q.scheduled_time is not None)
        # Slots: unique, in range, and accounted for.
        holders = s.prefilling + s.running
        slots = [q.slot for q in holders]
        assert len(slots) == len(set(slots)) and all(0 <= x < num_slots for x in slots)
        assert len(holders) + s.num_free_slots == num_slots
        step += 1

    assert s.num_free_slots == num_slots and s.num_waiting == 0
    event(f"stagger held a sequence back: {holds > 0}")
    target(float(holds))
    for q, r in zip(seqs, reqs):
        assert q.is_finished
        if q.request_id in timed_out:
            assert q.finish_reason is FinishReason.TIMEOUT and q.scheduled_time is None
        elif q.finish_reason is FinishReason.LENGTH:
            assert q.num_cached >= q.num_prompt and q.num_output == q.params.max_new_tokens
        else:
            assert q.finish_reason is FinishReason.ABORTED and r[3] is not None


@settings(max_examples=80, deadline=None)
@given(
    num_slots=st.integers(1, 5),
    extra=st.integers(1, 40),
    prompts=st.lists(st.integers(1, 60), min_size=1, max_size=10),
)
def test_first_tokens_follow_arrival_order_when_no_prompt_exceeds_the_chunk(num_slots, extra, prompts):
    s = sched(num_slots=num_slots, budget=num_slots + extra, chunk=max(prompts), max_waiting=100)
    qs = [seq(str(i), n, max_new=3) for i, n in enumerate(prompts)]
    s.add(qs)
    first = {}
    step = 0
    while s.has_work():
        assert step < 10000
        run_step(s, now=float(step))
        for q in qs:
            if q.output_ids and q.request_id not in first:
                first[q.request_id] = step
        step += 1
    steps = [first[q.request_id] for q in qs]
    assert steps == sorted(steps)
