"""`eaas bench e2e`: the paper's headline comparison in one run — a whole EaaS deployment
against the monolithic transformers model, on the same checkpoint, under the same load.

One invocation:

1. writes a Mixtral-shaped checkpoint (or takes ``model_dir``);
2. times one MoE block of it in this process under every experts implementation
   transformers offers here (``eager``, ``grouped_mm``, ``batched_mm``) and picks the
   fastest for the monolithic side (:func:`time_experts_implementations`,
   :func:`choose_implementation`), unless one is forced;
3. starts both servers and keeps them up for the whole run: a monolithic gateway
   (``eaas gateway --monolithic --experts-implementation IMPL``) and an EaaS deployment
   (``eaas up --model DIR --workers W --replicas R --no-autoscale``);
4. drives the closed-loop streaming load of ``eaas bench serve``
   (:func:`eaas.bench.serve.run_level`) at each concurrency level on one side, then on the
   other — never both at once — and alternates which side goes first from level to level
   (monolithic, EaaS | EaaS, monolithic | ...), so slow drift of the machine hits both alike;
5. reports per level, for both sides: output tokens/s, TTFT and inter-token latency (ITL)
   p50/p99 in ms, failed requests, and the ratios EaaS / monolithic (:func:`ratios`).

Thread budget (same torch threads ``t`` per process everywhere, ``W`` workers): the
monolithic gateway gets ``(W + 1) × t`` threads in one process (attention and experts); EaaS
gets ``t`` threads in each of its ``W`` workers plus ``t`` in its gateway (attention, router,
combine) — ``(W + 1) × t`` in all, of which the gateway's ``t`` mostly waits on sockets
while the workers compute.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from eaas.bench.serve import ServeBenchConfig, local_gateway, run_level
from eaas.bench.stats import load_avg_1m
from eaas.functions.expert_math import EXPERT_KERNELS
from eaas.platform.waiter import usable_cpus

SIDES = ("monolithic", "eaas")
RATIO_KEYS = ("output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")
"""Row fields compared; every ratio is ``eaas / monolithic`` (tokens/s: > 1 means EaaS is faster;
latencies: > 1 means EaaS is slower)."""

IMPL_CANDIDATES = ("eager", "grouped_mm", "batched_mm")


@dataclass(frozen=True, slots=True)
class E2EBenchConfig:
    """What one ``bench e2e`` run builds and sends.

    Attributes:
        concurrencies: closed-loop clients per level.
        max_tokens: output tokens per request (``ignore_eos``: exactly this many).
        requests_per_client: requests per client and level (a level sends at least
            ``min_requests``).
        min_requests: requests per level at least.
        prompt_words: words per synthetic prompt.
        workers: EaaS expert worker processes ``W``.
        replicas: replicas of every expert in the EaaS pool.
        torch_threads: torch threads ``t`` per process (monolithic: ``(W + 1) × t`` in its one process).
        monolithic_impl: force the monolithic experts implementation (None: the fastest measured).
        engine: the runner engine of both gateways (``slots`` or ``padded``; ``EAAS_ENGINE``).
        max_prefill_tokens: ``EAAS_MAX_PREFILL_TOKENS`` of both gateways (None: their default).
        microbatch_min_batch: ``EAAS_MICROBATCH_MIN_BATCH`` of both gateways (None: their default).
        expert_kernel: ``EAAS_EXPERT_KERNEL`` of the EaaS workers: ``onednn`` (default; prepacked
            weights, the fastest here for float32 on CPU) or ``eager`` (transformers' bits).
        layers, hidden, intermediate, experts, top_k, seed: the checkpoint written when no
            ``model_dir`` is given (Mixtral-shaped, float32).
        impl_repeats: timed forwards per implementation and token count (median reported).
        timeout_s: per-request timeout (s).
    """

    concurrencies: tuple[int, ...] = (1, 8, 32)
    max_tokens: int = 64
    requests_per_client: int = 4
    min_requests: int = 8
    prompt_words: int = 16
    workers: int = 2
    replicas: int = 1
    torch_threads: int = 1
    expert_kernel: str = "onednn"
    monolithic_impl: str | None = None
    engine: str = "slots"
    max_prefill_tokens: int | None = None
    microbatch_min_batch: int | None = None
    layers: int = 4
    hidden: int = 1024
    intermediate: int = 2816
    experts: int = 8
    top_k: int = 2
    seed: int = 0
    impl_repeats: int = 5
    timeout_s: float = 300.0
    impl_candidates: tuple[str, ...] = IMPL_CANDIDATES

    def validate(self) -> None:
        """Raises ValueError on an argument that cannot work."""
        if not self.concurrencies or min(self.concurrencies) < 1:
            raise ValueError(f"concurrency levels must be positive, got {list(self.concurrencies)}")
        for name in ("max_tokens", "requests_per_client", "min_requests", "prompt_words", "workers", "replicas",
                     "torch_threads", "layers", "hidden", "intermediate", "experts", "top_k", "impl_repeats"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.top_k > self.experts:
            raise ValueError(f"top_k {self.top_k} > experts {self.experts}")
        if self.expert_kernel not in EXPERT_KERNELS:
            raise ValueError(f"expert_kernel must be one of {', '.join(EXPERT_KERNELS)}, got {self.expert_kernel!r}")
        if self.engine not in ("slots", "padded"):
            raise ValueError(f"engine must be 'slots' or 'padded', got {self.engine!r}")
        if self.replicas > self.workers:
            raise ValueError(f"replicas {self.replicas} > workers {self.workers}")


# --- pure helpers -----------------------------------------------------------------------


def ratios(mono: dict[str, Any], eaas: dict[str, Any]) -> dict[str, float | None]:
    """``eaas[k] / mono[k]`` for every ``k`` in :data:`RATIO_KEYS` (None when either value is
    missing or the monolithic value is 0). Units cancel: tokens/s over tokens/s, ms over ms."""
    out: dict[str, float | None] = {}
    for key in RATIO_KEYS:
        a, b = eaas.get(key), mono.get(key)
        out[key] = None if a is None or b is None or b == 0 else a / b
    return out


def choose_implementation(timings: dict[str, dict[str, Any]], forced: str | None = None) -> str:
    """The experts implementation for the monolithic side.

    Args:
        timings: ``{impl: {"ok": bool, "score_ms": float, ...}}`` from
            :func:`time_experts_implementations`.
        forced: take this one whatever the timings say.

    Returns:
        ``forced`` if given, else the ``ok`` implementation with the lowest ``score_ms``
        (ties: the first in ``timings``' order).

    Raises:
        ValueError: nothing forced and no implementation ran.
    """
    if forced:
        return forced
    ok = [(t["score_ms"], i, impl) for i, (impl, t) in enumerate(timings.items()) if t.get("ok")]
    if not ok:
        raise ValueError(f"no experts implementation ran: {timings}")
    return min(ok)[2]


# --- the experts-implementation micro-timing ----------------------------------------------


def time_experts_implementations(
    checkpoint: Path, tokens: Sequence[int], *, threads: int, candidates: Sequence[str] = IMPL_CANDIDATES,
    repeats: int = 5, warmup: int = 2, seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Time the MoE block of layer 0 of ``checkpoint`` under each experts implementation.

    Each candidate is loaded with ``AutoModelForCausalLM.from_pretrained(checkpoint,
    experts_implementation=impl)`` (as the monolithic gateway will load it); then, for every
    ``T`` in ``tokens``, the blocks run on the same ``x[1, T, D]`` (float32, seeded) in
    round-robin order (``warmup`` untimed rounds, then ``repeats`` timed ones), so a noisy
    neighbour hits every candidate alike. ``threads`` torch threads (restored afterwards).

    Returns:
        ``{impl: {"ok": True, "ms": {T: median ms of one forward}, "score_ms": sum of those
        medians, "max_abs_diff_vs_first": largest |output - first candidate's output|}}``, or
        ``{"ok": False, "error": str}`` for an implementation that did not load or run here.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from eaas.functions.families import moe_block

    out: dict[str, dict[str, Any]] = {}
    blocks: dict[str, Any] = {}
    for impl in candidates:
        try:
            model = AutoModelForCausalLM.from_pretrained(checkpoint, experts_implementation=impl).eval()
            blocks[impl] = (moe_block(model, 0), int(model.config.hidden_size))
            del model  # the block keeps only its own weights alive
        except Exception as exc:  # noqa: BLE001 - any failure means "not available here"; recorded
            out[impl] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}

    def forward(block: Any, x: Any) -> Any:
        y = block(x)
        return y[0] if isinstance(y, tuple) else y

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    times: dict[str, dict[int, list[float]]] = {impl: {} for impl in blocks}
    diffs: dict[str, float] = dict.fromkeys(blocks, 0.0)
    try:
        gen = torch.Generator().manual_seed(seed)
        with torch.inference_mode():
            for t in (int(t) for t in tokens):
                x = None
                for r in range(warmup + repeats):
                    reference = None
                    for impl in list(times):
                        block, hidden = blocks[impl]
                        if x is None or x.shape[-1] != hidden:
                            x = torch.randn(1, t, hidden, generator=gen)
                        try:
                            t0 = time.perf_counter()
                            y = forward(block, x)
                            dt = time.perf_counter() - t0
                        except Exception as exc:  # noqa: BLE001 - recorded, the candidate drops out
                            out[impl] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                            del times[impl]
                            continue
                        if reference is None:
                            reference = y
                        else:
                            diffs[impl] = max(diffs[impl], float((y - reference).abs().max()))
                        if r >= warmup:
                            times[impl].setdefault(t, []).append(dt)
    finally:
        torch.set_num_threads(saved)
    for impl in candidates:
        if impl in times:
            ms = {t: round(float(sorted(v)[len(v) // 2]) * 1e3, 4) for t, v in times[impl].items()}
            out[impl] = {"ok": True, "ms": ms, "score_ms": round(sum(ms.values()), 4),
                         "max_abs_diff_vs_first": diffs[impl]}  # fmt: skip
    return {impl: out[impl] for impl in candidates}


def time_wave_prefill(checkpoint: Path, levels: Sequence[int], prompt_words: int, *, impl: str, threads: int,
                      repeats: int = 2) -> dict[int, dict[str, float]]:
    """The TTFT floor of a closed loop: one forward over ``c`` of the benchmark's prompts at once.

    At concurrency ``c`` with a fixed output length the requests start, finish and come back
    together, so the last of a wave gets its first token no sooner than one prefill of all
    ``c`` prompts. This runs that forward monolithically in this process (``impl`` experts,
    ``threads`` torch threads), right-padded as the ``slots`` engine pads them.

    Returns:
        ``{c: {"tokens": padded tokens, "ms": median ms of one forward}}``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eaas.bench.serve import synthetic_prompts

    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, experts_implementation=impl).eval()
    prompts = [tok(p)["input_ids"] for p in synthetic_prompts(max(levels), prompt_words)]
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    out: dict[int, dict[str, float]] = {}
    try:
        with torch.inference_mode():
            model(torch.tensor([prompts[0]]), logits_to_keep=1)  # warm-up
            for c in sorted(set(levels)):
                longest = max(len(p) for p in prompts[:c])
                ids = torch.tensor([p + [0] * (longest - len(p)) for p in prompts[:c]])  # [c, P]
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    model(ids, logits_to_keep=1)
                    times.append(time.perf_counter() - t0)
                out[c] = {"tokens": c * longest, "ms": round(sorted(times)[len(times) // 2] * 1e3, 1)}
    finally:
        torch.set_num_threads(saved)
    return out


# --- the run --------------------------------------------------------------------------------


def run_e2e_bench(
    cfg: E2EBenchConfig,
    *,
    model_dir: Path | None = None,
    workdir: Path | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> dict[str, Any]:
    """Monolithic gateway vs EaaS deployment on one checkpoint, level by level.

    Args:
        cfg: what to build and send.
        model_dir: checkpoint directory (default: a Mixtral-shaped one written from ``cfg``
            into a temporary directory).
        workdir: where the EaaS deployment's state, cache and ``up.log`` and the monolithic
            gateway's ``monolithic.log`` go (default: a temporary directory, removed after).
        progress: ``progress(message, fraction_done)`` callback.

    Returns:
        ``{"benchmark": "e2e", "config": {...}, "rows": [...]}``: one row per concurrency
        level, ``{"concurrency", "order": [side, side], "monolithic": serve-row, "eaas":
        serve-row, "ratio": {k: eaas/mono for k in RATIO_KEYS}}``; a serve-row is
        :func:`eaas.bench.serve.run_level`'s (``output_tokens_per_s`` in tokens/s,
        ``ttft_*_ms`` / ``itl_*_ms`` in ms, ``failed_requests``) plus ``cpu_s`` (CPU seconds
        its processes used during the level) and ``other_side_cpu_s`` (the idle side's).
        ``config`` states the thread budget, the experts-implementation timings and choice,
        and the wall time.

    Raises:
        ValueError: a bad argument, or no experts implementation runs.
        FailoverBenchError: the EaaS deployment did not become ready (with its log tail).
        ConfigError: the monolithic gateway did not become ready (with its log tail).
        CheckpointError: the checkpoint cannot be loaded.
    """
    from eaas.bench.harness import UpProcess

    cfg.validate()
    report = progress or (lambda _msg, _frac: None)
    t_start = time.perf_counter()
    load_before = load_avg_1m()
    levels = tuple(int(c) for c in cfg.concurrencies)
    steps = 2 + 2 * len(levels)  # servers + warm-up, then two sides per level
    done = 0

    def step(msg: str) -> None:
        report(msg, min(done / steps, 1.0))

    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="eaas-e2e-")))
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        wrote_checkpoint = model_dir is None
        if model_dir is None:
            step("writing the checkpoint")
            model_dir = _write_checkpoint(cfg, workdir / "mixtral-e2e")
        model_dir = Path(model_dir)

        mono_threads = (cfg.workers + 1) * cfg.torch_threads  # the same total as EaaS's W workers + gateway
        step("timing experts implementations")
        timings = time_experts_implementations(model_dir, sorted(set(levels)), threads=mono_threads,
                                               candidates=cfg.impl_candidates, repeats=cfg.impl_repeats,
                                               seed=cfg.seed)  # fmt: skip
        chosen = choose_implementation(timings, cfg.monolithic_impl)
        step("timing one prefill of each level's whole wave of prompts (the TTFT floor)")
        wave_floor = time_wave_prefill(model_dir, levels, cfg.prompt_words, impl=chosen, threads=mono_threads)

        # both servers start at once (start-up is not measured) and stay up for the whole run
        step(f"starting the monolithic gateway and EaaS ({cfg.workers} workers)")
        up = UpProcess(workdir / "eaas", workers=cfg.workers, replicas=cfg.replicas, autoscale=False,
                       model_dir=model_dir, extra_env={**_engine_env(cfg), "EAAS_EXPERT_KERNEL": cfg.expert_kernel},
                       extra_args=["--torch-threads", str(cfg.torch_threads)])  # fmt: skip
        stack.callback(up.stop)
        up_error: list[BaseException] = []
        up_thread = threading.Thread(target=_capture(up.start, up_error), name="eaas-e2e-up", daemon=True)
        up_thread.start()
        try:
            mono_url = stack.enter_context(local_gateway(model_dir, monolithic=True, torch_threads=mono_threads,
                                                         experts_implementation=chosen, extra_env=_engine_env(cfg),
                                                         log_path=workdir / "monolithic.log"))  # fmt: skip
        finally:
            up_thread.join()
        if up_error:
            raise up_error[0]
        urls = {"monolithic": mono_url, "eaas": up.url}
        models = {side: _model_id(url) for side, url in urls.items()}
        procs = _side_processes(up.proc.pid if up.proc else None)
        done += 1

        serve_cfg = ServeBenchConfig(concurrencies=levels, requests_per_client=cfg.requests_per_client,
                                     min_requests=cfg.min_requests, max_tokens=cfg.max_tokens,
                                     prompt_words=cfg.prompt_words, timeout_s=cfg.timeout_s)  # fmt: skip
        warm = ServeBenchConfig(requests_per_client=1, min_requests=1, max_tokens=min(4, cfg.max_tokens),
                                prompt_words=cfg.prompt_words, timeout_s=cfg.timeout_s)  # fmt: skip
        for side in SIDES:  # first-call costs and the largest batch shape out of the measurement
            step(f"warming up {side}")
            for c in sorted({1, max(levels)}):
                asyncio.run(run_level(urls[side], models[side], c, warm))
        done += 1

        rows = []
        for i, c in enumerate(levels):
            order = SIDES if i % 2 == 0 else SIDES[::-1]
            row: dict[str, Any] = {"concurrency": c, "order": list(order)}
            for side in order:
                step(f"concurrency {c}: {side}")
                other = SIDES[1 - SIDES.index(side)]
                before = {s: _cpu_seconds(procs[s]()) for s in SIDES}
                r = asyncio.run(run_level(urls[side], models[side], c, serve_cfg))
                after = {s: _cpu_seconds(procs[s]()) for s in SIDES}
                r["cpu_s"] = round(after[side] - before[side], 3)
                r["other_side_cpu_s"] = round(after[other] - before[other], 3)
                row[side] = r
                done += 1
            row["ratio"] = ratios(row["monolithic"], row["eaas"])
            rows.append(row)
        if up.proc is not None and up.proc.poll() is not None:
            from eaas.bench.harness import FailoverBenchError

            raise FailoverBenchError(f"eaas up exited during the run:\n{up.log_tail()}")
        report("stopping", 1.0)

    import torch
    import transformers

    config = {
        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "checkpoint": str(model_dir),
        "model": models,
        "written_checkpoint": {"arch": "mixtral", "layers": cfg.layers, "hidden": cfg.hidden,
                               "intermediate": cfg.intermediate, "experts": cfg.experts, "top_k": cfg.top_k,
                               "dtype": "float32", "seed": cfg.seed} if wrote_checkpoint else None,  # fmt: skip
        "thread_budget": {
            "torch_threads": cfg.torch_threads,
            "workers": cfg.workers,
            "monolithic_threads": mono_threads,
            "eaas_worker_threads": cfg.torch_threads,
            "eaas_gateway_threads": cfg.torch_threads,
            "eaas_total_threads": (cfg.workers + 1) * cfg.torch_threads,
            "note": (f"monolithic: (W+1)×t = {cfg.workers + 1}×{cfg.torch_threads} = {mono_threads} threads in one process "
                     f"(attention + experts); EaaS: t = {cfg.torch_threads} in each of W = {cfg.workers} workers "
                     f"+ t = {cfg.torch_threads} in the gateway (attention, router, combine)"),
        },
        "monolithic_impl": chosen,
        "wave_prefill_floor": {
            "statistic": "median ms of one monolithic forward over the level's first c prompts (right-padded), "
                         f"{mono_threads} threads: the last request of a wave gets its first token no sooner",
            "results": wave_floor,
        },
        "monolithic_impl_source": "forced" if cfg.monolithic_impl else "fastest measured",
        "experts_impl_timings": {
            "tokens": sorted(set(levels)), "threads": mono_threads, "repeats": cfg.impl_repeats,
            "statistic": "median ms of one MoE-block forward on x[1, T, D]; score_ms = sum over T",
            "results": timings,
        },
        "schedule": "both servers up for the whole run; per level one side, then the other (never both under "
                    "load); the side that goes first alternates from level to level",
        "monolithic_cmd": "eaas gateway --monolithic --torch-threads W*t --experts-implementation IMPL",
        "eaas_cmd": "EAAS_EXPERT_KERNEL=K eaas up --model DIR --workers W --replicas R --no-autoscale --torch-threads t",
        "eaas_expert_kernel": cfg.expert_kernel,
        "cpu_count": usable_cpus(),
        "load_avg_1m": {"before": load_before, "after": load_avg_1m()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "wall_s": round(time.perf_counter() - t_start, 2),
    }
    return {"benchmark": "e2e", "config": config, "rows": rows}


def _capture(fn: Callable[[], Any], errors: list[BaseException]) -> Callable[[], None]:
    """``fn`` for a thread: an exception it raises is appended to ``errors`` (re-raised by the caller)."""

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)

    return run


def _engine_env(cfg: E2EBenchConfig) -> dict[str, str]:
    """The runner settings both sides get, as environment."""
    env = {"EAAS_ENGINE": cfg.engine}
    if cfg.max_prefill_tokens is not None:
        env["EAAS_MAX_PREFILL_TOKENS"] = str(cfg.max_prefill_tokens)
    if cfg.microbatch_min_batch is not None:
        env["EAAS_MICROBATCH_MIN_BATCH"] = str(cfg.microbatch_min_batch)
    return env


def _write_checkpoint(cfg: E2EBenchConfig, path: Path) -> Path:
    from eaas.functions import write_tiny_checkpoint

    return write_tiny_checkpoint("mixtral", path, layers=cfg.layers, hidden=cfg.hidden, intermediate=cfg.intermediate,
                                 experts=cfg.experts, top_k=cfg.top_k, dtype="float32", seed=cfg.seed)  # fmt: skip


def _model_id(url: str) -> str:
    return httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]


def _side_processes(up_pid: int | None) -> dict[str, Callable[[], list[Any]]]:
    """Per side, a function listing its live processes now: EaaS = the ``eaas up`` process and
    its descendants (workers, Redis); monolithic = this process's other descendants."""
    import psutil

    def eaas() -> list[Any]:
        if up_pid is None:
            return []
        try:
            p = psutil.Process(up_pid)
            return [p, *p.children(recursive=True)]
        except psutil.Error:
            return []

    def mono() -> list[Any]:
        theirs = {p.pid for p in eaas()}
        return [p for p in psutil.Process().children(recursive=True) if p.pid not in theirs]

    return {"eaas": eaas, "monolithic": mono}


def _cpu_seconds(procs: list[Any]) -> float:
    """User + system CPU seconds the processes have used so far (gone ones count 0)."""
    import psutil

    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


# --- output ------------------------------------------------------------------------------------


def _fmt(v: Any, ratio: bool = False) -> str:
    if v is None:
        return "-"
    if ratio:
        return f"{v:.2f}x"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def summary_table(result: dict[str, Any]) -> Any:
    """A rich table: per level a monolithic (``mono``) row, an EaaS row and an ``eaas/mono`` ratio row
    (tokens/s, ms; ratios as ``1.23x``)."""
    from rich.table import Table

    cfg = result["config"]
    tb = cfg["thread_budget"]
    title = (f"eaas bench e2e: {cfg['layers']}L D={cfg['hidden']} I={cfg['intermediate']} E={cfg['experts']} "
             f"k={cfg['top_k']}, max_tokens={cfg['max_tokens']}, engine {cfg.get('engine', 'slots')} | "
             f"monolithic {tb['monolithic_threads']} threads, "
             f"experts={cfg['monolithic_impl']} | EaaS {tb['workers']}x{tb['eaas_worker_threads']} worker threads "
             f"+ {tb['eaas_gateway_threads']} gateway, replicas={cfg['replicas']}")
    table = Table(title=title)
    cols = ["output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"]
    heads = ["output tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms"]
    table.add_column("concurrency", justify="right")
    table.add_column("side")
    for h in heads:
        table.add_column(h, justify="right")
    table.add_column("requests (failed)", justify="right")
    table.add_column("cpu s", justify="right")
    for row in result["rows"]:
        for i, side in enumerate(SIDES):
            r = row[side]
            table.add_row(str(row["concurrency"]) if i == 0 else "", "mono" if side == "monolithic" else side,
                          *(_fmt(r.get(c)) for c in cols),
                          f"{r['num_requests']} ({r['failed_requests']})", _fmt(r.get("cpu_s")))  # fmt: skip
        table.add_row("", "eaas/mono", *(_fmt(row["ratio"].get(c), ratio=True) for c in cols), "", "",
                      style="bold", end_section=True)  # fmt: skip
    return table


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The experts-implementation timings, the choice, and the wall time, one line each."""
    cfg = result["config"]
    lines = []
    for impl, t in cfg["experts_impl_timings"]["results"].items():
        mark = " <- monolithic" if impl == cfg["monolithic_impl"] else ""
        if t.get("ok"):
            per_t = ", ".join(f"T={k}: {v:g} ms" for k, v in t["ms"].items())
            lines.append(f"experts impl {impl}: {per_t} (score {t['score_ms']:g} ms){mark}")
        else:
            lines.append(f"experts impl {impl}: unavailable ({t['error']}){mark}")
    lines.append(f"monolithic impl: {cfg['monolithic_impl']} ({cfg['monolithic_impl_source']}); "
                 f"EaaS workers' expert kernel: {cfg.get('eaas_expert_kernel', 'eager')}")
    floor = cfg.get("wave_prefill_floor", {}).get("results", {})
    if floor:
        lines.append("TTFT floor, one prefill of a whole wave: " + ", ".join(
            f"c={c}: {v['ms']:g} ms ({v['tokens']} tokens)" for c, v in floor.items()))
    lines.append(f"thread budget: {cfg['thread_budget']['note']}")
    failed = sum(r[s]["failed_requests"] for r in result["rows"] for s in SIDES)
    if failed:
        lines.append(f"[red]failed requests: {failed}[/red]")
    lines.append(f"wall time: {cfg['wall_s']:g} s")
    return lines


def plot(result: dict[str, Any], path: Path) -> None:
    """Output tokens/s and ITL p50/p99 (ms) against concurrency, both sides, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    conc = [r["concurrency"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for side, color, marker in zip(SIDES, ("C0", "C1"), ("o", "s")):
        a.plot(conc, [r[side]["output_tokens_per_s"] for r in rows], "-", color=color, marker=marker, label=side)
        for key, line in (("itl_p50_ms", "-"), ("itl_p99_ms", ":")):
            b.plot(conc, [r[side][key] if r[side][key] is not None else float("nan") for r in rows], line,
                   color=color, marker=marker, label=f"{side} {key.split('_')[1]}")  # fmt: skip
    for ax, ylabel, title in ((a, "output tokens/s", "throughput"), (b, "ms", "inter-token latency")):
        if len(set(conc)) > 1:
            ax.set_xscale("log", base=2)
            ax.set_xticks(conc, [str(c) for c in conc])
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend()
    cfg = result["config"]
    fig.suptitle(f"eaas bench e2e (engine {cfg.get('engine', 'slots')}, monolithic experts={cfg['monolithic_impl']})")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
