"""Batch invariance end to end: a real server process with a GPT-2 124M-shaped model (random weights) and the
default settings gives each greedy and each seeded request byte for byte the same completion, logprobs included,
whether it runs alone or among 15 others (different prompt lengths, prompts long enough to be chunked, requests
joining while others decode), and with its prompt's K/V taken from the prefix cache (the concurrent run repeats
the solo run's prompts, which the cache still holds) or computed.

Random 124M weights give nearly uniform logits, so a greedy or sampled token flips on a change in the last bit of
a logit: the logprobs are compared exactly too. Slow (a 500 MB model, graphs compiled on first use), so one test.
"""

import asyncio

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving_helpers import ServerProcess, make_tiny_model

pytestmark = pytest.mark.slow

N = 16


def _requests() -> list[dict]:
    out = []
    for i in range(N):
        # 3 to ~400 tokens: single-step prompts and prompts chunked over two or three steps (prefill_chunk 256).
        prompt = f"Request {i}: " + "the quick brown fox jumps over the lazy dog " * (i * i // 2)
        body = {"prompt": prompt, "max_tokens": 12 + i % 5, "logprobs": 2}
        if i % 2:
            body |= {"temperature": 0.9, "top_p": 0.95, "seed": 1000 + i}
        else:
            body |= {"temperature": 0}
        out.append(body)
    return out


def _result(resp: httpx.Response) -> dict:
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    return {"text": choice["text"], "logprobs": choice["logprobs"], "finish_reason": choice["finish_reason"]}


def _metric(url: str, name: str) -> float:
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            if s.name == name:
                return s.value
    raise KeyError(name)


def _batch_sizes(url: str) -> tuple[float, float]:
    """(steps, steps that decoded more than 8 sequences) from the server's metrics."""
    samples = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            if s.name.startswith("gpt2_batch_size"):
                samples[(s.name, s.labels.get("le"))] = s.value
    count = samples[("gpt2_batch_size_count", None)]
    return count, count - samples[("gpt2_batch_size_bucket", "8.0")]


def test_16_concurrent_greedy_and_seeded_requests_equal_their_solo_runs(tmp_path):
    model = make_tiny_model(tmp_path / "gpt2-124m", **{"n-layer": 12, "n-embd": 768, "n-head": 12,
                                                      "n-positions": 1024, "init-std": 0.02})
    server = ServerProcess(model, "--no-warmup", "--compile-cache", str(tmp_path / "graphs"),
                           log_path=tmp_path / "server.log")
    try:
        server.wait_healthy(600)
        url = server.url + "/v1/completions"
        reqs = _requests()
        with httpx.Client(timeout=600) as c:
            alone = [_result(c.post(url, json=r)) for r in reqs]

        async def together():
            async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=N)) as c:
                async def one(i, r):
                    await asyncio.sleep(0.05 * (i % 4))  # some join while others are already decoding
                    return _result(await c.post(url, json=r))

                return await asyncio.gather(*(one(i, r) for i, r in enumerate(reqs)))

        before = _batch_sizes(server.url)
        hits = _metric(server.url, "gpt2_prefix_cache_hits_total")
        concurrent = asyncio.run(together())
        assert _batch_sizes(server.url)[1] > before[1]  # some pass decoded more than 8 sequences at once
        assert _metric(server.url, "gpt2_prefix_cache_hits_total") - hits > 1000  # most prompts were cached
        for i, (a, b) in enumerate(zip(alone, concurrent)):
            assert a == b, f"request {i} differs under load"
        assert len({a["text"] for a in alone}) == N  # distinct requests, not one answer repeated
    finally:
        server.stop()
