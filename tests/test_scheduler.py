"""Unit tests of the pure scheduler: admission, chunked prefill, slots, queue bound, timeouts, score packing."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.engine.scheduler import Scheduler, SchedulerConfig
from serving.engine.sequence import FinishReason, Sequence, SequenceStatus
from serving.errors import OverloadedError
from serving.sampling_params import SamplingParams


def seq(rid, n_prompt=4, max_new=3, t=0.0):
    return Sequence(rid, list(range(1, n_prompt + 1)), SamplingParams(max_new_tokens=max_new), arrival_time=t)


def score_seq(rid, n_prompt):
    return Sequence(rid, [1] * n_prompt, SamplingParams(max_new_tokens=0, prompt_logprobs=0))


def run_step(s: Scheduler, now=0.0):
    """Schedule, then pretend the model ran: prefill chunks complete, decoded sequences get a token."""
    out = s.schedule(now)
    for c in out.prefill:
        s.prefilled(c)
        if c.is_last:
            if c.seq.score_only:
                s.finish(c.seq, FinishReason.LENGTH, now)
            else:
                c.seq.output_ids.append(7)
    for q in out.decode:
        s.decoded(q)
        q.output_ids.append(7)
        if q.num_output >= q.params.max_new_tokens:
            s.finish(q, FinishReason.LENGTH, now)
    return out


def test_one_generating_prefill_per_step_then_decode():
    s = Scheduler(SchedulerConfig(num_slots=4, max_waiting=10, prefill_chunk=8))
    s.add([seq("a"), seq("b")])
    out = run_step(s)
    assert [c.seq.request_id for c in out.prefill] == ["a"] and out.decode == []
    out = run_step(s)
    assert [c.seq.request_id for c in out.prefill] == ["b"]
    assert [q.request_id for q in out.decode] == ["a"]
    out = run_step(s)
    assert out.prefill == [] and [q.request_id for q in out.decode] == ["a", "b"]


def test_long_prompt_is_chunked_and_others_keep_decoding():
    s = Scheduler(SchedulerConfig(num_slots=2, max_waiting=10, prefill_chunk=8))
    s.add([seq("short", 3, max_new=50)])
    run_step(s)
    s.add([seq("long", 20, max_new=2)])
    chunks = []
    for _ in range(3):
        out = run_step(s)
        chunks += [(c.start, c.end) for c in out.prefill]
        assert [q.request_id for q in out.decode][:1] == ["short"]  # never stalled by the long prompt
    assert chunks == [(0, 8), (8, 16), (16, 20)]
    assert s.get("long").status is SequenceStatus.RUNNING and s.get("long").num_cached == 20


def test_finished_sequence_frees_its_slot_for_a_waiting_one():
    s = Scheduler(SchedulerConfig(num_slots=1, max_waiting=10, prefill_chunk=8))
    a, b = seq("a", max_new=2), seq("b")
    s.add([a, b])
    run_step(s)  # a prefilled, first token
    assert s.num_free_slots == 0 and s.num_waiting == 1
    run_step(s)  # a decodes its 2nd token and finishes
    assert a.is_finished and s.num_free_slots == 1
    out = run_step(s)
    assert [c.seq.request_id for c in out.prefill] == ["b"] and b.slot == a.slot


def test_abort_frees_slot_at_once_from_any_state():
    s = Scheduler(SchedulerConfig(num_slots=2, max_waiting=10, prefill_chunk=2))
    s.add([seq("run", 2, 100), seq("pre", 6, 100), seq("wait", 2, 100)])
    run_step(s)
    run_step(s)  # "pre" is mid-prefill, "wait" waits
    assert s.get("pre").status is SequenceStatus.PREFILLING
    for rid in ("wait", "pre", "run"):
        q = s.abort(rid, 1.0)
        assert q.finish_reason is FinishReason.ABORTED
    assert s.num_free_slots == 2 and not s.has_work()
    assert s.abort("unknown", 1.0) is None


def test_queue_bound_counts_requests_that_will_wait_and_is_all_or_none():
    s = Scheduler(SchedulerConfig(num_slots=1, max_waiting=2, prefill_chunk=8))
    s.add([seq("a", max_new=100)])
    run_step(s)  # "a" holds the only slot
    with pytest.raises(OverloadedError):
        s.add([seq("b"), seq("c"), seq("d")])
    assert s.num_waiting == 0
    s.add([seq("b"), seq("c")])
    with pytest.raises(OverloadedError):
        s.add([seq("d")])
    # With a free slot, one more request is accepted: it will not wait for long.
    s2 = Scheduler(SchedulerConfig(num_slots=2, max_waiting=0, prefill_chunk=8))
    s2.add([seq("x"), seq("y")])
    with pytest.raises(OverloadedError):
        s2.add([seq("z")])


def test_queue_timeout_drops_only_waiting_requests():
    s = Scheduler(SchedulerConfig(num_slots=1, max_waiting=5, prefill_chunk=8, queue_timeout=1.0))
    s.add([seq("a", max_new=100, t=0.0), seq("b", t=0.0), seq("c", t=0.9)])
    run_step(s, now=0.1)
    out = run_step(s, now=1.5)
    assert [q.request_id for q in out.timed_out] == ["b"]
    assert s.get("a") is not None and s.get("c") is not None
    assert out.timed_out[0].finish_reason is FinishReason.TIMEOUT


def test_score_only_prompts_are_packed_within_the_budget():
    s = Scheduler(SchedulerConfig(num_slots=8, max_waiting=20, prefill_chunk=32))
    s.add([score_seq(f"s{i}", 7) for i in range(6)] + [seq("g")])
    out = run_step(s)
    # 4 rows x 8 tokens would be 32: at most 4 rows of <= 8 tokens each (rows x longest <= budget).
    assert len(out.prefill) == 4 and all(c.end - c.start == 7 for c in out.prefill)
    out = run_step(s)
    assert len(out.prefill) == 2
    out = run_step(s)
    assert [c.seq.request_id for c in out.prefill] == ["g"]


def test_a_long_score_prompt_goes_alone_in_chunks():
    s = Scheduler(SchedulerConfig(num_slots=4, max_waiting=20, prefill_chunk=8))
    s.add([score_seq("long", 20), score_seq("short", 2)])
    out = run_step(s)
    assert [(c.seq.request_id, c.start, c.end) for c in out.prefill] == [("long", 0, 8)]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(1, 9),
    st.lists(st.tuples(st.integers(1, 30), st.integers(0, 6), st.booleans()), min_size=1, max_size=12),
)
def test_random_workloads_keep_invariants_and_finish(num_slots, chunk, reqs):
    s = Scheduler(SchedulerConfig(num_slots=num_slots, max_waiting=100, prefill_chunk=chunk))
    seqs = []
    for i, (n, max_new, abort_early) in enumerate(reqs):
        q = Sequence(str(i), [1] * n, SamplingParams(max_new_tokens=max_new))
        seqs.append((q, abort_early))
    s.add([q for q, _ in seqs])
    for step in range(2000):
        if not s.has_work():
            break
        out = run_step(s)
        rows = out.prefill and sum(c.end - c.start for c in out.prefill)
        assert not out.prefill or rows <= max(chunk, 1) * len(out.prefill)
        holders = [q for q in s.prefilling + s.running]
        slots = [q.slot for q in holders]
        assert len(slots) == len(set(slots)) and len(holders) + s.num_free_slots == num_slots
        assert len(out.decode) <= num_slots
        for q, abort_early in seqs:
            if abort_early and step == 3:
                s.abort(q.request_id, 0.0)
    assert not s.has_work() and s.num_free_slots == num_slots
    assert all(q.is_finished for q, _ in seqs)


def test_score_packing_budgets_padded_rows():
    cfg = SchedulerConfig(num_slots=16, max_waiting=20, prefill_chunk=64, prefill_row_buckets=(1, 2, 4, 8, 16))
    s = Scheduler(cfg)
    s.add([score_seq(f"s{i}", 12) for i in range(6)])
    out = run_step(s)
    # 5 rows would pad to 8 and 8 x 12 > 64: four rows (4 x 12 <= 64) go first.
    assert len(out.prefill) == 4


# ---- packed prefill (bucketed decode batching) ------------------------------------------------------------------

ROWS = (1, 2, 4, 8, 16)
CHUNKS = (1, 16, 64, 128, 256)


def packed(num_slots=16, budget=256, chunk=256, **kw):
    return Scheduler(SchedulerConfig(num_slots=num_slots, max_waiting=100, prefill_chunk=chunk,
                                     prefill_row_buckets=ROWS, prefill_chunk_buckets=CHUNKS,
                                     max_prefill_tokens=budget, **kw))


def padded_size(s: Scheduler, chunks) -> int:
    return s._padded_rows(len(chunks)) * s._padded_chunk(max(c.end - c.start for c in chunks))


def test_packed_prefill_takes_several_waiting_prompts_in_one_pass():
    s = packed()
    s.add([seq(f"r{i}", 12) for i in range(16)])
    out = run_step(s)
    # 16 rows x 16 tokens (12 padded to 16) = 256: every prompt in one pass, all get their first token.
    assert [c.seq.request_id for c in out.prefill] == [f"r{i}" for i in range(16)]
    assert all((c.start, c.end) == (0, 12) for c in out.prefill) and out.decode == []
    out = run_step(s)
    assert out.prefill == [] and len(out.decode) == 16


def test_packed_prefill_respects_the_padded_budget_in_arrival_order():
    s = packed(budget=256)
    s.add([seq("a", 40), seq("b", 30), seq("c", 50), seq("d", 10), seq("e", 20)])
    out = run_step(s)
    # 4 rows of <= 64 tokens: 4 x 64 = 256; a fifth row would pad to 8 x 64.
    assert [c.seq.request_id for c in out.prefill] == ["a", "b", "c", "d"]
    assert padded_size(s, out.prefill) <= 256
    assert s.get("e").status is SequenceStatus.WAITING and s.get("e").slot is None
    out = run_step(s)
    assert [c.seq.request_id for c in out.prefill] == ["e"]


def test_the_oldest_prompt_gets_a_whole_chunk_and_younger_ones_fill_what_is_left():
    s = packed(budget=512, chunk=256)
    s.add([seq("old", 600), seq("young", 30), seq("third", 30)])
    out = run_step(s)
    # old: 256 tokens; 2 rows x 256 = 512 leaves room for one more row; a third would pad to 4 x 256.
    assert [(c.seq.request_id, c.start, c.end) for c in out.prefill] == [("old", 0, 256), ("young", 0, 30)]
    out = run_step(s)
    assert [(c.seq.request_id, c.start, c.end) for c in out.prefill] == [("old", 256, 512), ("third", 0, 30)]
    assert [q.request_id for q in out.decode] == ["young"]
    out = run_step(s)
    assert [(c.seq.request_id, c.start, c.end) for c in out.prefill] == [("old", 512, 600)]
    assert s.get("old").status is SequenceStatus.RUNNING


def test_a_younger_row_is_cut_at_a_chunk_bucket_that_keeps_the_pass_within_budget():
    s = packed(budget=256, chunk=256)
    s.add([seq("short", 20), seq("long", 300)])
    out = run_step(s)
    # short pads to 16..64 -> width 64; a second row may take up to 256 // 2 = 128 tokens (a bucket).
    assert [(c.seq.request_id, c.end - c.start) for c in out.prefill] == [("short", 20), ("long", 128)]
    assert padded_size(s, out.prefill) == 256


def test_a_long_prompt_alone_goes_in_chunks_while_the_others_decode():
    s = packed(budget=64, chunk=64)
    s.add([seq("short", 3, max_new=50)])
    run_step(s)
    s.add([seq("long", 150, max_new=2)])
    chunks = []
    for _ in range(3):
        out = run_step(s)
        chunks += [(c.start, c.end) for c in out.prefill]
        assert [q.request_id for q in out.decode][:1] == ["short"]
    assert chunks == [(0, 64), (64, 128), (128, 150)]


def test_the_oldest_row_gets_its_chunk_even_above_the_budget():
    s = packed(budget=32, chunk=64)
    s.add([seq("a", 100), seq("b", 5)])
    out = run_step(s)
    assert [(c.seq.request_id, c.end - c.start) for c in out.prefill] == [("a", 64)]


def test_packed_prefill_admits_no_more_than_the_free_slots_and_reuses_freed_ones():
    s = packed(num_slots=2)
    a, b, c = seq("a", 5), seq("b", 5), seq("c", 5)
    s.add([a, b, c])
    out = run_step(s)  # a and b prefilled together; c waits for a slot
    assert [x.seq.request_id for x in out.prefill] == ["a", "b"] and c.slot is None
    assert c.status is SequenceStatus.WAITING and s.num_free_slots == 0
    s.finish(a, FinishReason.STOP, 0.0)  # e.g. its first token was a stop token
    assert s.num_free_slots == 1
    out = run_step(s)
    assert [x.seq.request_id for x in out.prefill] == ["c"] and c.slot == a.slot
    assert [q.request_id for q in out.decode] == ["b"]


def test_flat_packed_prefill_counts_prompt_tokens_not_padded_rows():
    s = packed(budget=256, flat_prefill=True)
    s.add([seq("a", 40), seq("b", 30), seq("c", 50), seq("d", 10), seq("e", 20), seq("f", 200)])
    out = run_step(s)
    # 150 tokens for a-e (the padded form took 4 rows); f takes the 106 the budget leaves.
    assert [(c.seq.request_id, c.end - c.start) for c in out.prefill] == [
        ("a", 40), ("b", 30), ("c", 50), ("d", 10), ("e", 20), ("f", 106)]
    out = run_step(s)
    assert [(c.seq.request_id, c.start, c.end) for c in out.prefill] == [("f", 106, 200)]


def test_a_flat_pass_stays_within_the_largest_chunk_bucket():
    s = packed(budget=1024, chunk=256, flat_prefill=True)  # the model pads a pass to a chunk bucket (<= 256)
    s.add([seq("a", 100), seq("b", 300)])
    out = run_step(s)
    assert [(c.seq.request_id, c.end - c.start) for c in out.prefill] == [("a", 100), ("b", 156)]


def test_a_flat_pass_leaves_room_for_the_running_sequences_decode_tokens():
    s = packed(budget=256, chunk=256, flat_prefill=True)
    s.add([seq(f"r{i}", 3, max_new=20) for i in range(6)])
    run_step(s)  # six running sequences
    s.add([seq("long", 400)])
    out = run_step(s)
    # 256 - 6: the decode tokens join the pass, which must stay within the largest chunk bucket.
    assert [(c.seq.request_id, c.end - c.start) for c in out.prefill] == [("long", 250)] and len(out.decode) == 6


def test_packed_prefill_mixes_score_only_and_generating_prompts():
    s = packed()
    s.add([score_seq("s1", 10), seq("g", 10), score_seq("s2", 10)])
    out = run_step(s)
    assert [c.seq.request_id for c in out.prefill] == ["s1", "g", "s2"]
    assert not s.has_work() or [q.request_id for q in s.running] == ["g"]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 6),
    st.sampled_from([16, 64, 128, 256]),
    st.sampled_from([16, 64, 256, 512]),
    st.lists(st.tuples(st.integers(1, 700), st.integers(0, 6), st.booleans()), min_size=1, max_size=12),
)
@pytest.mark.parametrize("flat", [False, True])
def test_packed_random_workloads_keep_the_budget_fifo_and_invariants(flat, num_slots, chunk, budget, reqs):
    s = packed(num_slots=num_slots, budget=budget, chunk=chunk, flat_prefill=flat)
    seqs = [(Sequence(str(i), [1] * n, SamplingParams(max_new_tokens=m)), ab) for i, (n, m, ab) in enumerate(reqs)]
    s.add([q for q, _ in seqs])
    for step in range(5000):
        if not s.has_work():
            break
        holders_before = s.prefilling + list(s.waiting)
        out = run_step(s)
        if out.prefill:
            first = out.prefill[0]
            # FIFO: the pass starts with the oldest unfinished prompt, which gets a whole chunk.
            assert first.seq is holders_before[0]
            whole = min(chunk, max(1, CHUNKS[-1] - len(out.decode))) if flat else chunk  # flat: room for decode
            assert first.end - first.start == min(whole, first.seq.num_prompt - first.start)
            if flat:
                tokens = sum(c.end - c.start for c in out.prefill)
                assert tokens + len(out.decode) <= CHUNKS[-1] or len(out.decode) >= CHUNKS[-1]
                assert len(out.prefill) == 1 or tokens <= budget
            else:
                assert len(out.prefill) == 1 or padded_size(s, out.prefill) <= budget
            order = [int(c.seq.request_id) for c in out.prefill]
            assert order == sorted(order)
        holders = s.prefilling + s.running
        slots = [q.slot for q in holders]
        assert len(slots) == len(set(slots)) and len(holders) + s.num_free_slots == num_slots
        for q, abort_early in seqs:
            if abort_early and step == 2:
                s.abort(q.request_id, 0.0)
    assert not s.has_work() and s.num_free_slots == num_slots
    assert all(q.is_finished for q, _ in seqs)
