"""``eaas bench failover``: throughput and recovery pause under worker kills, with an error bar.

One fresh ``eaas up`` (private Redis, tiny Mixtral, autoscaler on, every expert on
``>= 2`` replicas) serves a closed-loop *streamed* load — ``concurrency`` clients each
sending the same completion (``max_tokens`` tokens, ``ignore_eos``) back to back — in
``rounds`` pairs of adjacent windows: a baseline window, then a window in which a
:class:`~eaas.bench.harness.FaultInjector` SIGKILLs one random ready worker
``kill_at_s`` in (only while the pool is at full size, so every expert keeps a
replica; the autoscaler replaces the victim before the next pair). Tokens are counted
by arrival time. Reported: the loss as the median of the per-pair losses with a
distribution-free 95 % interval, the recovery pause (the longest token gap of the
streams in flight at each kill, against the same offset without one), failed
requests and p99 latency. The EaaS paper reports < 2 % loss under failures.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from eaas.bench.harness import FaultInjector, Kill, UpProcess, ready_workers, wait_pool_size
from eaas.bench.stats import max_token_gap, median_ci

log = logging.getLogger(__name__)

PROMPT = "The expert said"


# --- the load ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """One request: start and end (unix s), success, HTTP status (0: transport error), output tokens,
    and (streamed requests) the arrival time of each token (unix s)."""

    start_s: float
    end_s: float
    ok: bool
    status: int
    tokens: int
    token_times: tuple[float, ...] = ()


def closed_loop(url: str, *, concurrency: int, duration_s: float, max_tokens: int, prompt: str = PROMPT,
                headers: dict[str, str] | None = None, timeout_s: float = 120.0, stream: bool = False,
                model: str | None = None) -> list[Sample]:  # fmt: skip
    """``concurrency`` clients sending the same completion back to back for ``duration_s``.

    ``model``: the model to ask (default: the first one ``/v1/models`` lists).

    A request started before the end is waited for (at most ``timeout_s``). With
    ``stream`` the completions are streamed (SSE) and each token's arrival is recorded.
    """
    import httpx

    if model is None:
        model = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    samples: list[Sample] = []
    lock = threading.Lock()
    end_at = time.time() + duration_s

    def one_streamed(c: Any, i: int) -> tuple[bool, int, int, tuple[float, ...]]:
        times: list[float] = []
        with c.stream("POST", f"{url}/v1/completions", json={**body, "prompt": f"{prompt} {i}", "stream": True}) as r:
            if r.status_code != 200:
                r.read()
                return False, r.status_code, 0, ()
            failed = False
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    failed = True
                    continue
                now = time.time()
                for ch in chunk.get("choices", []):
                    times.extend([now] * len(ch.get("token_ids") or []))
        return not failed and len(times) == max_tokens, 200, len(times), tuple(times)

    def client(i: int) -> None:
        with httpx.Client(timeout=timeout_s, headers=headers) as c:
            while time.time() < end_at:
                t0 = time.time()
                times: tuple[float, ...] = ()
                try:
                    if stream:
                        ok, status, tokens, times = one_streamed(c, i)
                    else:
                        r = c.post(f"{url}/v1/completions", json={**body, "prompt": f"{prompt} {i}"})
                        ok = r.status_code == 200
                        tokens = r.json()["usage"]["completion_tokens"] if ok else 0
                        status = r.status_code
                except (httpx.HTTPError, ValueError, KeyError):
                    ok, tokens, status = False, 0, 0
                with lock:
                    samples.append(Sample(t0, time.time(), ok, status, tokens, times))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration_s + timeout_s + 5)
    return sorted(samples, key=lambda s: s.end_s)


# --- the benchmark -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FailoverBenchConfig:
    """Knobs of ``eaas bench failover`` (durations in seconds).

    ``rounds`` pairs of adjacent windows of ``window_s`` each — a baseline window,
    then a fault window with one SIGKILL ``kill_at_s`` into it — under the same
    closed-loop streamed load. Pairing adjacent windows cancels most of the drift of
    a noisy machine; the loss is reported as the median of the per-round losses
    with a distribution-free 95 % interval (:func:`eaas.bench.stats.median_ci`).
    """

    rounds: int = 6
    window_s: float = 12.0
    kill_at_s: float = 3.0
    concurrency: int = 8
    max_tokens: int = 32
    workers: int = 3
    replicas: int = 2
    warmup_s: float = 5.0
    recover_timeout_s: float = 120.0
    seed: int = 0


def _timeline(samples: list[Sample], t0_s: float, duration_s: float, bin_s: float = 1.0) -> list[tuple[float, float, float]]:
    """(t since window start, tokens/s, p99 latency ms) per ``bin_s`` bin: tokens by arrival time,
    latency by request end time."""
    import numpy as np

    out = []
    for b in range(max(1, int(duration_s // bin_s))):
        lo, hi = t0_s + b * bin_s, t0_s + (b + 1) * bin_s
        tokens = sum(1 for smp in samples for t in smp.token_times if lo <= t < hi)
        lat = [(smp.end_s - smp.start_s) * 1000 for smp in samples if lo <= smp.end_s < hi and smp.ok]
        out.append((b * bin_s + bin_s / 2, tokens / bin_s, float(np.percentile(lat, 99)) if lat else float("nan")))
    return out


def _window(samples: list[Sample], t0_s: float, window_s: float, mark_s: float) -> dict[str, float]:
    """Tokens/s of the tokens arriving in ``[t0_s, t0_s + window_s]``, latency, failures, and the
    longest token gap of the streams in flight at ``mark_s`` (the kill, or the same offset in a baseline)."""
    import numpy as np

    t1 = t0_s + window_s
    tokens = sum(1 for smp in samples for t in smp.token_times if t0_s <= t <= t1)
    done = [smp for smp in samples if t0_s <= smp.end_s <= t1]
    ok_lat = np.array([(smp.end_s - smp.start_s) * 1000 for smp in done if smp.ok]) if done else np.zeros(1)
    around = [smp for smp in samples if smp.start_s <= mark_s <= smp.end_s]
    gap = max((max_token_gap(smp.start_s, smp.token_times, smp.end_s) for smp in around), default=0.0)
    return {"tokens_per_s": tokens / window_s, "requests": len(done),
            "failed_requests": sum(1 for smp in samples if not smp.ok),
            "p50_ms": float(np.percentile(ok_lat, 50)) if ok_lat.size else 0.0,
            "p99_ms": float(np.percentile(ok_lat, 99)) if ok_lat.size else 0.0,
            "max_ms": float(ok_lat.max()) if ok_lat.size else 0.0,
            "max_token_gap_s": gap}


def run_failover_bench(cfg: FailoverBenchConfig, *, workdir: Path | None = None,
                       progress: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:  # fmt: skip
    """Run ``cfg.rounds`` paired baseline/fault windows against one fresh ``eaas up``.

    Returns the JSON-ready result: ``summary`` (throughputs, ``throughput_loss_fraction``
    of the pooled windows, ``loss_median``, ``loss_ci95`` [low, high], ``max_token_gap_s``
    at the kills and ``max_token_gap_baseline_s`` at the same offsets without one, failed
    requests, p99), ``phases`` (pooled baseline / kills), ``rounds`` (each pair),
    ``timelines`` and ``kills``.

    Raises:
        FailoverBenchError: the deployment did not start or did not get back to its size.
        ConfigError: ``replicas < 2`` (a kill would lose requests by design), or a kill
            offset outside the window.
    """
    from eaas.errors import ConfigError

    if cfg.replicas < 2 or cfg.workers < cfg.replicas:
        raise ConfigError(f"failover needs replicas >= 2 and workers >= replicas (got workers={cfg.workers}, replicas={cfg.replicas})")
    if not 0 < cfg.kill_at_s < cfg.window_s or cfg.rounds < 1:
        raise ConfigError(f"need rounds >= 1 and 0 < kill_at_s < window_s (got {cfg.rounds}, {cfg.kill_at_s}, {cfg.window_s})")
    tmp = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="eaas-failover-"))
    rounds: list[dict[str, Any]] = []
    kills: list[Kill] = []
    bins: dict[str, list[list[tuple[float, float, float]]]] = {"baseline": [], "kills": []}
    progress(f"starting eaas up ({cfg.workers} workers, replicas {cfg.replicas}) in {tmp}")
    with UpProcess(tmp, workers=cfg.workers, replicas=cfg.replicas, autoscale=True) as up:
        reg = up.registry()
        size = len(ready_workers(reg))
        progress("warm-up")
        closed_loop(up.url, concurrency=cfg.concurrency, duration_s=cfg.warmup_s, max_tokens=cfg.max_tokens, stream=True)
        rng = random.Random(cfg.seed)
        for r in range(cfg.rounds):
            pair: dict[str, Any] = {}
            for phase in ("baseline", "kills"):
                wait_pool_size(reg, size, cfg.recover_timeout_s)
                progress(f"round {r + 1}/{cfg.rounds}: {phase} window, {cfg.window_s:g}s")
                t0 = time.time()
                inj = None
                if phase == "kills":
                    inj = FaultInjector(reg, interval_s=cfg.kill_at_s, max_kills=1, min_ready=size,
                                        seed=rng.randrange(1 << 30)).start(until_s=t0 + cfg.window_s - 1)  # fmt: skip
                samples = closed_loop(up.url, concurrency=cfg.concurrency, duration_s=cfg.window_s,
                                      max_tokens=cfg.max_tokens, stream=True)  # fmt: skip
                mark = t0 + cfg.kill_at_s
                if inj is not None:
                    got = inj.stop()
                    kills.extend(got)
                    mark = got[0].at_s if got else mark
                pair[phase] = _window(samples, t0, cfg.window_s, mark)
                bins[phase].append(_timeline(samples, t0, cfg.window_s))
            b, k = pair["baseline"]["tokens_per_s"], pair["kills"]["tokens_per_s"]
            pair["loss"] = 1.0 - k / b if b > 0 else float("nan")
            rounds.append(pair)
        progress("waiting for the pool to get back to its size")
        recovered_s = wait_pool_size(reg, size, cfg.recover_timeout_s)
        rc = up.stop()
    return _result(cfg, rounds, kills, bins, size, recovered_s, rc, tmp)


def _result(cfg: FailoverBenchConfig, rounds: list[dict[str, Any]], kills: list[Kill],
            bins: dict[str, list[list[tuple[float, float, float]]]], size: int, recovered_s: float,
            rc: int | None, tmp: Path) -> dict[str, Any]:
    """Assemble the JSON result from the rounds (pure)."""
    phases: dict[str, dict[str, Any]] = {}
    for name in ("baseline", "kills"):
        ws = [r[name] for r in rounds]
        phases[name] = {
            "tokens_per_s": sum(w["tokens_per_s"] for w in ws) / len(ws),
            "requests_per_s": sum(w["requests"] for w in ws) / (len(ws) * cfg.window_s),
            "failed_requests": sum(w["failed_requests"] for w in ws),
            "p50_ms": max(w["p50_ms"] for w in ws), "p99_ms": max(w["p99_ms"] for w in ws),
            "max_ms": max(w["max_ms"] for w in ws), "max_token_gap_s": max(w["max_token_gap_s"] for w in ws),
        }  # fmt: skip
    phases["kills"]["kill_offsets_s"] = [cfg.kill_at_s]
    losses = [r["loss"] for r in rounds if math.isfinite(r["loss"])]
    med, (lo, hi), cov = median_ci(losses) if losses else (float("nan"), (float("nan"), float("nan")), 0.0)
    base, fault = phases["baseline"], phases["kills"]
    pooled = 1.0 - fault["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] > 0 else float("nan")
    timelines = {name: [[round(sum(col) / len(col), 2) for col in zip(*rows)] for rows in zip(*bins[name])]
                 for name in bins}  # mean over rounds, bin by bin
    return {
        "benchmark": "failover",
        "config": {**asdict(cfg), "pool_size": size, "cpu_count": os.cpu_count(), "paper_loss_fraction": 0.02,
                   "throughput_unit": "output tokens/s", "up_exit_code": rc, "workdir": str(tmp),
                   "duration_s": cfg.window_s, "ci_method": "median, order-statistic (binomial) interval"},
        "summary": {
            "throughput_baseline": round(base["tokens_per_s"], 2),
            "throughput_with_kills": round(fault["tokens_per_s"], 2),
            "throughput_loss_fraction": round(pooled, 4),
            "loss_median": round(med, 4),
            "loss_ci95": [round(lo, 4), round(hi, 4)],
            "loss_ci_coverage": round(cov, 4),
            "max_token_gap_s": round(fault["max_token_gap_s"], 3),
            "max_token_gap_baseline_s": round(base["max_token_gap_s"], 3),
            "failed_requests": int(base["failed_requests"] + fault["failed_requests"]),
            "kills": len(kills),
            "rounds": len(rounds),
            "p99_ms": round(fault["p99_ms"], 1),
            "p99_ms_baseline": round(base["p99_ms"], 1),
            "pool_recovered_after_s": round(recovered_s, 1),
        },
        "phases": phases,
        "rounds": [{"loss": round(r["loss"], 4), "baseline": r["baseline"], "kills": r["kills"]} for r in rounds],
        "timelines": timelines,
        "kills": [asdict(k) for k in kills],
    }


def summary_table(result: dict[str, Any]) -> Any:
    """A rich table of both phases and the loss."""
    from rich.table import Table

    s, p = result["summary"], result["phases"]
    t = Table(title=f"eaas bench failover — {s['rounds']} rounds of {result['config']['window_s']:g}s baseline + "
                    f"{result['config']['window_s']:g}s with one SIGKILL, concurrency "
                    f"{result['config']['concurrency']}, streamed")  # fmt: skip
    for col in ("phase", "tokens/s", "requests/s", "failed", "p50 ms", "p99 ms", "max ms"):
        t.add_column(col, justify="right")
    t.add_column("max token gap s", justify="right")
    for name in ("baseline", "kills"):
        ph = p[name]
        t.add_row(name, f"{ph['tokens_per_s']:.1f}", f"{ph['requests_per_s']:.2f}", str(ph["failed_requests"]),
                  f"{ph['p50_ms']:.0f}", f"{ph['p99_ms']:.0f}", f"{ph['max_ms']:.0f}",
                  f"{ph['max_token_gap_s']:.3f}")  # fmt: skip
    lo, hi = s["loss_ci95"]
    t.caption = (f"loss: median {s['loss_median'] * 100:.2f} % over {s['rounds']} paired rounds, "
                 f"95 % interval [{lo * 100:.2f}, {hi * 100:.2f}] % (coverage {s['loss_ci_coverage']:.3f}; "
                 f"paper: < 2 %); recovery pause {s['max_token_gap_s']:.3f} s at the kills vs "
                 f"{s['max_token_gap_baseline_s']:.3f} s without; failed requests {s['failed_requests']}")  # fmt: skip
    return t


def plot(result: dict[str, Any], path: Path) -> None:
    """Tokens/s and p99 latency over time for both phases, kill moments marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for name, style in (("baseline", "-"), ("kills", "-")):
        rows = result["timelines"][name]
        ts = [r[0] for r in rows]
        ax1.plot(ts, [r[1] for r in rows], style, label=name)
        ax2.plot(ts, [r[2] for r in rows], style, label=name)
    for off in result["phases"]["kills"].get("kill_offsets_s", []):
        for ax in (ax1, ax2):
            ax.axvline(off, color="red", linestyle="--", alpha=0.6)
    s = result["summary"]
    ax1.set_ylabel("output tokens/s")
    lo, hi = s["loss_ci95"]
    ax1.set_title(f"failover: loss median {s['loss_median'] * 100:.2f} % [{lo * 100:.1f}, {hi * 100:.1f}] "
                  f"(paper < 2 %), pause {s['max_token_gap_s']:.2f} s, mean of {s['rounds']} rounds")  # fmt: skip
    ax1.legend()
    ax2.set_ylabel("p99 latency (ms)")
    ax2.set_xlabel("time since window start (s); red: the kill")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
