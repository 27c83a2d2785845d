"""Closed-loop load generator for streaming text generation (SSE): N clients, each sending its next request when its
previous one has finished, a fixed number of requests per client, all bounded by a wall-time limit.

Two APIs: TGI's `POST /generate_stream` (one event per token) and OpenAI's `POST /v1/completions` with
`stream: true` (llama-server's). An OpenAI stream's events need not be one per token: a server may hold a token's
text back until a UTF-8 character is complete and send it with the next one (llama-server does). So the tokens an
event carries come from the server's running count where it sends one (llama-server's `timings.predicted_n`, with
`timings_per_token` in the request), else one per event with text; the final `usage.completion_tokens` adds any
tokens not yet counted, and the whole `usage` is kept (its `prompt_tokens_details.cached_tokens`: prefix caching).

Per request it records when it was sent, when each token event arrived, and errors; `summarize` turns that into
aggregate tokens/s, time to first token and inter-token latency percentiles. Time to first token is also given over the
steady state alone: every request but each client's first. All clients start at once, so their first requests arrive
together (a burst of N prompts to prefill); later ones arrive as earlier ones finish. Requests still running at the time
limit are cancelled (the client disconnects, which makes the server abort them) and count with the tokens they had
received. Knows httpx, the two event formats and llama-server's additions to the OpenAI one; nothing else of the
servers behind them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from benchlib import percentile

APIS = ("tgi", "openai")


@dataclass
class StreamResult:
    prompt_index: int
    sent: float = 0.0
    token_times: list[float] = field(default_factory=list)
    finished: bool = False
    error: str | None = None
    first: bool = False  # the client's first request (sent at the start, with every other client's first)
    usage: dict | None = None  # an OpenAI stream's final `usage` (prompt_tokens, prompt_tokens_details, ...)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.sent if self.token_times else None

    @property
    def gaps(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]


def request(api: str, prompt: str, new_tokens: int, extra: Mapping[str, Any] | None = None) -> tuple[str, dict]:
    """The path and JSON body asking for exactly `new_tokens` greedy tokens, streamed; `extra` adds body fields."""
    if api == "tgi":
        path, body = "/generate_stream", {"inputs": prompt, "parameters": {"max_new_tokens": new_tokens,
                                                                         "do_sample": False}}
    elif api == "openai":
        path, body = "/v1/completions", {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0.0,
                                         "stream": True, "stream_options": {"include_usage": True}}
    else:
        raise ValueError(f"unknown api {api!r}; use one of {', '.join(APIS)}")
    return path, {**body, **(extra or {})}


def read_event(api: str, event: dict, now: float, res: StreamResult) -> None:
    """Record the tokens one parsed `data:` event carries (all arrived at `now`) and whether it ends the stream."""
    if api == "tgi":
        if "token" in event:
            res.token_times.append(now)
        if event.get("generated_text") is not None:
            res.finished = True
        return
    choices = event.get("choices") or []
    count = (event.get("timings") or {}).get("predicted_n")
    if count is None and any(c.get("text") for c in choices):
        count = len(res.token_times) + 1
    if event.get("usage"):
        res.usage = event["usage"]
        if event["usage"].get("completion_tokens") is not None:
            count = max(count or 0, event["usage"]["completion_tokens"])
    if count is not None and count > len(res.token_times):
        res.token_times.extend([now] * (count - len(res.token_times)))
    if any(c.get("finish_reason") for c in choices):
        res.finished = True


async def stream_one(
    client: httpx.AsyncClient, url: str, prompt: str, new_tokens: int, res: StreamResult, *, api: str = "tgi",
    extra: Mapping[str, Any] | None = None,
) -> StreamResult:
    """One streaming request; fills `res` as events arrive (so a cancelled request keeps what it received)."""
    path, body = request(api, prompt, new_tokens, extra)
    res.sent = time.perf_counter()
    async with client.stream("POST", url + path, json=body) as r:
        if r.status_code != 200:
            res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            return res
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            now = time.perf_counter()
            event = json.loads(line[5:])
            if "error" in event:
                res.error = str(event.get("error"))[:200]
                return res
            read_event(api, event, now, res)
    return res


def limits(connections: int, keepalive: bool) -> httpx.Limits:
    """Connection pool limits. Without keep-alive every request opens its own connection: llama-server (its
    cpp-httplib) closes the connection after a streamed response while announcing keep-alive, so a reused one fails
    at once about every other request ("Server disconnected without sending a response")."""
    return httpx.Limits(max_connections=connections, max_keepalive_connections=connections if keepalive else 0)


async def closed_loop(
    url: str, prompts: Sequence[str], *, clients: int, per_client: int, new_tokens: int, time_limit: float,
    api: str = "tgi", extra: Mapping[str, Any] | None = None, keepalive: bool = True,
    transport: httpx.AsyncBaseTransport | None = None,
) -> tuple[list[StreamResult], float]:
    """Client c sends prompts[c * per_client + r] for r = 0.. per_client - 1, one after the other. Returns the
    results and the wall time from the first request to the last token (or the time limit). `api` and `extra`
    as for `request`; `keepalive` False: a new connection per request (see `limits`); `transport` replaces the
    network (tests)."""
    request(api, "", new_tokens, extra)  # an unknown api fails here, not in every client
    if len(prompts) < clients * per_client:
        raise ValueError(f"{clients} clients x {per_client} requests need {clients * per_client} prompts, "
                         f"got {len(prompts)}")
    results: list[StreamResult] = []
    timeout = httpx.Timeout(connect=30.0, read=time_limit + 120.0, write=30.0, pool=time_limit + 120.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits(clients + 4, keepalive),
                                 transport=transport) as http:
        t0 = time.perf_counter()
        deadline = t0 + time_limit

        async def client_loop(c: int) -> None:
            for r in range(per_client):
                if time.perf_counter() >= deadline:
                    return
                res = StreamResult(prompt_index=c * per_client + r, first=r == 0)
                results.append(res)
                try:
                    await stream_one(http, url, prompts[res.prompt_index], new_tokens, res, api=api, extra=extra)
                except httpx.HTTPError as e:
                    res.error = f"{type(e).__name__}: {e}"[:200]

        tasks = [asyncio.create_task(client_loop(c)) for c in range(clients)]
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
        end = time.perf_counter()
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()
    last = max((r.token_times[-1] for r in results if r.token_times), default=end)
    wall = (end if pending else last) - t0
    return results, wall


def summarize(results: Sequence[StreamResult], wall: float) -> dict:
    """Aggregate tokens/s, TTFT and inter-token latency (ms) percentiles over all requests, and TTFT over the
    steady state (every request but each client's first)."""
    ttfts = [r.ttft for r in results if r.ttft is not None]
    steady = [r.ttft for r in results if r.ttft is not None and not r.first]
    gaps = [g for r in results for g in r.gaps]
    tokens = sum(len(r.token_times) for r in results)

    def ms(x: float | None) -> float | None:
        return None if x is None else 1000 * x

    return {
        "requests": len(results),
        "finished": sum(r.finished for r in results),
        "unfinished": sum(not r.finished and r.error is None for r in results),
        "errors": sum(r.error is not None for r in results),
        "first_errors": [r.error for r in results if r.error][:3],
        "tokens": tokens,
        "wall_s": wall,
        "aggregate_tok_s": tokens / wall if wall > 0 else None,
        "ttft_ms_p50": ms(percentile(ttfts, 50)),
        "ttft_ms_p99": ms(percentile(ttfts, 99)),
        "ttft_ms_max": ms(max(ttfts, default=None)),
        "steady_requests": len(steady),
        "steady_ttft_ms_p50": ms(percentile(steady, 50)),
        "steady_ttft_ms_p99": ms(percentile(steady, 99)),
        "itl_ms_p50": ms(percentile(gaps, 50)),
        "itl_ms_p99": ms(percentile(gaps, 99)),
        "itl_ms_mean": ms(sum(gaps) / len(gaps)) if gaps else None,
    }
