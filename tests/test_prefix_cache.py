"""Automatic prefix caching: the block trie, the scheduler's use of it (which slot, what to copy, where a prompt
starts), the engine's outputs with and without it (the fake session checks that nothing unwritten is read), and a
real model's bits with a hit against the same request without one."""

import dataclasses
import random

import numpy as np
import pytest

from serving.engine.prefix_cache import PrefixCache
from serving.engine.scheduler import Scheduler, SchedulerConfig
from serving.engine.sequence import FinishReason, Sequence, SequenceStatus
from serving.sampling_params import SamplingParams
from test_scheduler import run_step

B = 16  # block size


# ---- the trie --------------------------------------------------------------------------------------------------


def test_lookup_finds_whole_blocks_then_continues_token_by_token():
    c = PrefixCache(4, B)
    a = list(range(100, 150))  # 50 tokens: 3 whole blocks and 2 more
    c.assign(0, a, [], 50, own=False)
    assert c.held(0) == 50
    assert c.lookup(a, 50) == {0: 50}
    assert c.lookup(a, 47) == {0: 47}  # the limit
    assert c.lookup(a[:40] + [1] + a[41:], 50) == {0: 40}  # differs at token 40: 2 blocks, then 8 tokens
    assert c.lookup(a[:20] + [1] + a[21:], 50) == {0: 20}
    assert c.lookup([1] + a[1:], 50) == {}  # not one whole block
    assert c.lookup(a[:15], 15) == {}


def test_generated_tokens_are_matched_and_registered_as_they_come():
    c = PrefixCache(2, B)
    prompt, output = list(range(20)), []
    c.assign(1, prompt, output, 20, own=False)
    output += list(range(500, 520))
    c.extend(1, 37)  # the prompt and 17 generated tokens have K/V
    assert c.num_nodes() == 2 and c.held(1) == 37
    assert c.lookup(prompt + output, 40) == {1: 37}


def test_slots_sharing_blocks_and_truncation_prunes_what_no_slot_holds():
    c = PrefixCache(4, B)
    shared = list(range(32))
    c.assign(0, shared + list(range(500, 532)), [], 64, own=False)
    c.assign(1, shared + list(range(900, 916)), [], 48, own=False)
    assert c.lookup(shared + [0] * 16, 48) == {0: 32, 1: 32}
    assert c.num_nodes() == 4 + 1
    c.truncate(0, 40)  # keeps 2 blocks and 8 tokens
    assert c.held(0) == 40 and c.num_nodes() == 3
    assert c.lookup(shared + list(range(500, 532)), 64) == {0: 40, 1: 32}
    c.truncate(1, 0)
    assert c.lookup(shared + list(range(900, 916)), 48) == {0: 32}
    c.truncate(0, 0)
    assert c.num_nodes() == 0 and c.lookup(shared, 32) == {}


def test_assigning_a_slot_to_another_sequence_keeps_only_a_hit_of_its_own():
    c = PrefixCache(2, B)
    old, new = list(range(48)), list(range(32)) + [7] * 16
    c.assign(0, old, [], 48, own=False)
    c.assign(0, new, [], 32, own=True)  # new's first 32 tokens are old's, in this slot
    assert c.lookup(old, 48) == {0: 32} and c.held(0) == 32
    c.assign(0, list(range(300, 348)), [], 32, own=False)  # 32 tokens copied in from elsewhere
    assert c.lookup(new, 48) == {} and c.lookup(list(range(300, 348)), 48) == {0: 32}


def test_extend_only_adds_the_new_blocks():
    c = PrefixCache(2, B)
    ids = list(range(64))
    c.assign(0, ids, [], 0, own=False)
    c.extend(0, 20)
    c.extend(0, 33)
    c.extend(0, 33)
    assert c.num_nodes() == 2 and c.held(0) == 33
    c.extend(0, 64)
    assert c.lookup(ids, 64) == {0: 64}


# ---- the scheduler ---------------------------------------------------------------------------------------------


def sched(num_slots=4, budget=64, chunk=32, copy=True) -> Scheduler:
    return Scheduler(SchedulerConfig(num_slots=num_slots, max_waiting=100, max_step_tokens=budget,
                                     prefill_chunk=chunk, prefix_block=B, prefix_copy=copy))


def gen(rid, prompt, max_new=3, **kw):
    return Sequence(rid, list(prompt), SamplingParams(max_new_tokens=max_new, **kw))


def drain(s):
    outs = []
    while s.has_work():
        outs.append(run_step(s))
    return outs


PROMPT = list(range(1000, 1040))  # 40 tokens: 2 whole blocks and 8 more


def test_a_finished_requests_slot_is_taken_again_with_nothing_to_copy():
    s = sched()
    s.add([gen("a", PROMPT)])
    drain(s)
    s.add([gen("filler", range(5))])  # takes the least recently freed slot, not a's
    out = run_step(s)
    b = gen("b", PROMPT + [1, 2])
    s.add([b])
    out = run_step(s)
    assert b.slot == 0 and b.num_cached_prompt == 40 and out.copies == []
    assert [(c.start, c.end) for c in out.prefill if c.seq is b] == [(40, 42)]
    assert (out.cache_queries, out.cache_hits) == (42, 40)


def test_a_running_requests_prefix_is_copied_into_a_free_slot():
    s = sched()
    a = gen("a", PROMPT, max_new=50)
    s.add([a])
    run_step(s)
    run_step(s)
    assert a.status is SequenceStatus.RUNNING
    b = gen("b", PROMPT[:35] + [7, 7, 7])
    s.add([b])
    out = run_step(s)
    assert b.slot != a.slot and out.copies == [(a.slot, b.slot, 35)]
    assert [(c.start, c.end) for c in out.prefill] == [(35, 38)]
    # without copies (a session that cannot copy) a running request's prefix is not shared
    s = sched(copy=False)
    a = gen("a", PROMPT, max_new=50)
    s.add([a])
    run_step(s)
    b = gen("b", PROMPT)
    s.add([b])
    out = run_step(s)
    assert out.copies == [] and b.num_cached_prompt == 0 and out.prefill[-1].start == 0


def test_a_prompt_that_is_a_cached_prompt_still_computes_its_last_token():
    s = sched()
    s.add([gen("a", PROMPT[:32])])
    drain(s)
    b = gen("b", PROMPT[:32])
    s.add([b])
    out = run_step(s)
    assert b.num_cached_prompt == 31 and [(c.start, c.end) for c in out.prefill] == [(31, 32)]


def test_generated_tokens_are_cached_too():
    # multi-turn: the next prompt is the previous prompt, its answer and more
    s = sched()
    a = gen("a", PROMPT, max_new=30)
    s.add([a])
    drain(s)
    history = a.prompt_ids + a.output_ids  # 70 tokens: positions 0..68 have K/V (the last one was never fed)
    b = gen("b", history + [5, 6])
    s.add([b])
    run_step(s)
    assert b.slot == a.slot and b.num_cached_prompt == 69


def test_prompts_that_want_every_positions_logits_neither_hit_nor_count():
    s = sched()
    s.add([gen("a", PROMPT)])
    drain(s)
    for q in (gen("p", PROMPT, prompt_logprobs=0), gen("score", PROMPT, max_new=0, prompt_logprobs=0)):
        s.add([q])
        out = run_step(s)
        assert q.num_cached_prompt == 0 and out.prefill[0].start == 0 and out.cache_queries == 0
        drain(s)
    # ... but what they computed is cached for the next one
    c = gen("c", PROMPT)
    s.add([c])
    run_step(s)
    assert c.num_cached_prompt == 39


def test_a_failed_requests_rows_and_a_failed_copys_target_are_forgotten():
    s = sched()
    a = gen("a", PROMPT, max_new=50)
    s.add([a])
    run_step(s)
    s.finish(a, FinishReason.ERROR, 0.0)
    b = gen("b", PROMPT)
    s.add([b])
    run_step(s)
    assert b.num_cached_prompt == 0
    s.forget(b.slot)
    assert s.prefix_cache.held(b.slot) == 0


def test_the_least_recently_freed_slot_is_evicted_first():
    s = sched(num_slots=2)
    p1, p2 = list(range(100, 140)), list(range(200, 240))
    s.add([gen("a", p1, max_new=1)])
    drain(s)  # slot 0 holds p1
    s.add([gen("b", p2, max_new=1)])
    drain(s)  # slot 1 holds p2 (slot 1 was the least recently freed: never used)
    s.add([gen("c", p1 + [1])])
    run_step(s)  # reuses slot 0 (hit)
    drain(s)
    s.add([gen("d", list(range(300, 340)))])
    drain(s)  # evicts slot 1 (p2, freed before slot 0 was freed again)
    e, f = gen("e", p1 + [2]), gen("f", p2 + [2])
    s.add([e, f])
    run_step(s)
    assert e.num_cached_prompt == 40 and f.num_cached_prompt == 0


def test_random_workloads_with_shared_prefixes_read_only_what_was_written():
    # The scheduler's claims against a model of the slots' contents: a hit's rows are there (in its own slot or
    # copied from one that has them), whatever the order of arrivals, finishes and aborts.
    rng = random.Random(0)
    s = sched(num_slots=3, budget=40, chunk=16)
    content = {slot: [] for slot in range(3)}  # tokens whose K/V each slot holds, by position
    bases = [[rng.randrange(1, 50) for _ in range(rng.choice((16, 33, 48)))] for _ in range(3)]
    n = hits = 0
    for step in range(400):
        if rng.random() < 0.4:
            prompt = rng.choice(bases)[: rng.randint(1, 48)] + [rng.randrange(50, 60) for _ in range(rng.randint(0, 9))]
            s.add([gen(f"r{n}", prompt, max_new=rng.randint(1, 20), prompt_logprobs=rng.choice((None, None, 0)))])
            n += 1
        if rng.random() < 0.05 and s.running:
            s.finish(rng.choice(s.running), FinishReason.ABORTED, 0.0)
        out = s.schedule(0.0)
        hits += out.cache_hits
        for src, dst, k in out.copies:
            assert len(content[src]) >= k, "copying rows that were never written"
            content[dst] = content[src][:k] + content[dst][k:]
        for c in out.prefill:
            q = c.seq
            assert content[q.slot][: c.start] == q.prompt_ids[: c.start], "a prompt continued over other tokens"
            content[q.slot] = q.prompt_ids[: c.end] + content[q.slot][c.end:]
        for q in out.decode:
            toks = q.prompt_ids + q.output_ids
            assert content[q.slot][: q.num_cached] == toks[: q.num_cached]
            content[q.slot] = toks + content[q.slot][len(toks):]
        for c in out.prefill:
            s.prefilled(c)
            if c.is_last and not c.seq.is_finished:
                c.seq.output_ids.append(rng.randrange(1, 60))
                if c.seq.num_output >= c.seq.params.max_new_tokens:
                    s.finish(c.seq, FinishReason.LENGTH, 0.0)
        for q in out.decode:
            if q.is_finished:
                continue
            s.decoded(q)
            q.output_ids.append(rng.randrange(1, 60))
            if q.num_output >= q.params.max_new_tokens:
                s.finish(q, FinishReason.LENGTH, 0.0)
    assert n > 100 and hits > 0


# ---- the engine, fake session ----------------------------------------------------------------------------------


def test_engine_outputs_are_the_same_with_and_without_the_cache():
    from serving.engine.core import EngineCore
    from serving.engine.model_runner import ModelRunner
    from serving_helpers import FakeSession, fake_greedy

    rng = random.Random(1)
    shared = [rng.randrange(1, 200) for _ in range(60)]
    work = [(shared[: rng.randint(10, 60)] + [rng.randrange(1, 200) for _ in range(rng.randint(0, 8))],
             rng.randint(1, 24)) for _ in range(40)]

    def run(block):
        sess = FakeSession(4, 128)
        cfg = SchedulerConfig(num_slots=4, max_waiting=100, max_step_tokens=48, prefill_chunk=16,
                              prefix_block=block, prefix_copy=True)
        core = EngineCore(ModelRunner(sess, eos_token_id=0), cfg, lambda i: bytes([i % 256]))
        outs = {}

        def step():
            for out in core.step():
                outs.setdefault(out.request_id, []).extend(t.id for t in out.tokens)
                if out.final is not None:
                    outs[out.request_id + ".cached"] = out.final.cached_tokens

        for i, (prompt, n) in enumerate(work):
            core.add([Sequence(f"r{i}", prompt, SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True))])
            if i % 3 == 0:
                step()
        while core.has_work():
            step()
        return outs, sess

    with_cache, sess = run(B)
    without, _ = run(0)
    for i, (prompt, n) in enumerate(work):
        assert with_cache[f"r{i}"] == without[f"r{i}"] == fake_greedy(prompt, n, stop_at_eos=False)
    assert sum(with_cache[f"r{i}.cached"] for i in range(len(work))) > 0 and sess.copies
    assert all(without[f"r{i}.cached"] == 0 for i in range(len(work)))


# ---- a real model: the same bits with a hit ---------------------------------------------------------------------


def test_a_hit_gives_the_bits_of_computing_the_prompt():
    pytest.importorskip("torch")
    from model import InferenceSession
    from model.runtime import set_device
    from model_helpers import hf_model, our_model_from_hf
    from serving.engine.core import EngineCore
    from serving.engine.model_runner import ModelRunner

    set_device("CPU")
    sess = InferenceSession(our_model_from_hf(hf_model(seed=4)), num_slots=4, max_seq_len=128,
                            chunk_buckets=(1, 8, 32, 48), packed_weights=True)
    assert sess.can_copy_prefix
    rng = np.random.default_rng(0)
    shared = rng.integers(1, 1000, 50).tolist()
    prompts = [shared + rng.integers(1, 1000, 5).tolist() for _ in range(3)] + [shared[:40]]

    def run(block):
        cfg = SchedulerConfig(num_slots=4, max_waiting=100, max_step_tokens=48, prefill_chunk=32,
                              prefix_block=block, prefix_copy=True)
        core = EngineCore(ModelRunner(sess, eos_token_id=0), cfg, lambda i: bytes([i % 256]))
        params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)
        got, cached = {}, {}
        core.add([Sequence("first", prompts[0], params)])  # computes the prefix ...
        core.step()
        core.step()
        # ... which the next ones copy while it runs, or take once it is done
        core.add([Sequence(f"p{i}", p, params) for i, p in enumerate(prompts[1:])])
        while core.has_work():
            for out in core.step():
                got.setdefault(out.request_id, []).extend((t.id, t.logprob, tuple(t.top)) for t in out.tokens)
                if out.final is not None:
                    cached[out.request_id] = out.final.cached_tokens
        return got, cached

    ref, ref_cached = run(0)
    got, cached = run(B)
    assert got == ref  # bitwise: token ids and float logprobs compared with ==
    assert set(ref_cached.values()) == {0} and cached["p0"] == 50 and cached["p2"] == 39
