"""Live mode of ``eaas bench autoscale``: the whole system on this machine, a short trace.

Private Redis (loopback), a tiny Mixtral, a :class:`LocalPool`, the live
:class:`Autoscaler` and open-loop load through :class:`ExpertClient`s. Honest
about what it is: on a 2-core machine clients, workers and the autoscaler share
the CPUs, so a second worker adds little capacity; the run proves the mechanism
end to end and measures a worker's real start-up time and capacity (the
numbers ``--simulate`` takes as ``--startup-s`` / ``--capacity-tokens-per-s``).

Measured here: start-up (launch -> ready in the registry), capacity (tokens/s
one client gets from one worker, closed loop), per-request latency from its
scheduled arrival (client-side queueing included), failures, and workers alive
over time (worker-seconds). The static baseline is *computed* (peak replicas x
duration), not run: its latency fields are ``None``.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eaas.bench.harness import Stack, local_stack
from eaas.functions import write_tiny_checkpoint
from eaas.platform.autoscale.config import AutoscalerConfig
from eaas.platform.autoscale.mechanism import Autoscaler
from eaas.platform.autoscale.simulate import PAPER_SAVED_FRACTION
from eaas.platform.autoscale.traces import TraceSpec, make_trace
from eaas.registry.records import WorkerState
from eaas.testing import wait_for

log = logging.getLogger(__name__)

CAPACITY_PROBE_S = 3.0  # closed-loop probe of one worker
SAMPLE_S = 0.5  # timeline / worker-seconds sampling period
MAX_DRAIN_AFTER_TRACE_S = 20.0  # bound on waiting for the last requests


def _probe_capacity(st: Stack, client: Any, fids: list[str], hidden: int, tokens_per_request: int,
                    seed: int) -> tuple[float, float]:
    """One worker's closed-loop capacity (tokens/s) and the busy fraction its heartbeat shows at it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens_per_request, hidden, generator=g)
    n_tok, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < CAPACITY_PROBE_S:
        client.invoke(fids[n_tok // tokens_per_request % len(fids)], x)
        n_tok += tokens_per_request
    capacity = n_tok / (time.monotonic() - t0)
    busy = [w.busy_fraction for w in st.registry.workers(st.model)]
    # the probe's busy heartbeats must not start the trace as "load"
    wait_for(lambda: all(w.busy_fraction < 0.05 for w in st.registry.workers(st.model)), timeout_s=5.0)
    return capacity, (max(busy) if busy else 0.1)


def _replay(trace: Any, clients: list[Any], fids: list[str], hidden: int, st: Stack, scaler: Autoscaler,
            capacity: float, duration_s: float) -> tuple[np.ndarray, list[str], list[dict[str, Any]], float]:
    """Open-loop replay of ``trace`` through ``clients``; samples the pool every ``SAMPLE_S``.

    Returns (latency per request in s, inf when failed; failure examples; timeline; worker-seconds).
    """
    work: queue.Queue[tuple[float, int, int] | None] = queue.Queue()
    latency = np.full(trace.num_requests, np.inf)
    failures: list[str] = []

    def serve(client: Any) -> None:
        while (item := work.get()) is not None:
            i, (due, f, n) = item[0], item[1:]
            try:
                client.invoke(fids[f], torch.randn(n, hidden))
                latency[i] = time.monotonic() - due
            except Exception as e:  # noqa: BLE001 - counted as a failed request
                failures.append(repr(e))

    threads = [threading.Thread(target=serve, args=(c,), daemon=True) for c in clients]
    for t in threads:
        t.start()
    timeline: list[dict[str, Any]] = []
    start = time.monotonic()
    next_sample, k, worker_s = start, 0, 0.0
    while k < trace.num_requests or time.monotonic() < start + duration_s:
        now = time.monotonic()
        while k < trace.num_requests and start + trace.arrival_s[k] <= now:
            work.put((k, start + float(trace.arrival_s[k]), int(trace.function[k]), int(trace.tokens[k])))  # type: ignore[arg-type]
            k += 1
        if now >= next_sample:
            members = st.pool.workers(st.model)
            timeline.append(_sample(trace, members, scaler, now - start, capacity))
            worker_s += len(members) * SAMPLE_S
            next_sample += SAMPLE_S
        time.sleep(min(0.005, max(0.0, next_sample - time.monotonic())))
    for _ in threads:
        work.put(None)
    for t in threads:
        t.join(timeout=MAX_DRAIN_AFTER_TRACE_S)
    return latency, failures, timeline, worker_s


def _sample(trace: Any, members: list[Any], scaler: Autoscaler, t_s: float, capacity: float) -> dict[str, Any]:
    """One timeline point: offered load, the ideal and the smoothed replica counts, the pool by state."""
    states = [m.state for m in members]
    window = (trace.arrival_s >= t_s - SAMPLE_S) & (trace.arrival_s < t_s)
    offered = float(trace.tokens[window].sum()) / SAMPLE_S
    last = scaler.history[-1] if scaler.history else None
    return {"t_s": round(t_s, 2), "offered_tokens_per_s": round(offered, 1),
            "ideal_replicas": round(offered / capacity, 2),
            "load_replicas": None if last is None else round(last.load.get("shard-0", 0.0), 2),
            "replicas": len(members), "ready": states.count(WorkerState.READY),
            "starting": states.count(WorkerState.STARTING), "draining": states.count(WorkerState.DRAINING)}  # fmt: skip


def run_live(
    kind: str = "step",
    *,
    duration_s: float = 45.0,
    seed: int = 0,
    zipf_s: float = 0.0,
    max_replicas: int = 2,
    slo_ms: float = 250.0,
    num_clients: int = 3,
    tokens_per_request: int = 64,
) -> dict[str, Any]:
    """Run the live benchmark; returns the bench JSON object (``"mode": "live"``).

    Steps: measure one worker's start-up time and closed-loop capacity; derive the
    autoscaler's config from them; replay an open-loop trace at 80 % of that capacity at
    its peak while the autoscaler runs; count worker-seconds against a static pool sized
    for the peak.
    """
    from eaas.platform.client import ExpertClient
    from eaas.settings import get_settings

    def write(tmp: Path) -> Path:
        return write_tiny_checkpoint("mixtral", tmp / "tiny", layers=2, experts=8)

    with local_stack(write, tag="bench") as st:
        model, hidden = st.model, int(st.spec.to_dict()["hidden_size"])
        fids = st.registry.function_ids(model)
        settings = get_settings(redis_url=st.redis_url, prefix=st.registry.prefix)
        clients: list[Any] = []
        stop = threading.Event()
        try:
            t0 = time.monotonic()
            st.pool.wait_ready([st.pool.start("shard-0", "all", model)], timeout_s=120)
            startup_s = time.monotonic() - t0
            clients = [ExpertClient(st.registry, model, settings, seed=i) for i in range(num_clients)]
            capacity, busy_at_capacity = _probe_capacity(st, clients[0], fids, hidden, tokens_per_request, seed)
            # one replica is "full" at half the busy fraction it shows at capacity
            config = AutoscalerConfig(min_replicas=1, max_replicas=max_replicas, upscale_delay_s=2.0, downscale_delay_s=5.0,
                                      look_back_s=2.0, target_busy_fraction=min(1.0, max(0.01, busy_at_capacity / 2)),
                                      target_queue_tokens_per_replica=4 * tokens_per_request, metrics_stale_s=3.0)  # fmt: skip
            tspec = TraceSpec(kind=kind, duration_s=duration_s, peak_tokens_per_s=0.8 * capacity, spike_s=duration_s / 6,
                              mean_tokens_per_request=tokens_per_request, num_functions=len(fids), num_shards=1,
                              zipf_s=zipf_s, seed=seed)  # fmt: skip
            trace = make_trace(tspec)
            scaler = Autoscaler(st.registry, model, config, pool=st.pool, shards={"shard-0": "all"}, tick_s=0.5)
            threading.Thread(target=scaler.run, args=(stop,), daemon=True).start()
            latency, failures, timeline, worker_s = _replay(trace, clients, fids, hidden, st, scaler, capacity,
                                                            duration_s)  # fmt: skip
        finally:
            stop.set()
            for c in clients:
                c.close()

    done = np.isfinite(latency)
    ok = latency[done]
    peak_replicas = max((p["replicas"] for p in timeline), default=0)
    peak_load = 0.8 * busy_at_capacity / config.target_busy_fraction  # replica-equivalents at the trace's peak
    static = max(config.min_replicas, min(max_replicas, math.ceil(peak_load - 1e-9)))
    static_ws = static * duration_s
    summary = {
        "num_requests": trace.num_requests,
        "num_tokens": int(trace.tokens.sum()),
        "worker_seconds": round(worker_s, 1),
        "static_worker_seconds": round(static_ws, 1),
        "saved_fraction": round(1.0 - worker_s / static_ws, 4) if static_ws else 0.0,
        "paper_saved_fraction": PAPER_SAVED_FRACTION,
        "static_replicas": static,
        "static_measured": False,
        "static_slo_attainment": None,
        "static_p50_ms": None,
        "static_p99_ms": None,
        "static_failed_requests": None,
        "slo_ms": slo_ms,
        "slo_attainment": float(np.mean(latency <= slo_ms / 1000.0)) if trace.num_requests else 1.0,
        "p50_ms": round(float(np.percentile(ok, 50)) * 1000, 2) if ok.size else None,
        "p99_ms": round(float(np.percentile(ok, 99)) * 1000, 2) if ok.size else None,
        "failed_requests": int((~done).sum()),
        "failure_examples": failures[:3],
        "peak_replicas": peak_replicas,
        "mean_replicas": round(worker_s / duration_s, 2),
        "workers_launched": 1 + sum(len(r.started) for r in scaler.history),
        "workers_drained": sum(len(r.drained) for r in scaler.history),
        "measured_startup_s": round(startup_s, 2),
        "measured_capacity_tokens_per_s": round(capacity, 1),
        "busy_fraction_at_capacity": round(busy_at_capacity, 3),
    }
    return {
        "benchmark": "autoscale",
        "mode": "live",
        "config": {"trace": asdict(tspec), "autoscaler": config.to_dict(),
                   "live": {"num_clients": num_clients, "tokens_per_request": tokens_per_request, "tick_s": 0.5}},  # fmt: skip
        "summary": summary,
        "timeline": timeline,
    }
