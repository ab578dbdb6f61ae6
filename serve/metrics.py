"""The server's Prometheus metrics (prometheus-client, on a registry of the app's own).

Request and slot gauges are read from the scheduler at each scrape; token counters and latency
histograms are fed by the request handlers as events arrive (so the latencies are what a client sees,
queueing and prefill included).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "qwen2_serve"
# Seconds. A CPU decode step of a small model is ~10-100 ms; a long prefill or a queue wait many seconds.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)


class ServeMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry(auto_describe=True)
        r, p = self.registry, PREFIX
        self.requests_running = Gauge(f"{p}_requests_running", "Requests holding a decode slot", registry=r)
        self.requests_waiting = Gauge(f"{p}_requests_waiting", "Requests waiting for a decode slot", registry=r)
        self.slots_used = Gauge(f"{p}_slots_used", "Decode slots in use", registry=r)
        self.slots_total = Gauge(f"{p}_slots_total", "Decode slots (--max-batch-size)", registry=r)
        self.prompt_tokens = Counter(f"{p}_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter(f"{p}_generation_tokens", "Tokens generated", registry=r)
        self.requests_finished = Counter(
            f"{p}_requests_finished", "Requests finished, by finish reason", ["finish_reason"], registry=r
        )
        self.requests_refused = Counter(
            f"{p}_requests_refused", "Requests refused, by HTTP status", ["status"], registry=r
        )
        self.time_to_first_token = Histogram(
            f"{p}_time_to_first_token_seconds",
            "From a request's arrival to its first generated token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            f"{p}_inter_token_latency_seconds",
            "Between two consecutive generated tokens of a request",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        info = Gauge(f"{p}_model_info", "The served model", ["model"], registry=r)
        info.labels(model=model_name).set(1)

    def finished(self, reason: str) -> None:
        self.requests_finished.labels(finish_reason=reason).inc()

    def render(self, stats) -> bytes:
        """The Prometheus text exposition, gauges set from `stats` (a SchedulerStats, or None while starting)."""
        if stats is not None:
            self.requests_running.set(stats.running)
            self.requests_waiting.set(stats.waiting)
            self.slots_used.set(stats.slots_used)
            self.slots_total.set(stats.slots_total)
        return generate_latest(self.registry)
