"""`eaas bench serve`: closed-loop load on a gateway, in the spirit of ``vllm bench serve``.

At each concurrency level ``C``, ``C`` clients each send a streaming completion, wait
for its end, and send the next, until the level's request budget is spent. Measured
per level: requests/s, output tokens/s, time to first token (TTFT) and inter-token
latency (ITL) p50/p99, failed requests. Loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np

from eaas.errors import ConfigError
from eaas.registry.server import free_port


@dataclass(frozen=True, slots=True)
class ServeBenchConfig:
    """What one benchmark run sends."""

    concurrencies: tuple[int, ...] = (1, 8, 32)
    requests_per_client: int = 4
    min_requests: int = 8
    max_tokens: int = 32
    prompt_words: int = 16
    timeout_s: float = 120.0


@dataclass(slots=True)
class _Sample:
    ok: bool
    output_tokens: int = 0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)


def _pct_ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1e3, 3) if values else None


async def _one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, cfg: ServeBenchConfig) -> _Sample:
    body = {"model": model, "prompt": prompt, "max_tokens": cfg.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    sample = _Sample(ok=False)
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return sample
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return sample
                n = sum(len(c.get("token_ids") or []) for c in event.get("choices", []))
                if n == 0:
                    continue
                now = time.perf_counter()
                if sample.ttft_s is None:
                    sample.ttft_s = now - start
                else:
                    sample.itl_s.extend([(now - last) / n] * n)
                last = now
                sample.output_tokens += n
        sample.ok = sample.output_tokens > 0
    except httpx.HTTPError:
        sample.ok = False
    return sample


def synthetic_prompts(count: int, words_per_prompt: int) -> list[str]:
    """The benchmark's prompts: ``words_per_prompt`` words from a fixed list, then the prompt's index."""
    words = "the quick brown fox jumps over the lazy dog experts serve mixture models".split()
    return [" ".join(words[(i + j) % len(words)] for j in range(words_per_prompt)) + f" {i}" for i in range(count)]


async def run_level(url: str, model: str, concurrency: int, cfg: ServeBenchConfig) -> dict:
    """Closed-loop load at one concurrency; returns one result row."""
    num_requests = max(cfg.min_requests, concurrency * cfg.requests_per_client)
    prompts = synthetic_prompts(num_requests, cfg.prompt_words)
    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    samples: list[_Sample] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=cfg.timeout_s, limits=limits) as client:

        async def user() -> None:
            while not queue.empty():
                prompt = queue.get_nowait()
                samples.append(await _one_request(client, url, model, prompt, cfg))

        start = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(concurrency)))
        elapsed_s = time.perf_counter() - start
    ok = [s for s in samples if s.ok]
    ttft = [s.ttft_s for s in ok if s.ttft_s is not None]
    itl = [x for s in ok for x in s.itl_s]
    return {
        "concurrency": concurrency,
        "num_requests": len(samples),
        "duration_s": round(elapsed_s, 3),
        "requests_per_s": round(len(ok) / elapsed_s, 3),
        "output_tokens_per_s": round(sum(s.output_tokens for s in ok) / elapsed_s, 2),
        "ttft_p50_ms": _pct_ms(ttft, 50),
        "ttft_p99_ms": _pct_ms(ttft, 99),
        "itl_p50_ms": _pct_ms(itl, 50),
        "itl_p99_ms": _pct_ms(itl, 99),
        "failed_requests": len(samples) - len(ok),
    }


def wait_ready(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Poll ``{url}/readyz`` until 200 or ``timeout_s`` passes (then raise)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ConfigError(f"the gateway exited with code {proc.returncode} before it was ready")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise ConfigError(f"the gateway at {url} was not ready within {timeout_s:.0f} s")


@contextlib.contextmanager
def local_gateway(model_dir: Path, *, monolithic: bool = True, torch_threads: int = 1,
                  experts_implementation: str | None = None, log_path: Path | None = None,
                  extra_env: dict[str, str] | None = None) -> Iterator[str]:
    """Start ``eaas gateway`` on a free loopback port in a subprocess; yield its URL.

    Args:
        model_dir: checkpoint directory.
        monolithic: ``--monolithic`` (the plain transformers model).
        torch_threads: ``--torch-threads`` and ``OMP_NUM_THREADS`` of the gateway.
        experts_implementation: ``--experts-implementation`` (monolithic only; None: transformers' default).
        extra_env: more environment for the gateway (e.g. ``EAAS_ENGINE``).
        log_path: write the gateway's stderr to this file (and quote its tail if it does not
            start); None: a pipe, as before.

    Raises:
        ConfigError: the gateway exited or was not ready within 120 s.
    """
    port = free_port()
    cmd = [sys.executable, "-m", "eaas.cli", "gateway", "--model", str(model_dir), "--port", str(port),
           "--host", "127.0.0.1", "--torch-threads", str(torch_threads)]
    if monolithic:
        cmd.append("--monolithic")
    if experts_implementation:
        cmd += ["--experts-implementation", experts_implementation]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch_threads))
    env.update(extra_env or {})
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log_file)
    else:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_ready(url, 120, proc)
        except ConfigError as exc:
            if log_path is None:
                raise
            tail = Path(log_path).read_bytes()[-3000:].decode(errors="replace")
            raise ConfigError(f"{exc}:\n{tail}") from None
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_benchmark(url: str, cfg: ServeBenchConfig, model: str | None = None) -> dict:
    """Every level against ``url``; returns ``{"benchmark": "serve", "config", "rows"}``."""
    if model is None:
        models = httpx.get(url + "/v1/models", timeout=10).json()["data"]
        model = models[0]["id"]
    # warm-up: first-call costs out of the measurement
    asyncio.run(run_level(url, model, 1, ServeBenchConfig(min_requests=1, requests_per_client=1, max_tokens=4)))
    rows = [asyncio.run(run_level(url, model, c, cfg)) for c in cfg.concurrencies]
    base = rows[0]["output_tokens_per_s"] or 1.0
    for row in rows:
        row["speedup_vs_c1"] = round(row["output_tokens_per_s"] / base, 2)
    return {"benchmark": "serve", "config": {**asdict(cfg), "url": url, "model": model}, "rows": rows}


def summary_table(result: dict):
    """The rich table of a ``bench serve`` result (one row per concurrency)."""
    from rich.table import Table

    cfg = result["config"]
    table = Table(title=f"eaas bench serve: {cfg['model']} @ {cfg['url']} (max_tokens={cfg['max_tokens']})")
    cols = ["concurrency", "num_requests", "requests_per_s", "output_tokens_per_s", "speedup_vs_c1",
            "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "failed_requests"]
    for c in cols:
        table.add_column(c.replace("_", " "), justify="right")
    for row in result["rows"]:
        table.add_row(*("-" if row.get(c) is None else str(row.get(c)) for c in cols))
    return table


def plot(result: dict, path: Path) -> None:
    """Throughput and latency against concurrency, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    conc = [r["concurrency"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(conc, [r["output_tokens_per_s"] for r in rows], marker="o")
    a.set_xscale("log", base=2)
    a.set_xlabel("concurrency")
    a.set_ylabel("output tokens/s")
    a.set_title("throughput")
    for key in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"):
        b.plot(conc, [r[key] if r[key] is not None else float("nan") for r in rows], marker="o", label=key)
    b.set_xscale("log", base=2)
    b.set_yscale("log")
    b.set_xlabel("concurrency")
    b.set_ylabel("ms")
    b.set_title("latency")
    b.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
