"""`eaas bench layer`: one MoE layer through EaaS vs the same block run monolithically.

Both sides run **the same transformers sparse MoE block** (for Mixtral
``model.model.layers[L].mlp``: router + top-k + experts) on the same
``x[1, T, D]``:

- ``monolithic``: the checkpoint loaded with plain ``AutoModelForCausalLM.from_pretrained``
  (transformers' default experts implementation), computed in this process with
  ``monolithic_threads`` torch threads;
- ``eaas``: the checkpoint loaded as an attention client
  (:func:`~eaas.platform.integration.load_client_model`, no routed-expert
  weights) whose experts module is bound to an :class:`~eaas.platform.client.ExpertClient`;
  the router runs here, the routed experts on ``W`` ``eaas worker`` processes
  with ``worker_threads`` torch threads each (dispatch -> workers -> combine).

Same total thread budget: ``monolithic_threads = W * worker_threads`` (the
client runs the router and the combine on ``client_threads`` = 1 thread and
otherwise waits on its sockets). Everything runs in one invocation: a private
Redis, a seeded Mixtral-shaped checkpoint, the pool. Per ``T``: warm-up calls
of both, then ``repeats`` timed calls of each, in alternating blocks of ``block``
calls (so a noisy neighbour hits both alike). Before each block the other side is let
settle (:func:`_settle`, up to :data:`SETTLE_S`): the monolithic side's idle OpenMP
threads spin for ~9 ms after its last call (measured here: one helper thread stays
runnable 8.9 ms after a 2-thread ``linear``), on the very cores the workers need, and
the workers spin up to ``EAAS_SPIN_CAP_US`` after their last reply, on the cores the
monolithic threads need; neither would be there in a deployment of only one of them
(at T=4, D=256 that spinning alone turned EaaS 1.8 ms into 3.4 ms). So the first call
of every block starts with the other side idle and its own side cold, and
tokens/s = ``T / median(seconds)``;
``overhead_ms`` = EaaS ms − monolithic ms (the per-layer price of going remote), with a 95 %
interval (``overhead_ci95_ms``; null below 6 repeats); each
row also carries the best (minimum) times and their ``ratio_best``, the estimate
least moved by other load on a small shared machine. The same run measures the
physical floors of a same-host round trip (:mod:`eaas.bench.floors`): a unix-socket
round trip (sleeping) and a shared-memory flag round trip (spinning). The first
EaaS output of each input is compared with the monolithic one (max abs error relative
to the output scale, must be <= 1e-5); the worst error is reported in ``config``.

``inputs`` (``--inputs``) sets how many distinct ``x`` each ``T`` cycles through, call
by call, in the same order on both sides. With one, every call routes to the same
experts and their weights stay in the caches, on both sides; a decode stream meets a
layer's experts after the rest of the model ran, i.e. cold. Measured here (D=256, T=1,
back to back, 2 workers): one input, monolithic 0.61 ms and EaaS 0.70 ms; 64 inputs,
1.0 and 1.35-1.45 ms (the workers' one-thread expert rows from memory, ~340 µs each).
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from eaas.bench.floors import measure_floors
from eaas.bench.harness import local_stack
from eaas.bench.stats import load_avg_1m
from eaas.functions import write_tiny_checkpoint
from eaas.functions.families import moe_block
from eaas.platform.client import ExpertClient
from eaas.platform.integration import bind_experts, load_client_model, quiet_transformers
from eaas.platform.shards import plan_pool
from eaas.platform.waiter import usable_cpus
from eaas.settings import get_settings

DEFAULT_TOKENS = (16, 128, 512, 2048)
EXACT_RTOL = 1e-5
SETTLE_S = 0.1  # longest wait for the other side's threads to stop running before a block (s)


def _running_threads(pids: Sequence[int], skip_tid: int | None = None) -> int:
    """How many threads of processes ``pids`` are running or runnable now (state ``R`` in
    ``/proc/PID/task/TID/stat``), not counting ``skip_tid``; 0 where /proc cannot be read."""
    n = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            if skip_tid is not None and int(tid) == skip_tid:
                continue
            try:
                with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            end = stat.rindex(b")")  # the state follows the (command name), which may hold spaces
            if stat[end + 2:end + 3] == b"R":
                n += 1
    return n


def _settle(pids: Sequence[int], skip_tid: int | None = None, timeout_s: float = SETTLE_S) -> bool:
    """Wait until no thread of ``pids`` (but ``skip_tid``) runs, polling every 0.5 ms, at most
    ``timeout_s``; return whether they settled."""
    deadline = time.monotonic() + timeout_s
    while _running_threads(pids, skip_tid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.0005)
    return True


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    scale = float(ref.abs().max()) or 1.0
    return float((out.float() - ref.float()).abs().max()) / scale


def _call(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = block(x)
    return out[0] if isinstance(out, tuple) else out


def run_layer_bench(
    tokens: Sequence[int] = DEFAULT_TOKENS,
    *,
    workers: int = 2,
    hidden: int = 1024,
    intermediate: int = 2816,
    experts: int = 8,
    top_k: int = 2,
    replicas: int = 1,
    worker_threads: int = 1,
    repeats: int = 5,
    warmup: int = 2,
    transport: str = "auto",
    seed: int = 0,
    monolithic_impl: str | None = None,
    block: int = 5,
    inputs: int = 1,
    progress: Callable[[str, float], None] | None = None,
) -> dict[str, Any]:
    """Measure one MoE layer's tokens/s through EaaS and monolithically, per ``T``.

    Args:
        tokens: token counts ``T`` to measure.
        workers: expert worker processes ``W``.
        hidden, intermediate, experts, top_k: the Mixtral-shaped layer.
        replicas: replicas per expert (``W`` workers split the experts into ``W // replicas`` groups).
        worker_threads: torch threads per worker; the monolithic run gets ``W * worker_threads``.
        repeats: timed calls per side and ``T`` (median reported).
        warmup: untimed calls per side and ``T`` first.
        transport: data-plane transport (``auto``, ``inline``, ``shm``, ...).
        seed: seed of the checkpoint and the inputs.
        monolithic_impl: experts implementation of the monolithic block (``eager``,
            ``grouped_mm``, ...; default: transformers' default).
        block: consecutive calls of one side before the other side's turn.
        inputs: distinct inputs ``x[1, T, D]`` per ``T``, cycled call by call in the same order on
            both sides. With 1 every call routes to the same experts, whose weights then stay in
            the caches; a decode stream meets each layer's experts cold (the rest of the model
            ran in between), which more inputs approximate (each EaaS output is checked
            against the monolithic one of the same input).
        progress: ``progress(message, fraction_done)`` callback.

    Returns:
        ``{"benchmark": "layer", "config": {...}, "rows": [{tokens, eaas_tokens_per_s,
        monolithic_tokens_per_s, ratio, ...}, ...]}``.

    Raises:
        EaaSError: the registry, the pool or a layer call failed.
    """
    tokens = [int(t) for t in tokens]
    if not tokens or min(tokens) < 1:
        raise ValueError(f"tokens must be positive, got {tokens}")
    if repeats < 1 or warmup < 0 or workers < 1 or worker_threads < 1 or block < 1 or inputs < 1:
        raise ValueError("repeats, workers, worker_threads, block and inputs must be >= 1, warmup >= 0")
    report = progress or (lambda _msg, _frac: None)
    saved_threads = torch.get_num_threads()
    load_before = load_avg_1m()

    def write(tmp: Path) -> Path:
        report("writing the checkpoint", 0.0)
        return write_tiny_checkpoint("mixtral", tmp / "mixtral-layer", layers=1, hidden=hidden,
                                     intermediate=intermediate, experts=experts, top_k=top_k,
                                     dtype="float32", seed=seed)  # fmt: skip

    with local_stack(write, torch_threads=worker_threads, env={"EAAS_TRANSPORT": transport}, tag="benchlayer") as st:
        client = None
        try:
            report(f"starting {workers} workers", 0.0)
            plan = plan_pool(experts, workers, replicas)
            handles = [st.pool.start(p.shard_name, p.spec, st.model) for p in plan]
            mono, eaas, mono_impl, eaas_model = _load_blocks(st.checkpoint, monolithic_impl)
            st.pool.wait_ready(handles, timeout_s=180)
            settings = get_settings(redis_url=st.redis_url, prefix=st.registry.prefix, transport=transport)
            client = ExpertClient(st.registry, st.model, settings, seed=seed)
            bind_experts(eaas_model, client, st.model)
            timer = _Timer(mono, eaas, workers * worker_threads, warmup, repeats, len(tokens), report, block,
                           worker_pids=[h.pid for h in handles])
            gen = torch.Generator().manual_seed(seed + 1)
            rows = [timer.row(t, [torch.randn(1, t, hidden, generator=gen) for _ in range(inputs)]) for t in tokens]
            report("measuring the round-trip floors", 1.0)
            floors = measure_floors()
            worst_err = max(r["max_rel_err"] for r in rows)
            config = {
                "arch": "mixtral", "hidden": hidden, "intermediate": intermediate, "experts": experts,
                "top_k": top_k, "dtype": "float32", "layer": 0, "workers": workers, "replicas": replicas,
                "shards": [p.spec for p in plan], "transport": transport,
                "transports_used": sorted(set(client.transports().values())),
                "thread_budget": {
                    "total": workers * worker_threads, "monolithic_threads": workers * worker_threads,
                    "worker_threads": worker_threads, "client_threads": 1,
                    "note": "the client runs router + combine on 1 thread and otherwise waits on sockets",
                },
                "cpu_count": usable_cpus(), "load_avg_1m": {"before": load_before, "after": load_avg_1m()},
                "monolithic": f"transformers {type(mono).__name__} (router + experts), experts_implementation={mono_impl}",
                "eaas": f"same {type(eaas).__name__}, experts_implementation=eaas (ExpertClient -> {workers} workers, eager experts)",
                "repeats": repeats, "warmup": warmup, "block": block, "inputs": inputs, "statistic": "median",
                "seed": seed,
                "settle": {"timeout_s": SETTLE_S, "blocks": timer.switches, "unsettled": timer.unsettled},
                "floors": floors, "spin_cap_us": settings.spin_cap_us, "shm_ring": settings.shm_ring,
                "exact": worst_err <= EXACT_RTOL, "max_rel_err": worst_err, "exact_tolerance": EXACT_RTOL,
                "client_requests": client.stats.requests, "client_failovers": client.stats.failovers,
                "versions": _versions(),
            }  # fmt: skip
            report("done", 1.0)
            return {"benchmark": "layer", "config": config, "rows": rows}
        finally:
            torch.set_num_threads(saved_threads)
            if client is not None:
                client.close()


def _load_blocks(ckpt: Path, monolithic_impl: str | None) -> tuple[torch.nn.Module, torch.nn.Module, str, Any]:
    """(monolithic MoE block, attention-client MoE block, the monolithic experts implementation,
    the attention-client model) of layer 0 of ``ckpt``."""
    from transformers import AutoModelForCausalLM

    with quiet_transformers():
        kw = {"experts_implementation": monolithic_impl} if monolithic_impl else {}
        mono_model = AutoModelForCausalLM.from_pretrained(ckpt, **kw).eval()
        eaas_model = load_client_model(ckpt)
    mono_impl = str(getattr(mono_model.config, "_experts_implementation", None) or "eager")
    return moe_block(mono_model, 0), moe_block(eaas_model, 0), mono_impl, eaas_model


class _Timer:
    """Times both blocks on the same input, interleaved call by call, with the thread budgets
    of the comparison (the monolithic block gets all threads; the client one)."""

    def __init__(self, mono: torch.nn.Module, eaas: torch.nn.Module, budget: int, warmup: int, repeats: int,
                 num_t: int, report: Callable[[str, float], None], block: int = 1,
                 worker_pids: Sequence[int] = ()) -> None:
        self.mono, self.eaas, self.budget, self.warmup, self.repeats = mono, eaas, budget, warmup, repeats
        self.block = block
        self.worker_pids = list(worker_pids)
        self.switches = 0  # blocks started
        self.unsettled = 0  # blocks started while the other side still ran after SETTLE_S
        self.report, self.steps, self.done = report, num_t * 2 * (warmup + repeats), 0

    def _switch(self, pids: list[int], skip_tid: int | None) -> None:
        self.switches += 1
        if not _settle(pids, skip_tid):
            self.unsettled += 1

    def _timed(self, block: torch.nn.Module, x: torch.Tensor, threads: int) -> tuple[torch.Tensor, float]:
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        out = _call(block, x)
        self.done += 1
        return out, time.perf_counter() - t0

    def row(self, t: int, xs: Sequence[torch.Tensor]) -> dict[str, Any]:
        """One table row for the inputs ``xs`` (each ``x[1, t, D]``, call ``i`` takes ``xs[i % len(xs)]`` on
        both sides): medians, bests, ratios, and the worst error of EaaS vs monolithic over the inputs."""
        mono_s: list[float] = []
        eaas_s: list[float] = []
        err = None
        total = self.warmup + self.repeats
        with torch.inference_mode():
            for start in range(0, total, self.block):
                n = min(self.block, total - start)
                refs = []
                self._switch(self.worker_pids, None)  # the workers' spinning after the last EaaS block
                for i in range(start, start + n):
                    ref, dm = self._timed(self.mono, xs[i % len(xs)], self.budget)
                    refs.append(ref)
                    if i >= self.warmup:
                        mono_s.append(dm)
                self._switch([os.getpid()], threading.get_native_id())  # the OpenMP threads' spinning
                for i in range(start, start + n):
                    out, de = self._timed(self.eaas, xs[i % len(xs)], 1)
                    if i >= self.warmup:
                        eaas_s.append(de)
                    if i < len(xs):  # each input's first EaaS call vs the monolithic output of the same input
                        rel = _rel_err(out, refs[i - start])
                        err = rel if err is None else max(err, rel)
                phase = "timed" if start + n > self.warmup else "warm-up"
                self.report(f"T={t}: {phase} calls {start + n}/{total}", self.done / self.steps)
        m, e = statistics.median(mono_s), statistics.median(eaas_s)
        return {"tokens": t, "eaas_tokens_per_s": t / e, "monolithic_tokens_per_s": t / m, "ratio": m / e,
                "eaas_ms": e * 1000, "monolithic_ms": m * 1000, "eaas_best_ms": min(eaas_s) * 1000,
                "monolithic_best_ms": min(mono_s) * 1000, "ratio_best": min(mono_s) / min(eaas_s),
                "overhead_ms": (e - m) * 1000, "overhead_ci95_ms": _diff_ci_ms(eaas_s, mono_s),
                "max_rel_err": float(err if err is not None else 0.0)}  # fmt: skip


def _diff_ci_ms(a: list[float], b: list[float]) -> list[float] | None:
    """A 95 % interval of median(a) − median(b) in ms (the medians' own intervals, combined); None
    with fewer than 6 samples a side (``--repeats`` < 6), too few for a distribution-free interval."""
    from eaas.bench.stats import median_ci

    if len(a) < 6 or len(b) < 6:
        return None
    (_, (alo, ahi), _), (_, (blo, bhi), _) = median_ci(a), median_ci(b)
    return [round((alo - bhi) * 1000, 3), round((ahi - blo) * 1000, 3)]


def _versions() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def summary_table(result: dict[str, Any]) -> Any:
    """A rich table of the rows."""
    from rich.table import Table

    cfg = result["config"]
    tb = cfg["thread_budget"]
    title = (f"MoE layer D={cfg['hidden']} I={cfg['intermediate']} E={cfg['experts']} top-{cfg['top_k']}: "
             f"EaaS ({cfg['workers']} workers x {tb['worker_threads']} thread) vs monolithic ({tb['monolithic_threads']} threads)")
    table = Table(title=title)
    for col in ("T", "EaaS tok/s", "monolithic tok/s", "ratio", "EaaS ms", "mono ms", "overhead ms",
                "ratio (best)", "max rel err"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        ci = r.get("overhead_ci95_ms")
        over = f"{r['overhead_ms']:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")
        table.add_row(str(r["tokens"]), f"{r['eaas_tokens_per_s']:,.0f}", f"{r['monolithic_tokens_per_s']:,.0f}",
                      f"{r['ratio']:.2f}x", f"{r['eaas_ms']:.2f}", f"{r['monolithic_ms']:.2f}", over,
                      f"{r['ratio_best']:.2f}x", f"{r['max_rel_err']:.1e}")
    table.caption = (f"exact: {cfg['exact']} (max rel err {cfg['max_rel_err']:.1e} <= {cfg['exact_tolerance']:g}); "
                     f"transport {', '.join(cfg['transports_used']) or cfg['transport']}; median of {cfg['repeats']}; "
                     f"{cfg.get('inputs', 1)} input(s) per T; "
                     f"load avg {cfg['load_avg_1m']['before']} -> {cfg['load_avg_1m']['after']}")
    fl = cfg.get("floors")
    if fl:
        table.caption += (f"\nfloors, same run (p50): unix-socket round trip {fl['unix_socket_rtt_us']['p50']:.0f} µs "
                          f"(sleeping), shm flag round trip {fl['shm_flag_rtt_us']['p50']:.1f} µs (spinning)")
    return table


def plot(result: dict[str, Any], path: Path) -> None:
    """tokens/s vs T for EaaS and monolithic (log-log), with the ratio annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    cfg = result["config"]
    ts = [r["tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(ts, [r["eaas_tokens_per_s"] for r in rows], "o-", label=f"EaaS ({cfg['workers']} workers)")
    ax.plot(ts, [r["monolithic_tokens_per_s"] for r in rows], "s--",
            label=f"monolithic ({cfg['thread_budget']['monolithic_threads']} threads)")
    for r in rows:
        ax.annotate(f"{r['ratio']:.2f}x", (r["tokens"], r["eaas_tokens_per_s"]), textcoords="offset points",
                    xytext=(0, 8), ha="center", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens per layer call (T)")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"MoE layer D={cfg['hidden']} I={cfg['intermediate']} E={cfg['experts']} top-{cfg['top_k']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
