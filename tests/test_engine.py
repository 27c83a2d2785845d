"""The engine thread + async streams against the numpy fake session (no MindSpore)."""

import asyncio
import dataclasses

import numpy as np
import pytest

from model import sampler
from serving.config import EngineConfig
from serving.engine import AsyncEngine, EngineState, FinishReason, ModelRunner
from serving.engine.core import EngineCore
from serving.engine.scheduler import SchedulerConfig
from serving.engine.sequence import Sequence
from serving.errors import EngineUnavailableError, OverloadedError, QueueTimeoutError, RequestFailedError
from serving.sampling_params import SamplingParams
from serving_helpers import EOS, FakeSession, FakeTokenizer, fake_greedy, fake_logits, fake_parts

TOK = FakeTokenizer()
CONFIG = EngineConfig(max_batch_size=4, max_queue=8, max_total_tokens=128, prefill_chunk=16)


def run_engine(test, config=CONFIG, **session_kwargs):
    """Run `await test(engine, box)` with a started fake engine, then shut it down."""

    async def main():
        loader, box = fake_parts(config, **session_kwargs)
        engine = AsyncEngine(loader, config)
        engine.start()
        await engine.wait_ready(10)
        try:
            return await asyncio.wait_for(test(engine, box), 60)
        finally:
            await engine.shutdown(5)

    return asyncio.run(main())


def greedy(n, **kw):
    return SamplingParams(max_new_tokens=n, temperature=0.0, **kw)


async def generate(engine, prompt, params):
    outs = await engine.add_request(TOK.encode(prompt), params).collect()
    return outs


def test_greedy_matches_the_reference_and_reports_a_final():
    async def t(engine, box):
        outs = await generate(engine, "Hello world, this is a prompt longer than one chunk", greedy(12))
        ids = [tok.id for o in outs for tok in o.tokens]
        assert ids == fake_greedy(TOK.encode("Hello world, this is a prompt longer than one chunk"), 12)
        final = outs[-1].final
        assert final.finish_reason is FinishReason.LENGTH and final.generated_tokens == 12
        assert final.text == "".join(o.text for o in outs) == TOK.decode(ids)
        assert final.seed is None and final.prompt_tokens == 51

    run_engine(t)


def test_concurrent_requests_share_passes_and_match_alone():
    # Prompts longer than one 16-token chunk, of different lengths: passes mix first and later chunks and decode
    # tokens, within the step's token budget.
    prompts = [f"prompt number {i} " * (i + 1) for i in range(6)]
    config = dataclasses.replace(CONFIG, max_batched_tokens=32)

    async def t(engine, box):
        results = await asyncio.gather(*(generate(engine, p, greedy(20)) for p in prompts))
        for p, outs in zip(prompts, results):
            assert [x.id for o in outs for x in o.tokens] == fake_greedy(TOK.encode(p), 20)
        calls = box["session"].calls
        assert any(seqs > 1 for _, seqs, _ in calls)  # several sequences in one pass
        assert all(n <= config.max_step_tokens for n, _, _ in calls)
        assert all(seqs <= 4 for _, seqs, _ in calls)

    run_engine(t, config=config)


def test_a_step_runs_prefill_and_decode_as_one_pass():
    session = FakeSession(4, 128)
    core = EngineCore(ModelRunner(session, eos_token_id=EOS),
                      SchedulerConfig(num_slots=4, max_waiting=4, max_step_tokens=16, prefill_chunk=16),
                      TOK.token_bytes)
    a, b = TOK.encode("first"), TOK.encode("a second, longer prompt")
    core.add([Sequence("a", a, greedy(6))])
    outs = core.step()  # a's prefill alone
    core.add([Sequence("b", b, greedy(4))])
    sched = core.schedule()
    # b's first chunk leaves room in the 16-token pass for a's decode token.
    assert [(c.seq.request_id, c.end - c.start) for c in sched.prefill] == [("b", 15)]
    assert [s.request_id for s in sched.decode] == ["a"]
    outs += core.postprocess(sched, core.execute(sched))
    assert session.calls[-1][:2] == (16, 2) and len(session.calls) == 2  # one pass for both
    while core.has_work():
        outs += core.step()
    for rid, prompt, n in (("a", a, 6), ("b", b, 4)):
        assert [t.id for o in outs if o.request_id == rid for t in o.tokens] == fake_greedy(prompt, n)


def test_a_request_that_ends_after_scheduling_is_left_out_of_the_pass():
    session = FakeSession(4, 128)
    core = EngineCore(ModelRunner(session, eos_token_id=EOS),
                      SchedulerConfig(num_slots=4, max_waiting=4, max_step_tokens=16, prefill_chunk=16),
                      TOK.token_bytes)
    core.add([Sequence("a", TOK.encode("first"), greedy(5)), Sequence("b", TOK.encode("second"), greedy(5))])
    core.step()
    sched = core.schedule()
    assert [s.request_id for s in sched.decode] == ["a", "b"]
    core.abort("a")
    res = core.execute(sched)
    assert session.calls[-1][:2] == (1, 1)  # b alone
    assert [o.request_id for o in core.postprocess(sched, res)] == ["b"]


def test_eos_stops_unless_ignored():
    prompt = "x"
    ref = fake_greedy(TOK.encode(prompt), 60, eos_every=7)
    assert EOS in ref  # the fake model does emit EOS for this prompt

    async def t(engine, box):
        outs = await generate(engine, prompt, greedy(60))
        ids = [x.id for o in outs for x in o.tokens]
        assert ids == ref and outs[-1].final.finish_reason is FinishReason.EOS
        assert outs[-1].tokens[-1].special and "<|endoftext|>" not in outs[-1].final.text
        outs = await generate(engine, prompt, greedy(len(ref) + 3, ignore_eos=True))
        assert outs[-1].final.finish_reason is FinishReason.LENGTH
        assert outs[-1].final.generated_tokens == len(ref) + 3

    run_engine(t, eos_every=7)


def test_stop_strings_are_cut_and_never_streamed():
    prompt = "Tell me"
    full = TOK.decode(fake_greedy(TOK.encode(prompt), 40))
    stop = full[10:13]
    cut = full[: full.index(stop)]

    async def t(engine, box):
        outs = await generate(engine, prompt, greedy(40, stop=(stop, "never-there")))
        streamed = "".join(o.text for o in outs)
        assert streamed == cut == outs[-1].final.text
        assert outs[-1].final.finish_reason is FinishReason.STOP
        # Held back: no intermediate event released text that later turned out to be the stop string.
        acc = ""
        for o in outs:
            acc += o.text
            assert stop not in acc

    run_engine(t)


def test_stop_token_ids_and_min_new_tokens():
    prompt = "abc"
    ref = fake_greedy(TOK.encode(prompt), 30)

    async def t(engine, box):
        stop_id = ref[5]
        outs = await generate(engine, prompt, greedy(30, stop_token_ids=(stop_id,)))
        ids = [x.id for o in outs for x in o.tokens]
        assert ids == ref[: ref.index(stop_id) + 1]
        assert outs[-1].final.finish_reason is FinishReason.STOP_TOKEN

    run_engine(t)


def test_seeded_sampling_is_reproducible_whatever_else_runs():
    params = SamplingParams(max_new_tokens=15, temperature=1.5, top_k=20, seed=1234)

    async def t(engine, box):
        alone = await generate(engine, "seeded", params)
        noise = [generate(engine, f"other {i}", SamplingParams(max_new_tokens=25, temperature=2.0)) for i in range(3)]
        together, *_ = await asyncio.gather(generate(engine, "seeded", params), *noise)
        ids = lambda outs: [x.id for o in outs for x in o.tokens]  # noqa: E731
        assert ids(alone) == ids(together)
        assert alone[-1].final.seed == 1234
        unseeded = await generate(engine, "seeded", SamplingParams(max_new_tokens=3, temperature=1.0))
        assert isinstance(unseeded[-1].final.seed, int)

    run_engine(t)


def test_prompt_logprobs_across_chunks_and_score():
    prompt = "a prompt of more than sixteen bytes, so prefill takes several chunks"
    ids = TOK.encode(prompt)
    want = [None] + [float(sampler.log_softmax(fake_logits(ids[: i + 1])[None])[0, ids[i + 1]])
                     for i in range(len(ids) - 1)]

    async def t(engine, box):
        outs = await generate(engine, prompt, greedy(2, prompt_logprobs=2))
        got = [x.logprob for x in outs[0].prompt]
        assert [x.id for x in outs[0].prompt] == ids
        assert got[0] is None and np.allclose(got[1:], want[1:], atol=1e-5)
        assert all(len(x.top) == 2 for x in outs[0].prompt[1:])
        scored = await engine.score([ids, ids[:3], [5]])
        assert np.allclose([x.logprob for x in scored[0][1:]], want[1:], atol=1e-5)
        assert [x.logprob for x in scored[2]] == [None]
        calls = box["session"].calls
        assert any(b > 1 for _, b, all_logits in calls if all_logits)  # several texts in one scoring pass

    run_engine(t)


def test_closing_a_stream_aborts_and_frees_the_slot_for_a_waiting_request():
    config = dataclasses.replace(CONFIG, max_batch_size=1)

    async def t(engine, box):
        first = engine.add_request(TOK.encode("first"), greedy(100))
        second = engine.add_request(TOK.encode("second"), greedy(3))
        it = first.__aiter__()
        await it.__anext__()
        assert engine.num_waiting_and_running() == (1, 1)
        await it.aclose()  # the client went away
        outs = await asyncio.wait_for(second.collect(), 5)
        assert outs[-1].final.generated_tokens == 3

    run_engine(t, config=config, delay=0.01)


def test_cancelling_a_consumer_task_aborts_the_request():
    async def t(engine, box):
        stream = engine.add_request(TOK.encode("cancel me"), greedy(100))

        async def consume():
            async for _ in stream:
                pass

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if engine.num_waiting_and_running() == (0, 0):
                break
            await asyncio.sleep(0.01)
        assert engine.num_waiting_and_running() == (0, 0)

    run_engine(t, delay=0.01)


def test_full_queue_is_overloaded_and_queue_timeout_fails_waiting_requests():
    config = dataclasses.replace(CONFIG, max_batch_size=1, max_queue=2, queue_timeout=0.3)

    async def t(engine, box):
        running = engine.add_request(TOK.encode("long"), greedy(100))
        it = running.__aiter__()  # keep a reference: a collected iterator aborts its request
        await it.__anext__()
        waiting = [engine.add_request(TOK.encode(f"w{i}"), greedy(2)) for i in range(2)]
        with pytest.raises(OverloadedError):
            engine.add_request(TOK.encode("one too many"), greedy(2))
        with pytest.raises(QueueTimeoutError):
            await waiting[0].collect()
        running.abort()

    run_engine(t, config=config, delay=0.02)


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving():
    calls = {"n": 0}

    def fail(ids, pos):
        if 66 in ids and calls["n"] == 0:  # the first step containing "B" fails once
            calls["n"] += 1
            raise RuntimeError("injected")

    async def t(engine, box):
        with pytest.raises(RequestFailedError, match="injected"):
            await generate(engine, "BBB", greedy(3))
        assert engine.state is EngineState.READY
        outs = await generate(engine, "AAA", greedy(3))
        assert outs[-1].final.generated_tokens == 3

    run_engine(t, fail=fail)


def test_repeated_failures_kill_the_engine_and_fail_everything():
    def fail(ids, pos):
        raise RuntimeError("broken device")

    async def t(engine, box):
        told = []
        engine.on_dead = told.append  # the server process exits on this (tests/test_server_process.py)
        for _ in range(3):
            with pytest.raises((RequestFailedError, EngineUnavailableError)):
                await generate(engine, "x", greedy(3))
        for _ in range(100):
            if engine.state is EngineState.DEAD and told:
                break
            await asyncio.sleep(0.01)
        assert engine.state is EngineState.DEAD and "consecutive" in engine.dead_reason
        assert told == [engine.dead_reason]
        with pytest.raises(EngineUnavailableError):
            engine.add_request([1], greedy(1))

    run_engine(t, fail=fail)


def test_a_model_that_fails_to_load_reports_dead():
    async def main():
        def loader():
            raise FileNotFoundError("no weights")

        engine = AsyncEngine(loader, CONFIG)
        engine.start()
        with pytest.raises(EngineUnavailableError, match="no weights"):
            await engine.wait_ready(5)
        assert engine.state is EngineState.DEAD

    asyncio.run(main())


def test_admission_limits():
    async def t(engine, box):
        from serving.errors import ValidationError

        with pytest.raises(ValidationError, match="<= 128"):
            engine.add_request([1] * 100, greedy(29))
        with pytest.raises(ValidationError):
            engine.add_request([], greedy(1))
        with pytest.raises(ValidationError):
            engine.add_request([300], greedy(1))
        engine.add_request([1] * 100, greedy(28)).abort()

    run_engine(t)


def test_shutdown_lets_running_requests_finish_then_refuses():
    async def main():
        loader, _ = fake_parts(CONFIG, delay=0.01)
        engine = AsyncEngine(loader, CONFIG)
        engine.start()
        await engine.wait_ready(5)
        stream = engine.add_request(TOK.encode("finish me"), greedy(10))
        collecting = asyncio.ensure_future(stream.collect())
        await asyncio.sleep(0.02)
        await engine.shutdown(5)
        outs = await collecting
        assert outs[-1].final.generated_tokens == 10
        with pytest.raises(EngineUnavailableError):
            engine.add_request([1], greedy(1))

    asyncio.run(main())


def test_step_shapes_cover_every_token_and_row_bucket():
    from serving.engine.model_runner import step_shapes

    class Session:
        chunk_buckets = (1, 2, 4, 8, 16, 32)
        logits_row_buckets = (1, 4, 16)

    shapes = step_shapes(Session())
    assert (1, 1) in shapes and (1, 4) not in shapes  # one token: one row
    assert (8, 16) in shapes  # 5-8 rows (one token each) pad to 16 logits rows
    assert (4, 16) not in shapes and (32, 16) in shapes
    assert all((t, None) in shapes for t in Session.chunk_buckets)  # prompt logprobs: every position


def test_background_work_waits_for_the_engine_to_be_idle():
    # The loader's background work (the packed-weights cache's writing) starts once the engine serves and gets a
    # function that returns once nothing has run for a while, and waits while a request runs (until it has ended,
    # or the timeout).
    import threading
    import time

    async def main():
        loader, _ = fake_parts(CONFIG, delay=0.02)
        got = {}

        def load():
            parts = loader()
            parts.background = lambda idle: got.setdefault("idle", idle)
            return parts

        engine = AsyncEngine(load, CONFIG)
        engine.start()
        await engine.wait_ready(5)
        idle = got["idle"]
        t0 = time.monotonic()
        idle()
        assert time.monotonic() - t0 < 1.5  # nothing runs: once it has been quiet for half a second
        t0 = time.monotonic()
        idle()
        assert time.monotonic() - t0 < 0.2  # still quiet: at once
        stream = engine.add_request(TOK.encode("keep the engine busy"), greedy(30))  # ~30 passes of 20 ms
        waited = {}

        def wait():
            t = time.monotonic()
            idle()
            waited["s"], waited["busy"] = time.monotonic() - t, engine.num_waiting_and_running() != (0, 0)

        th = threading.Thread(target=wait)
        th.start()
        outs = await stream.collect()
        await asyncio.to_thread(th.join, 10)
        assert outs[-1].final.generated_tokens == 30
        assert waited["s"] > 0.2 and not waited["busy"]  # returned once the request had ended
        t0 = time.monotonic()
        engine.add_request(TOK.encode("busy again"), greedy(100))  # ~2 s of passes
        await asyncio.sleep(0.05)
        await asyncio.to_thread(engine.wait_idle, 0.3)  # a timeout bounds the wait under constant load
        assert 0.3 <= time.monotonic() - t0 < 2
        await engine.shutdown(0.1)

    asyncio.run(main())
