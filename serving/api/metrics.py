"""Prometheus metrics: one CollectorRegistry per app, fed by the engine's stats hooks and the error handler.

Names follow Prometheus conventions (prefix `gpt2_`, base units, `_total` on counters, no request ids in labels)
and mirror vLLM's / TGI's metrics. Knows prometheus_client and the engine's `Sequence`; nothing of FastAPI.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from ..engine.sequence import FinishReason, Sequence
from ..engine.stats import EngineStats

_LATENCY = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_SUCCESS = {FinishReason.LENGTH, FinishReason.EOS, FinishReason.STOP, FinishReason.STOP_TOKEN}

# `*_created` series double the output and no dashboard of these servers uses them.
disable_created_metrics()


class Metrics(EngineStats):
    def __init__(self, *, max_batch_size: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.num_slots = max_batch_size
        self.running = Gauge("gpt2_requests_running", "Requests holding a KV-cache slot (prefilling or decoding).",
                             registry=r)
        self.waiting = Gauge("gpt2_requests_waiting", "Requests waiting for a KV-cache slot (waiting requests beyond "
                             "the free slots).", registry=r)
        self.slots_used = Gauge("gpt2_kv_cache_slots_used", "KV-cache slots in use.", registry=r)
        self.slots_total = Gauge("gpt2_kv_cache_slots_total", "KV-cache slots.", registry=r)
        self.kv_usage = Gauge("gpt2_kv_cache_usage_ratio", "Fraction of KV-cache slots in use (0-1).", registry=r)
        self.prompt_tokens = Counter("gpt2_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.generation_tokens = Counter("gpt2_generation_tokens", "Tokens generated.", registry=r)
        # vLLM's prefix_cache_queries / prefix_cache_hits: prompt tokens looked up, and found (not computed).
        self.prefix_queries = Counter("gpt2_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                      registry=r)
        self.prefix_hits = Counter("gpt2_prefix_cache_hits", "Prompt tokens found in the prefix cache (not computed).",
                                   registry=r)
        self.success = Counter(
            "gpt2_request_success", "Requests finished normally, by finish reason.", ["finish_reason"], registry=r
        )
        self.failure = Counter(
            "gpt2_request_failure",
            "Requests that did not finish normally (aborted, queue_timeout, error, overloaded, unavailable, "
            "validation, ...).",
            ["reason"],
            registry=r,
        )
        self.ttft = Histogram("gpt2_time_to_first_token_seconds", "Time from arrival to the first token.",
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("gpt2_inter_token_latency_seconds", "Time between consecutive tokens of a request.",
                             buckets=_LATENCY, registry=r)
        self.e2e = Histogram("gpt2_e2e_request_latency_seconds", "Time from arrival to the last token.",
                             buckets=_LATENCY, registry=r)
        self.queue_time = Histogram("gpt2_request_queue_time_seconds",
                                    "Time from arrival to start: waiting for a KV-cache slot, or held back a step "
                                    "or two by --stagger-tokens.", buckets=_LATENCY, registry=r)
        self.prefill_time = Histogram("gpt2_request_prefill_time_seconds",
                                      "Time from getting a slot to the first token.", buckets=_LATENCY, registry=r)
        self.decode_time = Histogram("gpt2_request_decode_time_seconds", "Time from the first to the last token.",
                                     buckets=_LATENCY, registry=r)
        self.step_time = Histogram("gpt2_step_duration_seconds", "Duration of one model step, by phase.",
                                   ["phase"], buckets=_LATENCY, registry=r)
        # Every size up to 16, then powers of two: "did a step run all 16?" is answerable exactly.
        batch_buckets = sorted({1, 2, 4, 8, 16, 32, 64, 128, max_batch_size} | set(range(1, 17)))
        self.batch_size = Histogram("gpt2_batch_size", "Sequences decoded per decode step.",
                                    buckets=[b for b in batch_buckets if b <= max_batch_size], registry=r)
        self.batch_current = Gauge("gpt2_batch_current_size", "Sequences in the last decode step.", registry=r)
        self.prefill_rows = Histogram("gpt2_prefill_batch_size", "Prompts prefilled per prefill step.",
                                      buckets=[b for b in batch_buckets if b <= max_batch_size], registry=r)
        self.slots_total.set(max_batch_size)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ---- EngineStats ---------------------------------------------------------------------------------------

    def on_queue(self, scheduler) -> None:
        running = scheduler.num_running
        if running == 0:
            self.batch_current.set(0)  # idle: no step runs to report it
        self.running.set(running)
        # Not the whole queue: a short prompt the stagger holds back for a step or two while slots are free is not
        # waiting for capacity, and this gauge is what the autoscaler scales on (docs/DEPLOY.md).
        self.waiting.set(max(0, scheduler.num_waiting - scheduler.num_free_slots))
        self.slots_used.set(running)
        self.kv_usage.set(running / self.num_slots)

    def on_step(self, *, prefill_rows, prefill_tokens, decode_rows, step_time) -> None:
        # One pass per step: "prefill" when it computed prompt tokens (decode tokens may ride along), else "decode".
        if prefill_rows:
            self.prefill_rows.observe(prefill_rows)
        if decode_rows:
            self.batch_size.observe(decode_rows)
        self.step_time.labels("prefill" if prefill_rows else "decode").observe(step_time)
        self.batch_current.set(decode_rows)

    def on_prompt_tokens(self, n: int) -> None:
        self.prompt_tokens.inc(n)

    def on_prefix_cache(self, queries: int, hits: int) -> None:
        self.prefix_queries.inc(queries)
        self.prefix_hits.inc(hits)

    def on_token(self, seq: Sequence, now: float) -> None:
        self.generation_tokens.inc()
        if seq.last_token_time is None:
            self.ttft.observe(now - seq.arrival_time)
        else:
            self.itl.observe(now - seq.last_token_time)

    def on_finish(self, seq: Sequence) -> None:
        reason = seq.finish_reason
        if reason in _SUCCESS:
            self.success.labels(reason.value).inc()
            end = seq.finish_time or 0.0
            self.e2e.observe(end - seq.arrival_time)
            if seq.scheduled_time is not None:
                self.queue_time.observe(seq.scheduled_time - seq.arrival_time)
                first = seq.first_token_time or end
                self.prefill_time.observe(first - seq.scheduled_time)
                self.decode_time.observe(end - first)
        else:
            self.failure.labels(reason.value if reason else "error").inc()

    def on_rejected(self, reason: str) -> None:
        self.failure.labels(reason).inc()
