"""`eaas bench balance`: live hot-expert replication under real-text load, with a moving hot set.

One run:

1. starts ``eaas up`` (default: the trained model) with ``W`` workers in shard groups
   (every expert on ``R`` of them), shard sizes pinned (``min = max`` replicas per
   group), so the only thing the autoscaler can do is place and drop extra replicas
   of hot experts on the workers (:func:`eaas.platform.autoscale.policy.plan_extra_replicas`);
2. drives closed-loop streaming completions whose prompts are drawn from the model's
   *held-out* text: the first half of the run from mix A (held-out ``pydoc_data``
   topics), the second half from mix B (held-out stdlib docstrings), so the hot set moves;
3. samples the registry every ``sample_s``: tokens each worker served per function
   since the last sample; balancedness as vLLM's EPLB logs it (per MoE layer the mean
   over the max of the tokens of the workers hosting that layer, summed over layers:
   :func:`~eaas.platform.autoscale.policy.layer_balancedness`), and also the plain
   mean / max of whole-worker tokens; the replica counts of the hottest experts; and
   every extra replica appearing on or leaving a worker (a *rebalance*);
4. records every token's arrival in every stream, so each rebalance gets the longest
   gap between two tokens of any stream in flight around it, against the run's median
   inter-token latency as the baseline.

Summary, each over its window's summed tokens (as vLLM sums its window of steps):
``balancedness_before`` (phase A before the first extra replica appears),
``balancedness_after`` (the last ``tail_s`` of phase A), ``balancedness_after_move``
(the last ``tail_s`` of phase B), ``max_token_gap_s`` (over all rebalances) and
``failed_requests``. Anchors for the gap: vLLM's synchronous expert rearrangement
stalled serving 0.65-1.7 s, SGLang's rebalance ~1.8 s.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from eaas.platform.autoscale.placement import balancedness, layer_balancedness
from eaas.registry.records import WorkerState

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BalanceBenchConfig:
    """Knobs of ``eaas bench balance``.

    Attributes:
        model_dir: checkpoint (``None``: ``eaas up``'s default, the trained model).
        workers: shard workers at start.
        replicas: replicas of every expert among them (groups = workers / replicas).
        concurrency: streams in flight (closed loop).
        max_tokens: tokens per completion.
        prompt_chars: characters of held-out text per prompt.
        phase_s: length of each phase (mix A, then mix B), seconds.
        sample_s: registry sampling period, seconds.
        tail_s: the end of each phase that counts as "after" (seconds).
        gap_window_s: half-width of the window around a rebalance in which token gaps count.
        upscale_delay_s, downscale_delay_s, look_back_s, balance_target, max_hot_replicas:
            the autoscaler's knobs for the run (``EAAS_AUTOSCALER_*``); the upscale delay is
            also the window that measures the balancedness before any extra replica.
        seed: prompt order.
    """

    model_dir: Path | None = None
    workers: int = 4
    replicas: int = 2
    concurrency: int = 4
    max_tokens: int = 32
    prompt_chars: int = 240
    phase_s: float = 75.0
    sample_s: float = 2.0
    tail_s: float = 30.0
    gap_window_s: float = 2.0
    upscale_delay_s: float = 20.0
    downscale_delay_s: float = 30.0
    look_back_s: float = 4.0
    balance_target: float = 0.9
    max_hot_replicas: int = 2
    seed: int = 0


def held_out_mixes(model_dir: Path, prompt_chars: int) -> tuple[list[str], list[str]]:
    """Prompts from the model's held-out documents: (mix A: pydoc topics, mix B: stdlib docstrings).

    The split is recomputed from ``training_report.json`` (source, fraction, seed), so
    no prompt was trained on.

    Raises:
        ConfigError: the checkpoint has no training report (not made by ``eaas checkpoint train``).
    """
    from eaas.errors import ConfigError
    from eaas.training.corpus import pydoc_topics, split_held_out, stdlib_docstrings
    from eaas.training.trainer import REPORT_JSON

    report_path = Path(model_dir) / REPORT_JSON
    if not report_path.is_file():
        raise ConfigError(f"{model_dir} has no {REPORT_JSON}: bench balance needs a model from `eaas checkpoint train`")
    cfg = json.loads(report_path.read_text())["config"]
    topics = pydoc_topics()
    docstrings = list(stdlib_docstrings()) if cfg["source"] == "topics+docstrings" else []
    _, held = split_held_out(topics + docstrings, cfg["held_out_fraction"], cfg["seed"])
    topic_set = set(topics)

    def prompts(doc: str) -> list[str]:  # up to 8 pieces of a document, each cut at a space
        out = []
        for start in range(0, min(len(doc), 8 * prompt_chars), prompt_chars):
            cut = doc[start:start + prompt_chars]
            cut = cut[: cut.rfind(" ")] if " " in cut[prompt_chars // 2:] else cut
            if len(cut.strip()) >= prompt_chars // 4:
                out.append(cut)
        return out

    mix_a = [p for d in held if d in topic_set for p in prompts(d)]
    mix_b = [p for d in held if d not in topic_set for p in prompts(d)]
    if not mix_a or not mix_b:
        raise ConfigError(f"{model_dir}: the held-out text has no {'topics' if not mix_a else 'docstrings'} to draw prompts from")
    return mix_a, mix_b


class _Streams:
    """Closed-loop streaming completions; every token's arrival time kept (monotonic seconds)."""

    def __init__(self, url: str, model: str, cfg: BalanceBenchConfig, mixes: tuple[list[str], list[str]]) -> None:
        self.url, self.model, self.cfg, self.mixes = url, model, cfg, mixes
        self.phase = 0
        self.stop = threading.Event()
        self.requests = 0
        self.failed: list[str] = []
        self.gaps: list[tuple[float, float]] = []  # (end time, gap s) between two tokens of one stream
        self.tokens = 0

    async def _one(self, client: Any, prompt: str) -> None:
        body = {"model": self.model, "prompt": prompt, "max_tokens": self.cfg.max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}
        last = None
        got = 0
        try:
            async with client.stream("POST", self.url + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    self.failed.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        self.failed.append(str(event["error"])[:200])
                        return
                    n = sum(len(c.get("token_ids") or []) for c in event.get("choices", []))
                    if n == 0:
                        continue
                    now = time.monotonic()
                    if last is not None:
                        self.gaps.append((now, now - last))
                    last = now
                    got += n
            if got == 0:
                self.failed.append("no tokens")
            self.tokens += got
        except Exception as e:  # noqa: BLE001 - every failure is counted and reported
            self.failed.append(repr(e)[:200])

    async def _user(self, client: Any, offset: int) -> None:
        i = offset
        while not self.stop.is_set():
            mix = self.mixes[self.phase]
            self.requests += 1
            await self._one(client, mix[i % len(mix)])
            i += self.cfg.concurrency

    def run(self) -> None:
        """Drive until :attr:`stop` is set (call from a thread)."""
        import httpx

        async def main() -> None:
            limits = httpx.Limits(max_connections=self.cfg.concurrency + 2)
            async with httpx.AsyncClient(timeout=120, limits=limits) as client:
                await asyncio.gather(*(self._user(client, self.cfg.seed + k) for k in range(self.cfg.concurrency)))

        asyncio.run(main())


def _sample(registry: Any, model: str, prev: dict[str, tuple[int, dict[str, int]]], base: dict[str, frozenset[str]],
            t_s: float, dt_s: float, phase: str) -> tuple[dict[str, Any], dict[str, tuple[int, dict[str, int]]]]:
    """One timeline row from the registry: per-worker tokens since ``prev``, balancedness, hot experts, extras.

    ``base`` (worker id -> the functions it started with) is filled in as workers are first seen."""
    from eaas.functions.spec import parse_function_id

    workers = registry.workers(model)
    now: dict[str, tuple[int, dict[str, int]]] = {w.id: (w.tokens_served, dict(w.function_tokens)) for w in workers}
    ready = [w for w in workers if w.state is WorkerState.READY]
    per_worker: dict[str, int] = {}
    per_layer: dict[int, dict[str, float]] = {}
    fn_delta: dict[str, int] = {}
    for w in ready:
        base.setdefault(w.id, frozenset(w.shard))
        before_total, before = prev.get(w.id, (w.tokens_served, dict(w.function_tokens)))
        per_worker[w.id] = max(0, w.tokens_served - before_total)
        for fid in w.shard:
            per_layer.setdefault(parse_function_id(fid)[1], {}).setdefault(w.id, 0.0)
        for fid, n in w.function_tokens.items():
            d = max(0, n - before.get(fid, n))
            fn_delta[fid] = fn_delta.get(fid, 0) + d
            if fid in w.shard:
                per_layer[parse_function_id(fid)[1]][w.id] += d
    top = sorted(fn_delta, key=lambda f: (-fn_delta[f], f))[:4]
    total = sum(fn_delta.values()) or 1
    busy = sum(per_worker.values()) > 0
    row = {
        "t_s": round(t_s, 2),
        "phase": phase,
        "tokens_per_worker": {wid: round(n / dt_s, 1) for wid, n in sorted(per_worker.items())},
        "balancedness": round(layer_balancedness(per_layer), 4) if busy else None,
        "layer_tokens": {str(layer): {w: int(n) for w, n in sorted(per.items())} for layer, per in sorted(per_layer.items())},
        "balancedness_workers": round(balancedness(list(per_worker.values())), 4) if busy else None,
        "top_experts": [{"function": f, "share": round(fn_delta[f] / total, 4),
                         "replicas": sum(1 for w in ready if f in w.shard)} for f in top],
        "ready": len(ready),
        "extras": {w.id: sorted(set(w.shard) - base[w.id]) for w in ready if set(w.shard) - base[w.id]},
        "draining": sorted(w.id for w in workers if w.state is WorkerState.DRAINING),
    }
    return row, now


def _events(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rebalances seen in the timeline: an extra replica appearing on a worker, or leaving it."""
    out = []
    before: dict[str, set[str]] = {}
    for r in rows:
        now = {w: set(f) for w, f in r["extras"].items()}
        for w in sorted(set(now) | set(before)):
            added, removed = now.get(w, set()) - before.get(w, set()), before.get(w, set()) - now.get(w, set())
            if added:
                out.append({"t_s": r["t_s"], "kind": "replicas added", "worker": w, "functions": sorted(added),
                            "phase": r["phase"]})
            if removed:
                out.append({"t_s": r["t_s"], "kind": "replicas removed", "worker": w, "functions": sorted(removed),
                            "phase": r["phase"]})
        before = now
    return out


def summarize(rows: list[dict[str, Any]], events: list[dict[str, Any]], gaps: list[tuple[float, float]],
              cfg: BalanceBenchConfig, failed: int, requests: int) -> dict[str, Any]:
    """The summary (pure): balancedness before / after, token gaps around rebalances, failures.

    ``gaps`` are ``(end t_s, gap s)`` on the timeline's clock.
    """
    def mean_bal(sel: list[dict[str, Any]]) -> float | None:
        """EPLB's balancedness of the window's summed tokens (per layer, per worker), as vLLM
        computes it over its window of steps; falls back to the mean of the rows' values."""
        if sel and all("layer_tokens" in r for r in sel):
            total: dict[int, dict[str, float]] = {}
            for r in sel:
                for layer, per in r["layer_tokens"].items():
                    for w, n in per.items():
                        total.setdefault(int(layer), {}).setdefault(w, 0.0)
                        total[int(layer)][w] += n
            if any(sum(per.values()) for per in total.values()):
                return round(layer_balancedness(total), 4)
        vals = [r["balancedness"] for r in sel if r["balancedness"] is not None]
        return round(statistics.fmean(vals), 4) if vals else None

    first_hot = next((e["t_s"] for e in events if e["kind"] == "replicas added" and e["phase"] == "A"), None)
    a_rows = [r for r in rows if r["phase"] == "A"]
    b_rows = [r for r in rows if r["phase"] == "B"]
    before = [r for r in a_rows[1:] if first_hot is None or r["t_s"] < first_hot]
    a_end = cfg.phase_s
    b_end = 2 * cfg.phase_s
    for e in events:
        window = [g for t, g in gaps if e["t_s"] - cfg.gap_window_s - cfg.sample_s <= t <= e["t_s"] + cfg.gap_window_s]
        e["max_token_gap_s"] = round(max(window), 4) if window else None
    all_gaps = [g for _, g in gaps]
    event_gaps = [e["max_token_gap_s"] for e in events if e["max_token_gap_s"] is not None]
    return {
        "balancedness_before": mean_bal(before),
        "balancedness_after": mean_bal([r for r in a_rows if r["t_s"] >= a_end - cfg.tail_s]),
        "balancedness_after_move": mean_bal([r for r in b_rows if r["t_s"] >= b_end - cfg.tail_s]),
        "max_token_gap_s": max(event_gaps) if event_gaps else None,
        "itl_p50_s": round(statistics.median(all_gaps), 4) if all_gaps else None,
        "itl_max_s": round(max(all_gaps), 4) if all_gaps else None,
        "rebalances": len(events),
        "failed_requests": failed,
        "requests": requests,
    }


def run_balance_bench(cfg: BalanceBenchConfig, workdir: Path,
                      progress: Callable[[float, float], None] | None = None) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); returns ``{"benchmark", "config", "rows", "events", "summary"}``.

    Raises:
        FailoverBenchError: ``eaas up`` did not come up.
        ConfigError: the model has no training report to draw held-out prompts from.
    """
    import httpx

    from eaas.bench.harness import UpProcess
    from eaas.deploy import packaged_model_dir

    model_dir = Path(cfg.model_dir) if cfg.model_dir is not None else packaged_model_dir()
    mixes = held_out_mixes(model_dir, cfg.prompt_chars)
    env = {"EAAS_AUTOSCALER_MIN_REPLICAS": str(cfg.replicas), "EAAS_AUTOSCALER_MAX_REPLICAS": str(cfg.replicas),
           "EAAS_AUTOSCALER_UPSCALE_DELAY_S": str(cfg.upscale_delay_s),
           "EAAS_AUTOSCALER_DOWNSCALE_DELAY_S": str(cfg.downscale_delay_s),
           "EAAS_AUTOSCALER_LOOK_BACK_S": str(cfg.look_back_s),
           "EAAS_AUTOSCALER_BALANCE_TARGET": str(cfg.balance_target),
           "EAAS_AUTOSCALER_MAX_HOT_REPLICAS": str(cfg.max_hot_replicas)}
    up = UpProcess(workdir, workers=cfg.workers, replicas=cfg.replicas, autoscale=True, extra_env=env,
                   model_dir=model_dir if cfg.model_dir is not None else None)
    rows: list[dict[str, Any]] = []
    with up:
        model = httpx.get(f"{up.url}/v1/models", timeout=10).json()["data"][0]["id"]
        registry = up.registry()
        streams = _Streams(up.url, model, cfg, mixes)
        driver = threading.Thread(target=streams.run, name="bench-balance-load", daemon=True)
        t0 = time.monotonic()
        driver.start()
        prev: dict[str, tuple[int, dict[str, int]]] = {}
        base: dict[str, frozenset[str]] = {}
        _, prev = _sample(registry, model, prev, base, 0.0, 1.0, "A")
        last = t0
        total_s = 2 * cfg.phase_s
        while (elapsed := time.monotonic() - t0) < total_s:
            time.sleep(max(0.0, cfg.sample_s - (time.monotonic() - last)))
            now = time.monotonic()
            elapsed = now - t0
            phase = "A" if elapsed < cfg.phase_s else "B"
            if phase == "B" and streams.phase == 0:
                streams.phase = 1
            row, prev = _sample(registry, model, prev, base, elapsed, now - last, phase)
            rows.append(row)
            last = now
            if progress is not None:
                progress(min(elapsed, total_s), total_s)
        streams.stop.set()
        driver.join(timeout=120)
        gaps = [(t - t0, g) for t, g in streams.gaps]
    events = _events(rows)
    summary = summarize(rows, events, gaps, cfg, len(streams.failed), streams.requests)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    config["model_dir"] = str(model_dir)
    return {"benchmark": "balance", "config": config, "rows": rows, "events": events, "summary": summary,
            "failures": streams.failed[:10]}


def summary_table(result: dict[str, Any]) -> Any:
    """Timeline (sampled every few rows) and the summary as one rich table."""
    from rich.table import Table

    s = result["summary"]
    table = Table(title=f"balance: {result['config']['workers']} workers, c={result['config']['concurrency']}, "
                        f"{result['summary']['requests']} requests, {s['failed_requests']} failed")
    for col in ("t s", "phase", "balancedness (layer / worker)", "extra replicas", "top expert (share, replicas)",
                "tokens/s per worker"):
        table.add_column(col)
    for r in result["rows"]:
        top = r["top_experts"][0] if r["top_experts"] else None
        bal = "-" if r["balancedness"] is None else f"{r['balancedness']:.2f} / {r['balancedness_workers']:.2f}"
        table.add_row(f"{r['t_s']:.0f}", r["phase"], bal, str(sum(map(len, r["extras"].values()))),
                      f"{top['function']} ({top['share']:.2f}, {top['replicas']})" if top else "-",
                      " ".join(f"{v:.0f}" for v in r["tokens_per_worker"].values()))
    for e in result["events"]:
        table.add_row(f"{e['t_s']:.0f}", e["phase"], f"longest token gap {e['max_token_gap_s']} s", e["kind"],
                      ", ".join(e["functions"]), e["worker"])
    table.caption = (f"balancedness before {s['balancedness_before']} -> after {s['balancedness_after']} "
                     f"(after the move {s['balancedness_after_move']}); longest token gap during rebalances "
                     f"{s['max_token_gap_s']} s (ITL p50 {s['itl_p50_s']} s); {s['failed_requests']} failed requests")
    return table


def plot(result: dict[str, Any], path: Path) -> None:
    """PNG: balancedness and per-worker tokens/s over time, rebalances and the mix change marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, (ax_b, ax_w) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    ts = [r["t_s"] for r in rows]
    ax_b.plot(ts, [r["balancedness"] for r in rows], "o-", label="balancedness (vLLM EPLB: per layer, mean / max per worker)")
    ax_b.plot(ts, [r["balancedness_workers"] for r in rows], ".--", lw=0.8, label="whole workers: mean / max tokens")
    ax_b.axhline(0.85, color="0.5", ls=":", label="0.85")
    ax_b.set_ylim(0, 1.05)
    workers = sorted({w for r in rows for w in r["tokens_per_worker"]})
    for w in workers:
        ax_w.plot(ts, [r["tokens_per_worker"].get(w) for r in rows], label=w, lw=1.0)
    for ax in (ax_b, ax_w):
        ax.axvline(result["config"]["phase_s"], color="k", ls="--", lw=1)
        for e in result["events"]:
            ax.axvline(e["t_s"], color="C3" if e["kind"] == "replicas removed" else "C2", ls=":", lw=1)
    s = result["summary"]
    ax_b.set_title(f"before {s['balancedness_before']} -> after {s['balancedness_after']} / after move "
                   f"{s['balancedness_after_move']}; max gap {s['max_token_gap_s']} s; {s['failed_requests']} failed")
    ax_b.legend(fontsize=8)
    ax_w.set_ylabel("tokens/s")
    ax_w.set_xlabel("time (s); dashed: mix A -> B; green: extra replicas added; red: removed")
    ax_w.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
