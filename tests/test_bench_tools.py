"""The benchmark suite's pure helpers (bench/benchlib.py, bench/loadgen.py) and run_all's row building: no model,
no server, no llama.cpp build; a fake SSE transport stands in for the network."""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_prefix  # noqa: E402
import benchlib  # noqa: E402
import llama_cpp  # noqa: E402
import loadgen  # noqa: E402
import run_all  # noqa: E402
from benchlib import Row, Target  # noqa: E402


# ---- statistics and the prompt mix ----------------------------------------------------------------------------


@pytest.mark.parametrize("values", [[3.0], [1.0, 2.0], [5, 1, 4, 2, 3], list(np.random.default_rng(0).random(101))])
@pytest.mark.parametrize("q", [0, 1, 50, 90, 99, 100])
def test_percentile_matches_numpy(values, q):
    assert benchlib.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edge_cases():
    assert benchlib.percentile([], 50) is None
    with pytest.raises(ValueError):
        benchlib.percentile([1.0], 101)


def test_draw_lengths_seeded_bounded_log_uniform():
    a = benchlib.draw_lengths(2000, 16, 512, seed=3)
    assert a == benchlib.draw_lengths(2000, 16, 512, seed=3)
    assert a != benchlib.draw_lengths(2000, 16, 512, seed=4)
    assert min(a) >= 16 and max(a) <= 512
    # log-uniform: median near the geometric mean sqrt(16 * 512) ~ 90.5, as many below 64 as above 128
    assert 80 <= benchlib.percentile(a, 50) <= 100
    below, above = sum(x < 64 for x in a), sum(x > 128 for x in a)
    assert abs(below - above) < 0.1 * len(a)
    with pytest.raises(ValueError):
        benchlib.draw_lengths(1, 0, 10, seed=0)


def test_make_prompts_windows_of_the_text():
    ids = list(range(1000))
    lengths = [16, 100, 512, 1000]
    windows = benchlib.token_windows(len(ids), lengths, seed=0)
    assert [b - a for a, b in windows] == lengths
    assert all(0 <= a and b <= len(ids) for a, b in windows)
    prompts = benchlib.make_prompts(ids, lengths, 0, lambda t: ",".join(map(str, t)))
    assert [len(p.split(",")) for p in prompts] == lengths
    with pytest.raises(ValueError):
        benchlib.token_windows(10, [11], seed=0)


# ---- rows, targets, the table ---------------------------------------------------------------------------------


def test_judge_says_by_how_much_a_target_is_missed():
    assert benchlib.judge(0.7, ">=", 0.6) == "yes"
    assert benchlib.judge(0.45, ">=", 0.6) == "NO, 25% short"
    assert benchlib.judge(1.0, "<=", 1.0) == "yes"
    assert benchlib.judge(1.23, "<=", 1.0) == "NO, 23% over"
    assert benchlib.judge(2000.0, "<", 2000.0) == "NO, 0% over"
    assert benchlib.judge(1999.0, "<", 2000.0) == "yes"


def test_row_ratio_and_verdict():
    r = Row("s", "prefill", 300.0, 600.0, target=Target(">= 0.60x", ">=", 0.6))
    assert r.ratio == pytest.approx(0.5)
    assert r.verdict == "NO, 17% short"
    assert Row("s", "x", 1.0, None).ratio is None
    assert Row("s", "x", 1.0, None, target=Target("t", ">=", 1.0)).verdict == "not measured"
    assert Row("s", "rss", 3.0, target=Target("<= 4 GB", "<=", 4.0, "ours")).verdict == "yes"
    assert Row("s", "x").verdict == ""
    e = benchlib.error_row("s", "model", "Traceback...\nRuntimeError: boom\n")
    assert e.verdict == "ERROR" and e.error == "RuntimeError: boom"
    d = r.to_dict()
    assert d["verdict"] == "NO, 17% short" and d["target"]["threshold"] == 0.6
    json.dumps(d)
    with pytest.raises(ValueError):
        Target("t", "==", 1.0)


def test_tables_have_every_row_and_section():
    rows = [
        Row("model", "decode b=1", 50.0, 40.0, ours_text="50.0 ms", target=Target("<= 1.00x", "<=", 1.0)),
        Row("model", "prefill 1x128", 600.0, 700.0, note="a note"),
        benchlib.error_row("training", "train", "exit code 1: boom"),
    ]
    text = benchlib.format_table(rows)
    assert "[model]" in text and "[training]" in text
    assert "NO, 25% over" in text and "1.25x" in text and "error: exit code 1: boom" in text and "a note" in text
    md = benchlib.format_markdown(rows).splitlines()
    assert all(line.count(" | ") + 2 == md[0].count("|") or line.startswith("| **") or line.startswith("|---")
               for line in md)
    assert any("ERROR" in line for line in md)


def test_fmt():
    assert benchlib.fmt(None) == "-"
    assert benchlib.fmt(1234.4, "tok/s") == "1,234 tok/s"
    assert benchlib.fmt(12.345, "ms") == "12.3 ms"
    assert benchlib.fmt(0.8754, "GB") == "0.875 GB"
    assert benchlib.fmt(5.0, digits=2) == "5.00"


def test_write_atomic_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "out.json"
    benchlib.write_json(path, {"a": 1})
    benchlib.write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert os.listdir(path.parent) == ["out.json"]
    benchlib.write_json(None, {"ignored": True})


ZEN3_FLAGS = "fpu vme sse sse2 ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes xsave avx f16c rdrand avx2 bmi2 sha_ni"
SPR_FLAGS = ZEN3_FLAGS + " avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8"


def test_cpu_summary_names_the_model_and_its_vector_extensions():
    zen3 = f"processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\n" \
           f"flags\t\t: {ZEN3_FLAGS}\n\nprocessor\t: 1\nmodel name\t: other\nflags\t\t: avx512f\n"
    assert benchlib.cpu_summary(zen3) == "AMD EPYC (family 25, model 1); AVX2, FMA, F16C; no AVX-512, no AMX"
    assert "avx512f" not in benchlib.cpu_flags(zen3)  # the first processor's flags only
    spr = f"model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: {SPR_FLAGS}\n"
    assert benchlib.cpu_summary(spr) == ("Intel(R) Xeon(R) Platinum 8480+; AVX2, FMA, F16C, AVX-512F, AVX-512 VNNI, "
                                         "AVX-512 BF16, AMX, AMX-BF16, AMX-INT8")
    graviton = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes asimddp i8mm bf16\nCPU implementer\t: 0x41\n" \
               "CPU part\t: 0xd40\n"
    assert benchlib.cpu_summary(graviton) == \
        "ARM CPU (implementer 0x41, part 0xd40); NEON, dot product, I8MM, BF16; no SVE"
    assert "unknown" in benchlib.cpu_summary("")


def test_model_sizes():
    assert benchlib.gpt2_param_count(12, 768, 50257, 1024) == 124_439_808
    # the KV budget: 2 * n_layer * 32 slots * 1024 positions * n_embd * 4 bytes
    assert benchlib.kv_cache_bytes(12, 768, 32, 1024) == 2 * 12 * 32 * 1024 * 768 * 4


# ---- the load generator ---------------------------------------------------------------------------------------


def _sse_transport(tokens: int, delay: float) -> httpx.MockTransport:
    async def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert body["parameters"]["max_new_tokens"] == tokens

        async def events():
            for i in range(1, tokens + 1):
                await asyncio.sleep(delay)
                ev = {"index": i, "token": {"id": i, "text": "x", "logprob": -1.0, "special": False},
                      "generated_text": "x" * tokens if i == tokens else None, "details": None}
                yield f"data:{json.dumps(ev)}\n\n".encode()

        return httpx.Response(200, content=events(), headers={"content-type": "text/event-stream"})

    return httpx.MockTransport(handler)


def test_closed_loop_counts_every_token():
    prompts = [f"p{i}" for i in range(6)]
    results, wall = asyncio.run(loadgen.closed_loop("http://fake", prompts, clients=3, per_client=2, new_tokens=4,
                                                    time_limit=30, transport=_sse_transport(4, 0.005)))
    assert sorted(r.prompt_index for r in results) == list(range(6))
    s = loadgen.summarize(results, wall)
    assert s["requests"] == 6 and s["finished"] == 6 and s["tokens"] == 24 and s["errors"] == 0
    assert s["aggregate_tok_s"] == pytest.approx(24 / wall)
    assert 3 <= s["itl_ms_p50"] < 1000 and s["ttft_ms_p50"] >= 3
    # closed loop: each client's second request starts after its first has finished
    by_client = {}
    for r in results:
        by_client.setdefault(r.prompt_index // 2, []).append(r)
    for first, second in by_client.values():
        assert second.sent >= first.token_times[-1]
        assert first.first and not second.first
    # steady state: the second requests only
    assert s["steady_requests"] == 3
    seconds = sorted(1000 * r.ttft for r in results if not r.first)
    assert seconds[0] <= s["steady_ttft_ms_p50"] <= s["steady_ttft_ms_p99"] <= seconds[-1]


def test_closed_loop_stops_at_the_time_limit():
    prompts = ["p"] * 4
    results, wall = asyncio.run(loadgen.closed_loop("http://fake", prompts, clients=2, per_client=2, new_tokens=50,
                                                    time_limit=0.3, transport=_sse_transport(50, 0.02)))
    s = loadgen.summarize(results, wall)
    assert s["finished"] == 0 and s["unfinished"] == 2 and s["requests"] == 2
    assert 0 < s["tokens"] < 100
    assert 0.3 <= wall < 2.0


def test_closed_loop_reports_http_errors():
    transport = httpx.MockTransport(lambda request: httpx.Response(429, json={"error": "busy"}))
    results, wall = asyncio.run(loadgen.closed_loop("http://fake", ["a", "b"], clients=1, per_client=2,
                                                    new_tokens=4, time_limit=10, transport=transport))
    s = loadgen.summarize(results, wall)
    assert s["errors"] == 2 and s["tokens"] == 0 and "HTTP 429" in s["first_errors"][0]
    assert s["ttft_ms_p50"] is None
    with pytest.raises(ValueError):
        asyncio.run(loadgen.closed_loop("http://fake", ["a"], clients=2, per_client=1, new_tokens=1, time_limit=1))


def test_stream_result_gaps():
    r = loadgen.StreamResult(0, sent=1.0, token_times=[1.5, 1.6, 1.9])
    assert r.ttft == pytest.approx(0.5)
    assert r.gaps == pytest.approx([0.1, 0.3])
    assert loadgen.StreamResult(0).ttft is None


def _openai_transport(tokens: int, *, held_back: set[int], running_count: bool) -> httpx.MockTransport:
    """An OpenAI completions stream of `tokens` tokens as llama-server sends it: the text of the tokens in
    `held_back` (an incomplete UTF-8 character) goes out with the next token's event, the last event carries
    finish_reason and usage; with `running_count`, every event has `timings.predicted_n`."""

    async def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/completions"
        body = json.loads(request.content)
        assert body["max_tokens"] == tokens and body["stream"] and body["temperature"] == 0.0
        # as bench_serving asks llama-server: the same number of tokens as ours, counted by the server
        assert body["ignore_eos"] is True and body["timings_per_token"] is True

        async def events():
            for i in range(1, tokens + 1):
                if i in held_back:
                    continue
                ev = {"choices": [{"text": "x", "index": 0, "finish_reason": None}]}
                if running_count:
                    ev["timings"] = {"predicted_n": i}
                yield f"data: {json.dumps(ev)}\n\n".encode()
            final = {"choices": [{"text": "", "index": 0, "finish_reason": "length"}],
                     "usage": {"completion_tokens": tokens, "prompt_tokens": 3}}
            yield f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n".encode()

        return httpx.Response(200, content=events(), headers={"content-type": "text/event-stream"})

    return httpx.MockTransport(handler)


@pytest.mark.parametrize("running_count", [True, False])
def test_openai_stream_counts_tokens_not_events(running_count):
    # Token 3's text comes with token 4's event; token 8, the last, is never sent as text (only counted in usage).
    import bench_serving

    client = bench_serving.CLIENTS["llama-cpp"]
    transport = _openai_transport(8, held_back={3, 8}, running_count=running_count)
    results, wall = asyncio.run(loadgen.closed_loop("http://fake", ["p"], clients=1, per_client=1, new_tokens=8,
                                                    time_limit=30, api=client.api, extra=client.extra,
                                                    keepalive=client.keepalive, transport=transport))
    (r,) = results
    assert r.finished and r.error is None and len(r.token_times) == 8
    s = loadgen.summarize(results, wall)
    assert s["tokens"] == 8 and s["finished"] == 1
    if running_count:  # tokens 3 and 4 arrived together
        assert r.token_times[2] == r.token_times[3]
    with pytest.raises(ValueError):
        loadgen.request("grpc", "p", 1)


# ---- run_all: rows from the benchmarks' JSON ------------------------------------------------------------------


def _level(n, tok_s, ttft_p99=500.0, steady_p99=400.0):
    return {"clients": n, "requests": 2 * n, "finished": 2 * n, "unfinished": 0, "errors": 0, "first_errors": [],
            "tokens": 256 * n, "wall_s": 1.0, "aggregate_tok_s": tok_s, "ttft_ms_p50": 100.0,
            "ttft_ms_p99": ttft_p99, "ttft_ms_max": ttft_p99, "itl_ms_p50": 50.0, "itl_ms_p99": 90.0,
            "itl_ms_mean": 55.0, "steady_requests": n, "steady_ttft_ms_p50": 90.0, "steady_ttft_ms_p99": steady_p99}


def _serving(levels, rss=None):
    return {"levels": levels, "peak_rss_bytes": rss, "requests_per_client": 2, "new_tokens": 128,
            "time_limit_s": 120.0, "prompt_mix": {"distribution": "log-uniform", "median": 90, "mean": 150},
            "budget": {"weights_bytes": 497_759_232, "kv_bytes": 2_415_919_104, "budget_bytes": 3_913_678_336,
                       "slots": 32, "positions": 1024, "n_layer": 12}, "errors": []}


def test_serving_rows_apply_the_targets_at_n16():
    raw = {
        "serving-ours": _serving([_level(1, 20.0), _level(16, 100.0, ttft_p99=2500.0)], rss=3.5e9),
        "serving-hf-static": _serving([_level(1, 25.0), _level(16, 150.0)], rss=2e9),
        "serving-hf-single": _serving([_level(1, 25.0), _level(16, 25.0)], rss=1e9),
    }
    rows = run_all.build_rows(raw, {}, list(raw))
    by = {r.what: r for r in rows}
    assert by["N=16 aggregate tok/s vs static batching"].verdict == "NO, 17% short"  # 0.667x of 0.8x
    assert by["N=16 aggregate tok/s vs one at a time"].verdict == "yes"  # 4x >= 3x
    assert by["N=16 TTFT p50 / p99 (ratio of p99)"].verdict == "NO, 25% over"
    assert "16 prompts sent at once (~2,400 tokens" in by["N=16 TTFT p50 / p99 (ratio of p99)"].note
    assert by["N=16 TTFT p50 / p99 in steady state (ratio of p99)"].verdict == "yes"  # 400 ms < 2,000 ms
    assert "N=1 TTFT p50 / p99 in steady state (ratio of p99)" not in by
    assert by["N=1 aggregate tok/s vs static batching"].target is None
    rss = next(r for r in rows if r.what.startswith("server peak RSS"))
    assert rss.verdict == "yes" and "3.91" in rss.target.text
    # Every reference is measured in this run: no llama.cpp rows without llama.cpp's results.
    assert not any("llama" in r.what or "llama" in r.ref_text for r in rows)


def test_llama_cpp_rows_sit_beside_ours():
    model = {"steps": 16, "decode": [{"batch": 1, "context": 128, "ours_ms": 20.0, "ref_ms": 25.0},
                                     {"batch": 8, "context": 128, "ours_ms": 40.0, "ref_ms": 50.0}],
             "prefill": [{"batch": 1, "tokens": 128, "ours_tok_s": 900.0, "ref_tok_s": 800.0},
                         {"batch": 8, "tokens": 128, "ours_tok_s": 2000.0, "ref_tok_s": 1500.0}], "score": []}
    llama = {"reps": 5, "threads": 2, "types": {"f32": {}, "q8_0": {}},
             "decode": [{"type": "f32", "context": 128, "depth": 0, "gen": 128, "ms_per_token": 16.0, "tok_s": 62.5},
                        {"type": "q8_0", "context": 128, "depth": 0, "gen": 128, "ms_per_token": 10.0, "tok_s": 100.0},
                        {"type": "f32", "context": 512, "depth": 384, "gen": 128, "ms_per_token": 18.0,
                         "tok_s": 55.6}],
             "prefill": [{"type": "f32", "batch": 1, "tokens": 128, "tok_s": 1200.0},
                         {"type": "q8_0", "batch": 1, "tokens": 128, "tok_s": 1500.0}]}
    serving = {"ours": _serving([_level(1, 20.0), _level(16, 100.0)]), "llama": _serving([_level(1, 40.0)])}
    serving["llama"].update(cmd=["/x/llama-server", "--parallel", "32"], startup_s=2.0)
    serving["ours"]["startup_s"] = 60.0
    raw = {"model": model, "llama-cpp-bench": llama, "serving-ours": serving["ours"],
           "serving-llama-cpp": serving["llama"]}
    rows = run_all.build_rows(raw, {}, list(raw))
    whats = [r.what for r in rows]
    # each beside the matching transformers row, in the order measured
    i = whats.index("decode b=1 ctx=128")
    assert whats[i + 1:i + 4] == ["decode b=1 ctx=128 vs llama.cpp f32", "decode b=1 ctx=128 vs llama.cpp q8_0",
                                  "decode b=8 ctx=128"]
    assert "decode b=1 ctx=512 vs llama.cpp f32" in whats  # no row of ours at 512: shown all the same
    i = whats.index("prefill 1x128")
    assert whats[i + 1:i + 4] == ["prefill 1x128 vs llama.cpp f32", "prefill 1x128 vs llama.cpp q8_0", "prefill 8x128"]
    by = {r.what: r for r in rows}
    assert by["decode b=1 ctx=128 vs llama.cpp q8_0"].ratio == pytest.approx(2.0)
    alone = by["decode b=1 ctx=512 vs llama.cpp f32"]
    assert alone.ours is None and alone.ratio is None and alone.ref == 18.0
    assert by["prefill 1x128 vs llama.cpp f32"].ratio == pytest.approx(0.75)
    assert by["N=1 aggregate tok/s vs llama-server"].ratio == pytest.approx(0.5)
    assert by["N=16 aggregate tok/s vs llama-server"].ref is None  # llama-server not measured at 16
    assert by["start in the serving run (32 slots) vs llama-server"].ratio == pytest.approx(30.0)
    assert by["llama-server"].note.endswith("per request: --parallel 32")


def test_llama_cpp_not_built_is_said_and_shows_no_number():
    why = "cmake is missing and `pip install cmake` failed, exit code 1: no network"
    raw = {"model": {"decode": [{"batch": 1, "context": 128, "ours_ms": 20.0, "ref_ms": 25.0}], "prefill": [],
                     "score": []},
           "llama-cpp-bench": {"unavailable": why, "decode": [], "prefill": [], "errors": []}}
    errors = {"llama-cpp-bench": "exit code 1: ...", "serving-llama-cpp": "skipped"}
    rows = run_all.build_rows(raw, errors, ["model", "llama-cpp-bench", "serving-llama-cpp"])
    llama = [r for r in rows if "llama" in r.what]
    assert [r.what for r in llama] == ["llama.cpp (llama-bench)", "serving llama-cpp"]
    assert all(r.error == f"llama.cpp: not built ({why})" and r.ref is None and r.ratio is None for r in llama)
    assert run_all.selected("serving-llama-cpp", ["llama-cpp"]) and run_all.selected("llama-cpp-bench", ["llama-cpp"])
    assert run_all.selected("serving-llama-cpp", ["serving"]) and not run_all.selected("model", ["llama-cpp"])


def test_failed_benchmarks_become_error_rows_and_the_rest_still_render():
    model = {"decode": [{"batch": 1, "context": 128, "ours_ms": 50.0, "ref_ms": 40.0},
                        {"batch": 32, "context": 128, "ours_ms": 200.0, "ref_ms": 250.0}],
             "prefill": [{"batch": 1, "tokens": 512, "ours_tok_s": 500.0, "ref_tok_s": 700.0}], "score": [],
             "decode_floor_ms": 25.0, "weight_bytes": 5e8, "copy_bandwidth_bytes_s": 2e10}
    raw = {"model": model, "train": {"shapes": "not a list"}, "serving-ours": None,
           "start": {"seconds": {"cold": 90.0}}}
    errors = {"serving-ours": "exit code 1: server exited", "start": "timed out after 10 s"}
    rows = run_all.build_rows(raw, errors, ["model", "train", "serving-ours", "start"])
    verdicts = {r.what: r.verdict for r in rows}
    assert verdicts["decode b=1 ctx=128"] == "NO, 25% over"
    assert verdicts["decode b=32 ctx=128"] == "yes"
    assert verdicts["prefill 1x512"] == "yes"  # 0.71x >= 0.6x
    assert verdicts["train: results"] == "ERROR"  # malformed JSON
    assert verdicts["serving ours"] == "ERROR" and verdicts["start"] == "ERROR"
    assert "start, empty --compile-cache dir (cold)" in verdicts  # partial results still shown
    floor = next(r for r in rows if "floor" in r.what)
    assert floor.ratio == pytest.approx(2.0)
    text = benchlib.format_table(rows)
    assert "server exited" in text and "timed out" in text
    assert not math.isnan(sum(r.ratio or 0 for r in rows))


def test_the_scheduler_simulation_charges_each_pass_and_closes_the_loop():
    import sim_scheduler

    # One request alone: its prompt in passes of at most 256 tokens (each padded to a chunk bucket), then one
    # decode step per further token (1 row).
    base, per_token = 0.010, 0.001
    (length,) = benchlib.draw_lengths(1, 16, 512, 0)
    buckets = sim_scheduler.EngineConfig(max_batch_size=32, prefill_chunk=256).chunk_buckets
    passes, left = 0.0, length
    while left:
        n = min(256, left)
        passes += base + per_token * next(b for b in buckets if b >= n)
        left -= n
    r = sim_scheduler.simulate(clients=1, per_client=1, new_tokens=3, budget=256, base=base, per_token=per_token)
    (req,) = r.requests
    assert req.first == pytest.approx(passes)
    assert req.end == pytest.approx(passes + 2 * (base + per_token))
    # Closed loop: each client's next request leaves when its previous one ends; every request completes.
    r = sim_scheduler.simulate(clients=4, per_client=2, new_tokens=16, budget=128, base=base, per_token=per_token)
    assert len(r.requests) == 8 and all(q.first is not None and q.sent <= q.first < q.end for q in r.requests)
    for c in range(4):
        first, second = sorted((q for q in r.requests if q.client == c), key=lambda q: q.index)
        assert second.sent == first.end
    assert r.wall == max(q.end for q in r.requests)
    assert r.tokens_per_s(16) == pytest.approx(8 * 16 / r.wall)


def test_the_simulation_charges_decode_rows_apart_and_reuses_a_shared_prefix():
    import sim_scheduler

    # One client, two requests sharing a 40-token prefix, unpadded passes: the first computes 40 + its own 5
    # tokens; the second only its own 5 (prefix caching); a decode row costs per_decode.
    base, per_token, per_decode = 0.010, 0.001, 0.004
    r = sim_scheduler.simulate(clients=1, per_client=2, new_tokens=3, budget=256, base=base, per_token=per_token,
                               per_decode=per_decode, lo=5, hi=5, prefix=40, pad=False)
    first, second = sorted(r.requests, key=lambda q: q.index)
    assert first.first == pytest.approx(base + 45 * per_token)
    assert first.end - first.first == pytest.approx(2 * (base + per_decode))
    assert second.first - second.sent == pytest.approx(base + 5 * per_token)
    # 16 clients of short questions after a shared prefix: staggering their starts breaks up the lockstep
    # groups and lowers the steady-state TTFT median.
    kw = dict(clients=16, per_client=6, new_tokens=32, budget=256, base=0.020, per_token=0.0019, per_decode=0.0038,
              lo=10, hi=17, prefix=423, pad=False)
    plain = np.percentile(sim_scheduler.simulate(**kw).ttft(steady=True), 50)
    staggered = np.percentile(sim_scheduler.simulate(stagger=32, **kw).ttft(steady=True), 50)
    assert staggered < 0.7 * plain


# ---- the soak test (bench/soak.py) --------------------------------------------------------------------------------


def test_soak_helpers():
    import soak

    assert soak.slope_per_minute([(0.0, 100.0), (30.0, 101.0), (60.0, 102.0)]) == pytest.approx(2.0)
    assert soak.slope_per_minute([(5.0, 1.0)]) is None
    m = soak.parse_metrics('# HELP x\ngpt2_requests_running 2.0\ngpt2_request_failure_total{reason="aborted"} 3.0\n')
    assert m == {"gpt2_requests_running": 2.0, 'gpt2_request_failure_total{reason="aborted"}': 3.0}
    assert soak.check_loopback("http://127.0.0.1:8000") == ("127.0.0.1", 8000)
    with pytest.raises(ValueError):
        soak.check_loopback("http://10.0.0.1:8000")
    tgi = ['{"token": {"id": 1}, "generated_text": null}', '{"token": {"id": 2}, "generated_text": "ab"}']
    assert soak._stream_outcome("generate_stream", tgi).kind == "ok"
    assert soak._stream_outcome("generate_stream", tgi[:1]).kind == "stream_no_final_event"
    v1 = ['{"choices": [{"text": "a", "finish_reason": null}]}',
          '{"choices": [{"text": "", "finish_reason": "length"}]}']
    assert soak._stream_outcome("v1_stream", v1 + ["[DONE]"]).kind == "ok"
    assert soak._stream_outcome("v1_stream", v1).kind == "stream_no_final_event"
    assert soak._stream_outcome("v1_stream", ['{"error": {"message": "x"}}', "[DONE]"]).kind == "stream_error_event"


@pytest.mark.slow
def test_soak_runs_against_a_tiny_server(tmp_path):
    """A few clients for a few seconds, half of the requests disconnected: everything counted, no slot leaked."""
    import subprocess

    from serving_helpers import REPO, make_tiny_model

    model = make_tiny_model(tmp_path / "tiny")
    out = tmp_path / "soak.json"
    cmd = [sys.executable, "bench/soak.py", "--model", str(model), "--clients", "4", "--duration", "6",
           "--disconnect-rate", "0.5", "--min-new-tokens", "4", "--max-new-tokens", "12", "--sample-every", "1",
           "--settle", "1", "--seed", "1", "--server-args", "--max-batch-size 4 --prefill-chunk 64",
           "--log-dir", str(tmp_path / "logs"), "--out", str(out)]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    r = json.loads(out.read_text())
    assert r["passed"] and not r["failures"] and r["errors"] == {}
    t = r["totals"]
    assert t["sent"] == t["ok"] + t["disconnected"] + t["completed_before_disconnect"] + t["errors"]
    assert t["ok"] >= 10 and t["disconnected"] >= 3 and sum(r["disconnects"].values()) == t["disconnected"]
    assert set(r["routes"]) == {"generate_stream", "v1_stream", "generate", "v1", "score"}
    assert r["gauges_after_idle"] == {g: 0.0 for g in ("gpt2_requests_running", "gpt2_requests_waiting",
                                                         "gpt2_kv_cache_slots_used")}
    assert not r["leaked_slots"] and r["server_exit_code"] == 0
    rss = r["rss"]
    assert 0 < rss["start_bytes"] <= rss["peak_sampled_bytes"] <= rss["hwm_bytes"]
    assert rss["growth_mb_per_min_after_warmup"] is not None and rss["samples_after_warmup"] >= 3
    assert len(r["samples"]) >= 6 and r["server_counters"]["gpt2_generation_tokens_total"] > 0
    assert "RSS growth after warm-up" in run.stdout and "PASS" in run.stdout


# ---- the prefix-caching workload (bench_prefix.py) ------------------------------------------------------------

def test_prefix_workload_one_shared_prefix_and_distinct_questions():
    from tokenizer import GPT2Tokenizer

    encode = GPT2Tokenizer.from_pretrained("gpt2").encode
    pairs = bench_prefix.verse_pairs(bench_prefix.SONNETS.read_text(encoding="utf-8"))
    assert pairs[0] == ("From fairest creatures we desire increase,", "That thereby beauty's rose might never die,")
    prefix, prompts = bench_prefix.few_shot_prompts(pairs, header=bench_prefix.HEADER, prefix_tokens=400, n=96,
                                                    suffix_tokens=(10, 30), encode=encode, seed=0)
    ids = [encode(p) for p in prompts]
    assert len(set(prompts)) == 96 and all(p.startswith(prefix) and p.endswith("\nNext:") for p in prompts)
    shared = bench_prefix.shared_prefix(ids)
    assert 400 <= shared <= 450 and all(10 <= len(t) - shared <= 30 for t in ids)
    assert all(shared <= n < len(t) for n, t in zip(bench_prefix.longest_shared(ids), ids))
    # the warm-up prompts share nothing with the measured ones
    _, warm = bench_prefix.few_shot_prompts(pairs[::-1], header=bench_prefix.WARM_HEADER, prefix_tokens=400, n=16,
                                            suffix_tokens=(10, 30), encode=encode, seed=1)
    assert max(bench_prefix.common_prefix(encode(w), ids[0]) for w in warm) == 0
    with pytest.raises(ValueError, match="distinct questions"):
        bench_prefix.few_shot_prompts(pairs, header="", prefix_tokens=400, n=10**5, suffix_tokens=(10, 30),
                                      encode=encode, seed=0)


def test_common_and_longest_shared_prefixes():
    lists = [[1, 2, 3, 4], [1, 2, 3, 9], [1, 2, 7], [5]]
    assert bench_prefix.common_prefix(lists[0], lists[1]) == 3
    assert bench_prefix.shared_prefix(lists) == 0 and bench_prefix.shared_prefix(lists[:3]) == 2
    assert bench_prefix.longest_shared(lists) == [3, 3, 2, 0]


def _res(i, *, first=False, prompt=437, cached=423, usage=True):
    r = loadgen.StreamResult(i, sent=0.0, token_times=[0.1, 0.2], finished=True, first=first)
    if usage:
        r.usage = {"prompt_tokens": prompt, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": cached}}
    return r


def test_check_cached_names_each_kind_of_wrong_usage():
    lengths, longest, shared = [437] * 6, [424] * 6, 423
    good = [_res(0, first=True, cached=0), _res(1, first=True, cached=256), _res(2)]
    assert bench_prefix.check_cached(good, lengths, longest, shared, caching=True) == []
    assert bench_prefix.check_cached([_res(0, cached=0)], lengths, longest, shared, caching=False) == []
    bad = [_res(0, cached=400), _res(1, cached=432), _res(2, cached=0), _res(3, prompt=438), _res(4, usage=False)]
    faults = bench_prefix.check_cached(bad, lengths, longest, shared, caching=True)
    assert len(faults) == 4 and any("more than what another prompt shares" in f and "1 requests" in f for f in faults)
    assert any("after the first wave" in f for f in faults) and any("prompt_tokens" in f for f in faults)
    assert any("no usage" in f for f in faults)
    assert bench_prefix.check_cached([_res(0)], lengths, longest, shared, caching=False)  # a hit without caching
    s = bench_prefix.cache_summary(good)
    assert s["hit_ratio"] == pytest.approx(679 / (3 * 437)) and s["steady"]["requests_with_hit"] == 1
    assert s["first_wave"]["requests"] == 2 and s["miss_ttft_ms_p50"] == pytest.approx(100.0)


def test_prometheus_value_and_access_log_5xx():
    text = ("# HELP gpt2_prefix_cache_hits_total x\ngpt2_prefix_cache_hits_total 416.0\n"
            "gpt2_prefix_cache_hits_created 1.0\ngpt2_request_success_total{finish_reason=\"length\"} 3.0\n"
            "gpt2_request_success_total{finish_reason=\"eos\"} 1.0\n")
    assert bench_prefix.prometheus_value(text, "gpt2_prefix_cache_hits_total") == 416.0
    assert bench_prefix.prometheus_value(text, "gpt2_request_success_total") == 4.0
    assert bench_prefix.prometheus_value(text, "gpt2_prefix_cache_queries_total") is None
    log = "\n".join([json.dumps({"route": "/health", "status": 503}), json.dumps({"route": "/v1/completions",
                     "status": 500}), json.dumps({"route": "/v1/completions", "status": 200}), "[WARNING] x"])
    assert bench_prefix.access_log_5xx(log) == 1


def test_openai_stream_keeps_usage():
    async def handler(request):
        final = {"choices": [{"text": "x", "index": 0, "finish_reason": "length"}],
                 "usage": {"prompt_tokens": 5, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 0}}}
        return httpx.Response(200, content=f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n".encode(),
                              headers={"content-type": "text/event-stream"})

    (r,), _ = asyncio.run(loadgen.closed_loop("http://fake", ["p"], clients=1, per_client=1, new_tokens=1,
                                              time_limit=10, api="openai", transport=httpx.MockTransport(handler)))
    assert r.usage["prompt_tokens"] == 5 and bench_prefix.cached_tokens(r) == 0


def _config(steady_p50, *, hits=1.0):
    return {"requests": 96, "finished": 96, "unfinished": 0, "errors": 0, "aggregate_tok_s": 100.0,
            "ttft_ms_p50": 2 * steady_p50, "ttft_ms_p99": 4 * steady_p50, "steady_ttft_ms_p50": steady_p50,
            "steady_ttft_ms_p99": 2 * steady_p50,
            "cache": {"hit_ratio": 0.9 * hits, "hit_ttft_ms_p50": steady_p50,
                      "steady": {"requests": 80, "requests_with_hit": int(80 * hits), "hit_ratio": 0.97 * hits},
                      "first_wave": {"requests": 16, "requests_with_hit": int(15 * hits), "hit_ratio": 0.5}},
            "metrics": {"hit_ratio": 0.9 * hits} if hits else None, "cmd": ["/x/llama-server", "--parallel", "32"]}


def test_prefix_rows_apply_the_target_to_ours_with_vs_without():
    raw = {"prefix": {"configs": {"ours": _config(100.0), "ours-no-cache": _config(500.0, hits=0),
                                  "llama-cpp": _config(300.0)},
                      "workload": {"clients": 16, "requests_per_client": 6, "new_tokens": 32, "slots": 32,
                                   "shared_prefix_tokens": 423, "time_limit_s": 150.0,
                                   "prompt_tokens": {"min": 433, "max": 442}, "suffix_tokens": {"min": 10, "max": 19}},
                      "errors": []}}
    rows = run_all.build_rows(raw, {}, ["prefix"])
    by = {r.what: r for r in rows}
    target = by["N=16 TTFT p50 / p99 after the first wave, with vs without caching (ratio of p50)"]
    assert target.ratio == pytest.approx(0.2) and target.verdict == "yes"
    assert by["N=16 TTFT p50 / p99 after the first wave vs llama-server (ratio of p50)"].ratio == pytest.approx(1 / 3)
    assert "--parallel 32" in by["llama-server (prefix)"].note
    raw["prefix"]["configs"]["ours"] = _config(150.0)
    assert run_all.build_rows(raw, {}, ["prefix"])[0].verdict == "NO, 20% over"
    # a failed job is an error row; the others still render
    rows = run_all.build_rows({"prefix": None}, {"prefix": "exit code 1: ours: no usage"}, ["prefix"])
    assert [r.verdict for r in rows] == ["ERROR"]
    assert run_all.selected("prefix", ["prefix"]) and not run_all.selected("prefix", ["serving"])


def test_llama_server_prompt_cache_flag():
    build = llama_cpp.Build(Path("/x"))
    off = llama_cpp.server_command(build, Path("/m.gguf"), port=1, threads=2, slots=4, ctx_per_slot=1024)
    on = llama_cpp.server_command(build, Path("/m.gguf"), port=1, threads=2, slots=4, ctx_per_slot=1024,
                                  prompt_cache=True)
    assert "--no-cache-prompt" in off and "--no-cache-prompt" not in on and "--cache-ram" in on


def test_rows_int8_compare_against_float32_and_llama_cpp_q8_0():
    raw = {
        "int8-model": {"decode": [{"batch": 1, "context": 128, "ours_ms": 8.0}], "prefill": [
            {"batch": 1, "tokens": 128, "ours_tok_s": 800.0}], "decode_floor_ms": 4.0, "weight_bytes": 130e6,
            "copy_bandwidth_bytes_s": 32e9},
        "model": {"decode": [{"batch": 1, "context": 128, "ours_ms": 20.0, "ref_ms": 35.0}],
                  "prefill": [{"batch": 1, "tokens": 128, "ours_tok_s": 760.0, "ref_tok_s": 600.0}],
                  "weight_bytes": 500e6},
        "llama-cpp-bench": {"decode": [{"type": "q8_0", "context": 128, "ms_per_token": 10.0, "tok_s": 100.0},
                                       {"type": "f32", "context": 128, "ms_per_token": 18.0, "tok_s": 55.0}]},
        "int8-serving": {"levels": [{"clients": 16, "aggregate_tok_s": 300.0, "ttft_ms_p50": 100.0,
                                     "ttft_ms_p99": 900.0}], "peak_rss_bytes": 1.9e9},
        "serving-ours": {"levels": [{"clients": 16, "aggregate_tok_s": 165.0}], "peak_rss_bytes": 2.5e9},
        "int8-quality": {"results": {"default": {
            "max_abs_logprob_diff": 0.04, "mean_abs_logprob_diff": 0.006, "tokens": 1000, "greedy_identical": 49,
            "greedy_prompts": 50, "greedy_mean_common_prefix": 127.0,
            "perplexity": {"licences": {"f32": 500.0, "int8": 506.0, "tokens": 900}}}}},
    }
    rows = {r.what: r for r in run_all.rows_int8(raw)}
    q8 = rows["decode b=1 ctx=128, int8 vs llama.cpp q8_0 (ms/token)"]
    assert q8.ratio == pytest.approx(0.8) and q8.verdict == "yes"
    assert rows["decode b=1 ctx=128, int8 vs our float32 (ms/step)"].ratio == pytest.approx(0.4)
    assert rows["serving N=16 aggregate tok/s, int8 vs float32"].verdict == "yes"  # 1.82x >= 1.5x
    rss = rows["server peak RSS (VmHWM), int8 vs float32"]
    assert rss.verdict == "yes"  # 1.9 <= 2.5 - 0.37 GB
    assert rows["default: perplexity, licences"].verdict.startswith("NO")  # 1.2% over


def test_the_preset_suite_plans_every_row_the_larger_models_need(tmp_path):
    # make bench-large: decode/prefill vs transformers, llama-bench, int8, serving vs llama-server, start; fewer
    # slots and positions than the 124M suite, the same for both servers.
    import argparse

    args = argparse.Namespace(preset="gpt2-xl", quick=False, threads=2, llama_cpp=True, clients=None, server_args="",
                              time_limit=100.0, timeout_scale=1.0)
    model = run_all.model_dir(args)
    assert model.name == "gpt2-xl-random"
    jobs = {j.name: j.cmd for j in run_all.plan(args, model, tmp_path, tmp_path)}
    assert list(jobs) == ["model", "llama-cpp-bench", "int8-model", "serving-ours", "serving-llama-cpp", "start"]
    assert jobs["model"][jobs["model"].index("--preset") + 1] == "gpt2-xl"
    for name in ("serving-ours", "serving-llama-cpp"):
        cmd = jobs[name]
        assert cmd[cmd.index("--max-total-tokens") + 1] == str(run_all.LARGE_POSITIONS)
        assert cmd[cmd.index("--clients") + 1] == "1,4,16"
    assert "--quantize" in jobs["int8-model"]


def test_start_rows_hold_the_peak_rss_to_the_budget():
    b = {"budget_bytes": 10e9, "weights_bytes": 6.2e9, "kv_bytes": 2.8e9, "slots": 16, "positions": 512}
    rows = run_all.rows_start({"seconds": {"cold": 50.0, "warm": 20.0},
                               "peak_rss_bytes": {"cold": 7.4e9, "warm": 11e9}, "budget": b})
    rss = [r for r in rows if r.what.startswith("peak RSS")]
    assert [r.verdict.split(",")[0] for r in rss] == ["yes", "NO"]


def test_wait_cache_written_waits_for_a_live_writer_only(tmp_path, monkeypatch):
    # A benchmark waits while our server writes its packed cache (a temporary file a live writer holds a lock on),
    # not for a dead writer's leftover temporary file.
    import fcntl
    import threading
    import types

    import procs  # noqa: E402 - bench/, on sys.path above

    monkeypatch.setenv("GPT2_PACKED_CACHE", str(tmp_path))
    proc = types.SimpleNamespace(poll=lambda: None)
    stale = tmp_path / ".abc.packed.tmp-0001"
    stale.write_bytes(b"left by a writer that died")
    assert procs.wait_cache_written(proc, grace=0.0) < 0.5

    live = tmp_path / ".abc.packed.tmp-0002"
    locked = threading.Event()

    def writer():
        with open(live, "wb") as f:
            fcntl.flock(f, fcntl.LOCK_SH)
            locked.set()
            time.sleep(1.5)
        live.unlink()

    t = threading.Thread(target=writer)
    t.start()
    locked.wait(5)
    waited = procs.wait_cache_written(proc, grace=0.0)
    t.join()
    assert 0.8 < waited < 10
