"""Closed-loop simulation of the serving scheduler with a linear step-cost model: no model, no HTTP.

Drives the real `serving.engine.scheduler.Scheduler` (one flat pass per step, the server's token buckets) with
the load generator's workload: N clients, each sending its prompts one after the other (log-uniform lengths, the
same seeded draw as bench_serving.py), 128 new tokens each. A step costs `base + per_token * padded tokens` (a
flat pass pads prompt chunks plus the decode tokens riding along to a token bucket). Measured on this machine: a step ~25-30 ms plus 0.6-1.2 ms per token (decode at batch
16: 41-55 ms; a 256-token pass: 150-300 ms), so the defaults below are the slow end.

It answers scheduling questions in seconds rather than a 3-minute serving run each, e.g. which prefill budget
(`--budgets`) gives the lowest TTFT p99, and how much of it is the first wave (all clients start at once: its
last first token waits for every prompt of the wave, whatever the order, since the passes are work-conserving;
--stagger holds short prompts back a step or two).

With --prefix-tokens every prompt is a shared prefix and then its own --lo..--hi tokens (bench_prefix.py's
few-shot workload), with prefix caching on: after the first request only the own tokens are computed. A decode
row can cost more than a prompt token (--decode-ms: at a long context it reads the row's whole K/V).

    python bench/sim_scheduler.py                                  # budgets 64..384 at 16 clients
    python bench/sim_scheduler.py --clients 16 --base-ms 25 --per-token-ms 0.6 --budgets 128,256
    python bench/sim_scheduler.py --budgets 256 --seeds 6 --prefill-first     # against the same without the flag
    python bench/sim_scheduler.py --budgets 256 --stagger 0,16,32,64          # staggered starts (--stagger-tokens)
    python bench/sim_scheduler.py --budgets 256 --stagger 0,32 --prefix-tokens 423 --lo 10 --hi 17 \
        --new-tokens 32 --base-ms 20 --per-token-ms 1.9 --decode-ms 3.8 --no-pad     # bench_prefix.py, 124M, 2 cores
"""

from __future__ import annotations

import argparse
import heapq
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchlib import draw_lengths  # noqa: E402

from serving.config import EngineConfig  # noqa: E402
from serving.engine.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from serving.engine.sequence import FinishReason, Sequence  # noqa: E402
from serving.sampling_params import SamplingParams  # noqa: E402


@dataclass
class Request:
    client: int
    index: int  # the client's n-th request
    prompt_len: int
    sent: float
    first: float | None = None
    end: float | None = None


@dataclass
class SimResult:
    requests: list[Request]
    wall: float

    def tokens_per_s(self, new_tokens: int) -> float:
        return len(self.requests) * new_tokens / self.wall

    def ttft(self, steady: bool = False) -> np.ndarray:
        return np.array([r.first - r.sent for r in self.requests if not steady or r.index > 0])


def simulate(
    *, clients: int, per_client: int, new_tokens: int, budget: int, base: float, per_token: float,
    slots: int = 32, seed: int = 0, lo: int = 16, hi: int = 512, prefill_first: bool = False, stagger: int = 0,
    prefix: int = 0, per_decode: float | None = None, pad: bool = True,
) -> SimResult:
    """Run the closed loop to the end; times in seconds from the first request. prefill_first: the running
    sequences skip a step whose pass prefills while prompts are still waiting or unfinished (vLLM's old policy),
    instead of riding along. prefix: tokens of a prefix every prompt shares (prefix caching on). per_decode: the
    cost of a decode row (default per_token). pad: the pass is padded to a chunk bucket (a fixed-shape session)."""
    ec = EngineConfig(max_batch_size=slots, max_batched_tokens=budget, prefill_chunk=budget)
    chunk_buckets = ec.chunk_buckets if pad else ()
    per_decode = per_token if per_decode is None else per_decode
    sched = Scheduler(SchedulerConfig(
        num_slots=slots, max_waiting=clients * per_client, max_step_tokens=ec.max_step_tokens, prefill_chunk=budget,
        stagger_tokens=stagger, prefix_block=ec.prefix_block if prefix else 0, prefix_copy=True,
    ))
    lengths = draw_lengths(clients * per_client, lo, hi, seed)
    own = iter(range(1, 1 << 30))  # token ids no two prompts share past the prefix
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)
    arrivals = [(0.0, c, 0) for c in range(clients)]  # (time, client, index): a heap
    requests: dict[str, Request] = {}
    now = 0.0

    def padded(n: int, buckets: tuple[int, ...]) -> int:
        return next((b for b in buckets if b >= n), n)

    while arrivals or sched.has_work():
        while arrivals and arrivals[0][0] <= now:
            t, c, i = heapq.heappop(arrivals)
            n = lengths[c * per_client + i]
            seq = Sequence(f"{c}-{i}", [0] * prefix + [next(own) for _ in range(n)], params, arrival_time=t)
            sched.add([seq])
            requests[seq.request_id] = Request(c, i, n, t)
        if not sched.has_work():
            now = arrivals[0][0]
            continue
        out = sched.schedule(now)
        if prefill_first and out.prefill and (sched.waiting or sched.prefilling):
            out.decode = []
        prompt_tokens = sum(ch.end - ch.start for ch in out.prefill)
        # One flat pass: the prompt chunks, then a decode token per running sequence.
        tokens = prompt_tokens + len(out.decode)
        now += base + per_token * (padded(tokens, chunk_buckets) - len(out.decode)) + per_decode * len(out.decode)
        for ch in out.prefill:
            sched.prefilled(ch)
            if ch.is_last:
                ch.seq.output_ids.append(0)
                requests[ch.seq.request_id].first = now
        for seq in out.decode:
            sched.decoded(seq)
            seq.output_ids.append(0)
        for seq in [s for s in sched.running if s.num_output >= new_tokens]:
            sched.finish(seq, FinishReason.LENGTH, now)
            r = requests[seq.request_id]
            r.end = now
            if r.index + 1 < per_client:
                heapq.heappush(arrivals, (now, r.client, r.index + 1))
    done = list(requests.values())
    return SimResult(done, max(r.end for r in done))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests-per-client", type=int, default=6)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--budgets", default="64,128,192,256,384", help="token budgets per step (max_batched_tokens) to compare")
    p.add_argument("--base-ms", type=float, default=30.0, help="fixed cost of a step")
    p.add_argument("--per-token-ms", type=float, default=1.0, help="cost per padded token of a step")
    p.add_argument("--seeds", type=int, default=4, help="workloads (prompt-length draws) averaged per budget")
    p.add_argument("--prefill-first", action="store_true", help="running sequences wait while prompts prefill")
    p.add_argument("--stagger", default="0", help="stagger_tokens (--stagger-tokens) to compare, comma-separated")
    p.add_argument("--prefix-tokens", type=int, default=0, help="a prefix every prompt shares (prefix caching on)")
    p.add_argument("--lo", type=int, default=16, help="shortest prompt (past the prefix)")
    p.add_argument("--hi", type=int, default=512, help="longest prompt (past the prefix)")
    p.add_argument("--decode-ms", type=float, help="cost of a decode row (default: --per-token-ms)")
    p.add_argument("--no-pad", dest="pad", action="store_false", help="passes are not padded to a token bucket")
    a = p.parse_args(argv)
    print(f"{a.clients} clients x {a.requests_per_client} requests, {a.new_tokens} new tokens, prompts "
          f"{a.prefix_tokens} shared + {a.lo}-{a.hi}; step = {a.base_ms:g} ms + {a.per_token_ms:g} ms/token"
          f"{f' + {a.decode_ms:g} ms/decode row' if a.decode_ms is not None else ''}; mean of {a.seeds} workloads")
    print(f"{'budget':>6} {'stagger':>7} {'tok/s':>7} {'TTFT p50':>9} {'p99':>6} {'steady p50':>11} "
          f"{'steady p99':>11} {'first-wave max':>15}")
    for budget in (int(x) for x in a.budgets.split(",")):
        for stagger in (int(x) for x in a.stagger.split(",")):
            rows = []
            for seed in range(a.seeds):
                r = simulate(clients=a.clients, per_client=a.requests_per_client, new_tokens=a.new_tokens,
                             budget=budget, base=a.base_ms / 1e3, per_token=a.per_token_ms / 1e3, seed=seed,
                             prefill_first=a.prefill_first, stagger=stagger, lo=a.lo, hi=a.hi,
                             prefix=a.prefix_tokens, pad=a.pad,
                             per_decode=None if a.decode_ms is None else a.decode_ms / 1e3)
                first = [q.first - q.sent for q in r.requests if q.index == 0]
                steady = r.ttft(steady=True)
                rows.append((r.tokens_per_s(a.new_tokens), np.percentile(r.ttft(), 50),
                             np.percentile(r.ttft(), 99), np.percentile(steady, 50), np.percentile(steady, 99),
                             max(first)))
            m = np.mean(rows, axis=0)
            print(f"{budget:6d} {stagger:7d} {m[0]:7.1f} {m[1]:8.2f}s {m[2]:5.2f}s {m[3]:10.2f}s {m[4]:10.2f}s "
                  f"{m[5]:14.2f}s")


if __name__ == "__main__":
    main()
