"""Prometheus metrics of one gateway app, in a registry of its own.

A per-app :class:`prometheus_client.CollectorRegistry` keeps several apps in one
process (tests) from colliding. The expert client reports its calls through the
two hooks :meth:`GatewayMetrics.record_expert_call` and
:meth:`GatewayMetrics.record_failover`, so it never imports this module's types.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class GatewayMetrics:
    """All metrics of one gateway; every name starts with ``eaas_gateway_`` or ``eaas_expert_``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_latency_s = Histogram(
            "eaas_gateway_request_latency_seconds", "HTTP request latency",
            ["endpoint", "status"], buckets=_LATENCY_BUCKETS_S, registry=r,
        )
        self.ttft_s = Histogram(
            "eaas_gateway_time_to_first_token_seconds", "time from arrival to the first generated token",
            ["model"], buckets=_LATENCY_BUCKETS_S, registry=r,
        )
        self.prompt_tokens = Counter("eaas_gateway_prompt_tokens", "prompt tokens received", ["model"], registry=r)
        self.prefills = Counter(
            "eaas_gateway_prefills", "prefill forward passes (one per prompt, however many choices n it has)",
            ["model"], registry=r)
        self.completion_tokens = Counter(
            "eaas_gateway_completion_tokens", "tokens generated", ["model"], registry=r
        )
        self.batch_size = Histogram(
            "eaas_gateway_batch_size", "sequences sharing one decode forward pass",
            ["model"], buckets=_BATCH_BUCKETS, registry=r,
        )
        self.running_sequences = Gauge(
            "eaas_gateway_running_sequences", "sequences being decoded", ["model"], registry=r
        )
        self.waiting_sequences = Gauge(
            "eaas_gateway_waiting_sequences", "sequences waiting for a batch slot", ["model"], registry=r
        )
        self.sequences_finished = Counter(
            "eaas_gateway_sequences_finished", "sequences ended, by reason (stop, length, cancelled, error)",
            ["model", "reason"], registry=r,
        )
        self.expert_calls = Counter(
            "eaas_expert_calls", "expert function calls sent to workers (one per expert per request)",
            ["model"], registry=r,
        )
        self.expert_failovers = Counter(
            "eaas_expert_failovers", "expert function calls re-sent to another replica", ["model"], registry=r
        )
        self.cancellations = Counter(
            "eaas_gateway_cancellations", "requests cancelled because the client went away, by endpoint",
            ["endpoint"], registry=r,
        )
        self.rejected = Counter(
            "eaas_gateway_rejected", "requests refused with 429 because the waiting queue was full",
            ["model"], registry=r,
        )
        self.pool_workers = Gauge(
            "eaas_pool_workers", "expert workers of the model seen by this gateway, by state (ready, draining)",
            ["model", "state"], registry=r,
        )
        self.pool_min_replicas = Gauge(
            "eaas_pool_min_replicas", "fewest ready replicas of any function of the model (0: some cannot be served)",
            ["model"], registry=r,
        )
        self._pool_view: Any = None

    # --- hooks for the expert client -------------------------------------------------

    def record_expert_call(self, n: int, model: str) -> None:
        """Count ``n`` expert function calls of ``model`` sent to workers."""
        self.expert_calls.labels(model=model).inc(n)

    def record_failover(self, n: int, model: str) -> None:
        """Count ``n`` expert function calls of ``model`` re-sent to another replica."""
        self.expert_failovers.labels(model=model).inc(n)

    def record_cancellation(self, endpoint: str) -> None:
        """Count one request cancelled because its client disconnected."""
        self.cancellations.labels(endpoint=endpoint).inc()

    def bind_pool(self, view: Any) -> None:
        """Export the pool seen by an expert client: ``view()`` returns
        ``{"model": str, "ready": int, "draining": int, "min_replicas": int}`` (read at each scrape)."""
        self._pool_view = view

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry (pool gauges refreshed first)."""
        if self._pool_view is not None:
            view = self._pool_view()
            for state in ("ready", "draining"):
                self.pool_workers.labels(model=view["model"], state=state).set(view[state])
            self.pool_min_replicas.labels(model=view["model"]).set(view["min_replicas"])
        return generate_latest(self.registry)
