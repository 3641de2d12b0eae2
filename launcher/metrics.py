"""Prometheus metrics of the server, named as vLLM names them (vllm:* -> pagedeploy:*).

A private CollectorRegistry keeps two servers in one process (tests) from colliding and keeps the
default process/GC collectors out of /metrics. Gauges and engine counters are written by the engine
thread only; prometheus_client's metric objects are thread-safe, so /metrics reads them from the
event loop without a lock.
"""
from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pagedeploy.runtime.outputs import EngineStats

PREFIX = "pagedeploy:"

# The bucket edges vLLM uses, so dashboards built for vLLM read ours unchanged.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]


@dataclass
class _CounterTotals:
    """Last cumulative values read from EngineStats; counters advance by the difference."""
    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        labels = ["model_name"]

        def gauge(name, doc):
            return Gauge(PREFIX + name, doc, labels, registry=self.registry).labels(model_name)

        def counter(name, doc):
            return Counter(PREFIX + name, doc, labels, registry=self.registry).labels(model_name)

        def histogram(name, doc, buckets):
            return Histogram(PREFIX + name, doc, labels, buckets=buckets,
                             registry=self.registry).labels(model_name)

        self.num_requests_running = gauge("num_requests_running", "Requests in the running batch.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).")
        self.num_requests_swapped = gauge("num_requests_swapped", "Requests whose KV blocks are in the CPU swap pool.")
        self.cpu_cache_usage = gauge("cpu_cache_usage_perc", "Fraction of CPU swap-pool blocks in use (0..1).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.preemptions = counter("num_preemptions", "Sequences preempted for lack of KV blocks.")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between output tokens.", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Request latency, arrival to finish.",
                             E2E_BUCKETS)
        self._success = Counter(PREFIX + "request_success", "Finished requests by finish reason.",
                                ["model_name", "finished_reason"], registry=self.registry)
        self._model_name = model_name
        self._totals = _CounterTotals()

    def update_engine(self, stats: EngineStats) -> None:
        """Copy one EngineStats snapshot in (engine thread only)."""
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        self.kv_cache_usage.set(stats.kv_usage)
        self.num_requests_swapped.set(stats.num_swapped)
        self.cpu_cache_usage.set(stats.num_swapped_blocks / stats.num_swap_blocks if stats.num_swap_blocks else 0.0)
        # Counters only move forward: advance each by what the engine added since the last snapshot.
        for field_name, counter, now in (
                ("prompt_tokens", self.prompt_tokens, stats.prompt_tokens_total),
                ("generation_tokens", self.generation_tokens, stats.generation_tokens_total),
                ("preemptions", self.preemptions, stats.preemptions),
                ("prefix_queries", self.prefix_queries, stats.prefix_queries),
                ("prefix_hits", self.prefix_hits, stats.prefix_hits)):
            seen = getattr(self._totals, field_name)
            if now > seen:
                counter.inc(now - seen)
                setattr(self._totals, field_name, now)

    def observe_finished(self, finish_reason: str, e2e_seconds: float) -> None:
        self._success.labels(self._model_name, finish_reason).inc()
        self.e2e.observe(e2e_seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
