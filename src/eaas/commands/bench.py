"""`eaas bench ...`: benchmarks that print a table, write JSON and a PNG.

Each benchmark measures its baseline in the same run and reports ratios
against it. The measuring code lives next to what it measures; this module
only declares the commands.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(help="Benchmarks: a table, --json, and a PNG plot, with ratios against a baseline measured in the same run.", no_args_is_help=True)


def _report(name: str, run: Callable[[], dict], *, table: Callable[[dict], Any],
            plot: Callable[[dict, Path], None] | None, json_out: bool, png: str | None,
            extra_lines: Callable[[dict], list[str]] = lambda r: []) -> dict:
    """The tail every benchmark shares: run it (a bad argument or EaaSError: one line, exit 2),
    write the PNG if asked, print JSON or the table (and any check lines). Returns the result."""
    from rich.console import Console

    from eaas.errors import EaaSError

    try:
        result = run()
    except (EaaSError, ValueError) as exc:
        typer.echo(f"eaas bench {name}: {exc}", err=True)
        raise typer.Exit(2) from None
    if png and plot is not None:
        plot(result, Path(png))
    if json_out:
        typer.echo(json.dumps(result))
        return result
    # a table piped to a file or a CI log keeps its columns whole (rich would assume 80)
    console = Console() if sys.stdout.isatty() else Console(width=160)
    console.print(table(result))
    for line in extra_lines(result):
        console.print(line, highlight=False)
    if png:
        console.print(f"plot: {png}")
    return result


@app.command("autoscale")
def autoscale(
    trace: str = typer.Option("diurnal", "--trace", help="load shape: step, spike or diurnal"),
    simulate: bool = typer.Option(False, "--simulate", help="discrete-event simulation at cluster scale (same policy code)"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object instead of the table"),
    png: str = typer.Option(None, "--png", help="write load and replicas over time to this PNG"),
    seed: int = typer.Option(0, "--seed", help="seed of the load trace"),
    duration_s: float = typer.Option(3600.0, "--duration-s", help="length of the trace (s)"),
    num_shards: int = typer.Option(8, "--shards", help="shards (worker types)"),
    max_replicas: int = typer.Option(8, "--max-replicas", help="replicas per shard at most"),
    zipf_s: float = typer.Option(0.0, "--zipf", help="Zipf exponent of expert popularity (0 = uniform)"),
    capacity_tokens_per_s: float = typer.Option(8000.0, "--capacity-tokens-per-s", help="tokens/s one worker serves (measured live)"),
    startup_s: float = typer.Option(30.0, "--startup-s", help="worker launch-to-ready time (measured live)"),
    slo_ms: float = typer.Option(250.0, "--slo-ms", help="target latency per request"),
) -> None:
    """Autoscaled pool vs a static pool sized for the peak: worker-seconds, latency, SLO, failures."""
    from eaas.bench.autoscale_report import plot_timeline, summary_table
    from eaas.platform.autoscale import AutoscalerConfig, SimConfig, TraceSpec, make_trace, run_benchmark
    from eaas.platform.autoscale.simulate import default_peak_tokens_per_s

    def run() -> dict:
        if not simulate:
            from eaas.bench.autoscale_live import run_live

            live_s = 45.0 if duration_s == 3600.0 else duration_s  # live: a short trace unless told
            return run_live(trace, duration_s=live_s, seed=seed, zipf_s=zipf_s, max_replicas=min(max_replicas, 2),
                            slo_ms=slo_ms)  # fmt: skip
        config = AutoscalerConfig(max_replicas=max_replicas)
        sim = SimConfig(capacity_tokens_per_s=capacity_tokens_per_s, startup_s=startup_s, slo_ms=slo_ms)
        probe = TraceSpec(kind=trace, duration_s=duration_s, num_shards=num_shards, num_functions=8 * num_shards,
                          zipf_s=zipf_s, seed=seed)  # fmt: skip
        spec = TraceSpec(kind=trace, duration_s=duration_s, num_shards=num_shards, num_functions=8 * num_shards,
                         zipf_s=zipf_s, seed=seed, peak_tokens_per_s=default_peak_tokens_per_s(config, sim, probe))
        return run_benchmark(make_trace(spec), config, sim)

    _report("autoscale", run, table=summary_table, plot=plot_timeline, json_out=json_out, png=png)


@app.command("serve")
def serve(
    url: str = typer.Option(None, "--url", help="a running gateway (e.g. http://127.0.0.1:8000)"),
    model_dir: str = typer.Option(None, "--model", help="start a gateway on this checkpoint instead (loopback, free port)"),
    monolithic: bool = typer.Option(False, "--monolithic", help="with --model: serve the plain transformers model"),
    concurrency: str = typer.Option("1,8,32", "--concurrency", help="comma-separated concurrency levels"),
    requests_per_client: int = typer.Option(4, "--requests-per-client", help="requests per client and level"),
    max_tokens: int = typer.Option(32, "--max-tokens", help="output tokens per request"),
    prompt_words: int = typer.Option(16, "--prompt-words", help="words per synthetic prompt"),
    torch_threads: int = typer.Option(1, "--torch-threads", help="with --model: the gateway's torch threads"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object instead of the table"),
    png: str = typer.Option(None, "--png", help="write throughput and latency vs concurrency to this PNG"),
) -> None:
    """Closed-loop load on a gateway: requests/s, output tokens/s, TTFT and ITL p50/p99 per concurrency."""
    import contextlib

    from eaas.bench import serve as bs

    if (url is None) == (model_dir is None):
        typer.echo("eaas bench serve: give exactly one of --url or --model", err=True)
        raise typer.Exit(2)

    def run() -> dict:
        levels = tuple(int(c) for c in concurrency.split(",") if c.strip())
        cfg = bs.ServeBenchConfig(concurrencies=levels, requests_per_client=requests_per_client,
                                  max_tokens=max_tokens, prompt_words=prompt_words)
        ctx = (bs.local_gateway(Path(model_dir), monolithic=monolithic, torch_threads=torch_threads)
               if model_dir else contextlib.nullcontext(url.rstrip("/")))
        with ctx as target:
            return bs.run_benchmark(target, cfg)

    _report("serve", run, table=bs.summary_table, plot=bs.plot, json_out=json_out, png=png)


@app.command("transport")
def transport(
    sizes: str = typer.Option("64K,256K,1M,4M,16M", "--sizes", help="comma-separated payload sizes (K/M suffixes)"),
    transports: str = typer.Option("inline_ipc,inline_tcp,shm,nixl", "--transports",
                                   help="inline_ipc, inline_tcp, shm, nixl (nixl skipped when not installed)"),
    iters: int = typer.Option(300, "--iters", min=1, help="timed round trips per transport and size"),
    block: int = typer.Option(50, "--block", min=1,
                              help="back-to-back round trips per row before the next row's turn (1: every sample cold)"),
    hidden: int = typer.Option(1024, "--hidden", min=1, help="row width D of the float32 payload"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object instead of the table"),
    png: str = typer.Option(None, "--png", help="write round trip and ratio vs payload to this PNG"),
) -> None:
    """Round trip p50/p99 and bandwidth per transport vs two in-process copies and bare ZeroMQ."""
    from rich.console import Console

    from eaas.bench import transport as bt

    def run() -> dict:
        cfg = bt.TransportBenchConfig(payload_bytes=tuple(bt.parse_size(s) for s in sizes.split(",") if s.strip()),
                                      transports=tuple(t.strip() for t in transports.split(",") if t.strip()),
                                      iters=iters, block=block, hidden=hidden)
        with Console(stderr=True).status("starting echo peers") as status:
            return bt.run_benchmark(cfg, progress=lambda msg: status.update(msg))

    def checks(result: dict) -> list[str]:
        c = result["checks"]
        small = c["smallest_payload_bytes"] >> 10
        verdict = {True: "yes", False: "no", None: "not measured"}
        return [f"check: {label}: {verdict[c[key]]}" for label, key in (
            ("shm ratio_vs_copy >= 0.6 at >= 4 MiB", "shm_ratio_vs_copy_ge_0.6_at_4MiB_plus"),
            (f"inline_ipc {small} KiB round trip <= 2x bare ZeroMQ", "inline_smallest_within_2x_bare_zmq"),
            (f"shm {small} KiB round trip <= 2x bare ZeroMQ", "shm_smallest_within_2x_bare_zmq"))]

    _report("transport", run, table=bt.summary_table, plot=bt.plot, json_out=json_out, png=png, extra_lines=checks)


@app.command("layer")
def layer(
    tokens: str = typer.Option("16,128,512,2048", "--tokens", help="comma-separated tokens per layer call (T)"),
    workers: int = typer.Option(2, "--workers", min=1, help="expert worker processes (W)"),
    hidden: int = typer.Option(1024, "--hidden", min=1, help="hidden size D"),
    intermediate: int = typer.Option(2816, "--intermediate", min=1, help="expert intermediate size I"),
    experts: int = typer.Option(8, "--experts", min=1, help="routed experts per layer"),
    top_k: int = typer.Option(2, "--top-k", min=1, help="experts per token"),
    replicas: int = typer.Option(1, "--replicas", min=1, help="replicas per expert (W // replicas shard groups)"),
    worker_threads: int = typer.Option(1, "--worker-threads", min=1,
                                       help="torch threads per worker; the monolithic run gets W x this"),
    repeats: int = typer.Option(5, "--repeats", min=1, help="timed calls per side and T (median reported)"),
    warmup: int = typer.Option(2, "--warmup", min=0, help="untimed calls per side and T first"),
    block: int = typer.Option(5, "--block", min=1, help="consecutive calls of one side before the other's turn"),
    inputs: int = typer.Option(1, "--inputs", min=1,
                               help="distinct inputs per T, cycled on both sides (1: the same experts, hot in cache,"
                                    " every call; more: each call's experts colder, as in a decode stream)"),
    transport: str = typer.Option("auto", "--transport", help="data-plane transport: auto, inline, shm, cuda_ipc, nixl"),
    seed: int = typer.Option(0, "--seed", help="seed of the checkpoint and the inputs"),
    monolithic_impl: str = typer.Option(None, "--monolithic-impl",
                                        help="experts implementation of the monolithic block (eager, grouped_mm, ...;"
                                             " default: transformers' default)"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object instead of the table"),
    png: str = typer.Option(None, "--png", help="write tokens/s vs T for both to this PNG"),
) -> None:
    """One MoE layer: EaaS (W workers) vs the same transformers block monolithically, same thread budget."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from eaas.bench import layer as bl

    def run() -> dict:
        ts = [int(t) for t in tokens.split(",") if t.strip()]
        if transport not in ("auto", "inline", "shm", "cuda_ipc", "nixl"):
            raise ValueError(f"unknown transport {transport!r}")
        if top_k > experts:
            raise ValueError(f"--top-k {top_k} > --experts {experts}")
        with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=Console(stderr=True),
                      transient=True) as prog:  # fmt: skip
            task = prog.add_task("starting", total=1.0)
            return bl.run_layer_bench(
                ts, workers=workers, hidden=hidden, intermediate=intermediate, experts=experts, top_k=top_k,
                replicas=replicas, worker_threads=worker_threads, repeats=repeats, warmup=warmup,
                transport=transport, seed=seed, monolithic_impl=monolithic_impl, block=block,
                inputs=inputs, progress=lambda msg, frac: prog.update(task, description=msg, completed=frac),
            )  # fmt: skip

    result = _report("layer", run, table=bl.summary_table, plot=bl.plot, json_out=json_out, png=png)
    if not result["config"]["exact"]:
        typer.echo(f"eaas bench layer: EaaS output differs from monolithic (max rel err "
                   f"{result['config']['max_rel_err']:.2e})", err=True)
        raise typer.Exit(1)


@app.command("failover")
def failover(
    rounds: int = typer.Option(6, "--rounds", min=1, help="paired baseline/fault windows"),
    window_s: float = typer.Option(12.0, "--window-s", min=4.0, help="length of each window (s)"),
    kill_at_s: float = typer.Option(3.0, "--kill-at-s", min=0.5, help="when the SIGKILL comes in a fault window (s)"),
    concurrency: int = typer.Option(8, "--concurrency", min=1, help="closed-loop streaming clients"),
    max_tokens: int = typer.Option(32, "--max-tokens", min=1, help="output tokens per request"),
    workers: int = typer.Option(3, "--workers", min=2, help="expert workers of the deployment"),
    replicas: int = typer.Option(2, "--replicas", min=2, help="replicas of every expert (>= 2)"),
    seed: int = typer.Option(0, "--seed", help="seed of the victim choice"),
    workdir: str = typer.Option(None, "--workdir", help="state/cache/log directory of the deployment (default: a temp dir)"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object instead of the table"),
    png: str = typer.Option(None, "--png", help="write tokens/s and p99 over a window, the kill marked, to this PNG"),
) -> None:
    """Paired windows of the same streamed load with and without a worker SIGKILL: the loss as a
    median with a 95 % interval, the recovery pause (longest token gap at a kill), failures, p99."""
    from rich.console import Console

    from eaas.bench import failover as bf

    def run() -> dict:
        cfg = bf.FailoverBenchConfig(rounds=rounds, window_s=window_s, kill_at_s=kill_at_s, concurrency=concurrency,
                                     max_tokens=max_tokens, workers=workers, replicas=replicas, seed=seed)  # fmt: skip
        with Console(stderr=True).status("starting") as status:
            return bf.run_failover_bench(cfg, workdir=Path(workdir) if workdir else None,
                                         progress=lambda msg: status.update(msg))  # fmt: skip

    _report("failover", run, table=bf.summary_table, plot=bf.plot, json_out=json_out, png=png)


@app.command("e2e")
def e2e(
    model_dir: str = typer.Option(None, "--model", help="checkpoint directory (default: write a Mixtral-shaped one to a temp dir)"),
    layers: int = typer.Option(4, "--layers", min=1, help="without --model: decoder layers of the written checkpoint"),
    hidden: int = typer.Option(1024, "--hidden", min=1, help="without --model: hidden size D"),
    intermediate: int = typer.Option(2816, "--intermediate", min=1, help="without --model: expert intermediate size I"),
    concurrency: str = typer.Option("1,8,32", "--concurrency", help="comma-separated concurrency levels"),
    max_tokens: int = typer.Option(64, "--max-tokens", min=1, help="output tokens per request"),
    requests_per_client: int = typer.Option(4, "--requests-per-client", min=1,
                                            help="requests per client and level (at least 8 per level)"),
    prompt_words: int = typer.Option(16, "--prompt-words", min=1, help="words per synthetic prompt"),
    workers: int = typer.Option(2, "--workers", min=1, help="EaaS expert worker processes (W)"),
    replicas: int = typer.Option(1, "--replicas", min=1, help="EaaS replicas of every expert"),
    torch_threads: int = typer.Option(1, "--torch-threads", min=1,
                                      help="torch threads t per process: monolithic gets (W+1) x t in one process, "
                                           "EaaS t per worker + t in its gateway"),
    expert_kernel: str = typer.Option("onednn", "--expert-kernel",
                                      help="EaaS workers' EAAS_EXPERT_KERNEL: onednn (prepacked weights, the fastest "
                                           "on CPU float32) or eager (transformers' bits)"),
    monolithic_impl: str = typer.Option(None, "--monolithic-impl",
                                        help="force the monolithic experts implementation (eager, grouped_mm, "
                                             "batched_mm; default: the fastest measured here)"),
    engine: str = typer.Option("slots", "--engine", help="runner engine of both gateways: slots, or padded (the previous one)"),
    max_prefill_tokens: int = typer.Option(None, "--max-prefill-tokens", min=1,
                                           help="padded prompt tokens per prefill forward, both gateways (slots engine)"),
    microbatch_min_batch: int = typer.Option(None, "--microbatch-min-batch", min=0,
                                             help="decode steps of at least this many sequences as two overlapped "
                                                  "micro-batches, both gateways (0: never; default: theirs)"),
    workdir: str = typer.Option(None, "--workdir", help="keep logs and deployment state here (default: a temp dir)"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object instead of the table"),
    png: str = typer.Option(None, "--png", help="write throughput and ITL vs concurrency, both sides, to this PNG"),
) -> None:
    """Whole EaaS deployment vs the monolithic transformers gateway on one checkpoint, same load and
    thread budget: output tokens/s, TTFT and ITL p50/p99 per concurrency, and EaaS/monolithic ratios."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from eaas.bench import e2e as be

    def run() -> dict:
        levels = tuple(int(c) for c in concurrency.split(",") if c.strip())
        cfg = be.E2EBenchConfig(concurrencies=levels, max_tokens=max_tokens, requests_per_client=requests_per_client,
                                prompt_words=prompt_words, workers=workers, replicas=replicas,
                                torch_threads=torch_threads, monolithic_impl=monolithic_impl, engine=engine,
                                expert_kernel=expert_kernel,
                                max_prefill_tokens=max_prefill_tokens, microbatch_min_batch=microbatch_min_batch,
                                layers=layers,
                                hidden=hidden, intermediate=intermediate)  # fmt: skip
        with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=Console(stderr=True),
                      transient=True) as prog:  # fmt: skip
            task = prog.add_task("starting", total=1.0)
            return be.run_e2e_bench(cfg, model_dir=Path(model_dir) if model_dir else None,
                                    workdir=Path(workdir) if workdir else None,
                                    progress=lambda msg, frac: prog.update(task, description=msg, completed=frac))

    _report("e2e", run, table=be.summary_table, plot=be.plot, json_out=json_out, png=png,
            extra_lines=be.summary_lines)


@app.command("balance")
def balance(
    model_dir: str = typer.Option(None, "--model", help="checkpoint from `eaas checkpoint train` (default: the shipped pydoc-mixtral)"),
    workers: int = typer.Option(4, "--workers", min=2, help="shard workers at start"),
    replicas: int = typer.Option(2, "--replicas", min=1, help="replicas of every expert among them (groups = workers / replicas)"),
    concurrency: int = typer.Option(4, "--concurrency", min=1, help="closed-loop streaming clients"),
    max_tokens: int = typer.Option(32, "--max-tokens", min=1, help="output tokens per request"),
    phase_s: float = typer.Option(75.0, "--phase-s", min=10.0, help="length of each phase (mix A, then mix B), s"),
    sample_s: float = typer.Option(2.0, "--sample-s", min=0.5, help="registry sampling period, s"),
    tail_s: float = typer.Option(30.0, "--tail-s", min=2.0, help="end of each phase that counts as 'after', s"),
    upscale_delay_s: float = typer.Option(20.0, "--upscale-delay-s", min=0.0, help="autoscaler: delay before a better placement of extra replicas applies"),
    downscale_delay_s: float = typer.Option(30.0, "--downscale-delay-s", min=0.0, help="autoscaler: delay before a placement with fewer extra replicas applies"),
    balance_target: float = typer.Option(0.9, "--balance-target", min=0.01, max=1.0, help="autoscaler: balancedness (vLLM EPLB, per layer) it plans extra replicas up to"),
    max_hot_replicas: int = typer.Option(2, "--max-hot-replicas", min=0, help="autoscaler: most extra replicas per expert (0: none, the baseline)"),
    seed: int = typer.Option(0, "--seed", help="prompt order"),
    workdir: str = typer.Option(None, "--workdir", help="keep logs and deployment state here (default: a temp dir)"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object instead of the table"),
    png: str = typer.Option(None, "--png", help="write balancedness and per-worker load over time to this PNG"),
) -> None:
    """Live extra replicas of hot experts under held-out-text load whose mix changes halfway: balancedness
    before / after, the longest token gap around each rebalance, failed requests (about 2 x --phase-s + 30 s)."""
    import tempfile

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from eaas.bench import balance as bb

    def run() -> dict:
        cfg = bb.BalanceBenchConfig(model_dir=Path(model_dir) if model_dir else None, workers=workers,
                                    replicas=replicas, concurrency=concurrency, max_tokens=max_tokens, phase_s=phase_s,
                                    sample_s=sample_s, tail_s=min(tail_s, phase_s), upscale_delay_s=upscale_delay_s,
                                    downscale_delay_s=downscale_delay_s, look_back_s=min(4.0, downscale_delay_s),
                                    balance_target=balance_target, max_hot_replicas=max_hot_replicas, seed=seed)
        with tempfile.TemporaryDirectory(prefix="eaas-bench-balance-") as tmp, \
                Progress(TextColumn("balance"), BarColumn(), TimeElapsedColumn(), console=Console(stderr=True),
                         transient=True) as prog:  # fmt: skip
            task = prog.add_task("run", total=2 * phase_s)
            return bb.run_balance_bench(cfg, Path(workdir) if workdir else Path(tmp),
                                        progress=lambda done, _total: prog.update(task, completed=done))

    _report("balance", run, table=bb.summary_table, plot=bb.plot, json_out=json_out, png=png)
