"""What the benchmarks and load tests share: bringing a deployment up, and hurting it.

- :func:`local_stack` — a private Redis, a checkpoint registered under a fresh prefix, and
  a local worker pool: the bring-up ``eaas bench layer`` and the live autoscaling bench share.
- :class:`UpProcess` — a whole ``eaas up`` in a subprocess (``eaas bench failover``,
  ``loadtest/run.py``).
- :class:`FaultInjector` — SIGKILL a random ready worker on a schedule (the failover bench,
  ``loadtest/faults.py``).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from eaas.errors import EaaSError
from eaas.registry.records import WorkerState
from eaas.registry.store import Registry

log = logging.getLogger(__name__)


@dataclass
class Stack:
    """What :func:`local_stack` brought up (everything is stopped when its ``with`` ends).

    Attributes:
        redis_url: the private Redis.
        registry: the registry under a fresh prefix.
        model: the registered model's name; spec: its :class:`~eaas.functions.ModelSpec`.
        checkpoint: the checkpoint directory.
        pool: a :class:`~eaas.platform.pool.LocalPool` on that registry.
        workdir: a temporary directory (logs, the checkpoint).
    """

    redis_url: str
    registry: Registry
    model: str
    spec: Any
    checkpoint: Path
    pool: Any
    workdir: Path


@contextlib.contextmanager
def local_stack(write_checkpoint: Callable[[Path], Path], *, torch_threads: int = 1,
                env: dict[str, str] | None = None, tag: str = "bench") -> Iterator[Stack]:
    """Start a private Redis, write and register a checkpoint, open a worker pool; undo it all after.

    Args:
        write_checkpoint: ``write_checkpoint(directory) -> checkpoint path`` (e.g. a tiny Mixtral).
        torch_threads: torch threads per pool worker.
        env: extra environment for the pool's workers.
        tag: prefix of the registry prefix and the temp directory.

    Raises:
        RegistryUnavailable: Redis did not start. CheckpointError: the checkpoint is unusable.
    """
    from eaas.functions import inspect_checkpoint
    from eaas.platform.pool import LocalPool
    from eaas.registry.server import RedisServer

    with RedisServer() as server, tempfile.TemporaryDirectory(prefix=f"eaas-{tag}-") as tmp:
        registry = Registry.from_url(server.url, f"{tag}{uuid.uuid4().hex[:6]}")
        try:
            ckpt = write_checkpoint(Path(tmp))
            spec, fns = inspect_checkpoint(ckpt)
            registry.register_model(spec.to_dict(), [f.to_dict() for f in fns])
            pool = LocalPool(registry, redis_url=server.url, log_dir=Path(tmp) / "logs", torch_threads=torch_threads,
                             env=env)  # fmt: skip
            try:
                yield Stack(server.url, registry, spec.name, spec, ckpt, pool, Path(tmp))
            finally:
                pool.stop_all(timeout_s=20)
        finally:
            registry.close()


class FailoverBenchError(EaaSError):
    """The benchmark's deployment did not start, or did not recover in time."""


# --- the deployment -----------------------------------------------------------------


class UpProcess:
    """A fresh ``eaas up`` in a subprocess: isolated state/cache dirs, a private Redis, a free port.

    Args:
        workdir: directory for ``state/``, ``cache/`` (the tiny model is written once here) and ``up.log``.
        workers: ``--workers``.
        replicas: ``--replicas``.
        autoscale: run the autoscaler (it replaces killed workers).
        port: gateway port (0: a free one).
        extra_env: more environment for ``eaas up`` (e.g. ``EAAS_API_KEYS``).
        ready_timeout_s: how long to wait for ``/readyz``.
        model_dir: ``--model`` (default: ``eaas up``'s tiny Mixtral, written under ``cache/``).
        extra_args: more ``eaas up`` arguments (e.g. ``["--torch-threads", "2"]``).
    """

    def __init__(self, workdir: Path, *, workers: int = 3, replicas: int = 2, autoscale: bool = True, port: int = 0,
                 extra_env: dict[str, str] | None = None, ready_timeout_s: float = 240.0,
                 model_dir: Path | None = None, extra_args: Sequence[str] = ()) -> None:  # fmt: skip
        from eaas.registry.server import free_port

        self.workdir = Path(workdir)
        self.workers, self.replicas, self.autoscale = workers, replicas, autoscale
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready_timeout_s = ready_timeout_s
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.extra_args = [str(a) for a in extra_args]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("EAAS_")}
        self.env.update(EAAS_STATE_DIR=str(self.workdir / "state"), EAAS_CACHE_DIR=str(self.workdir / "cache"),
                        OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", COLUMNS="200", **(extra_env or {}))  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "up.log"
        self._registry: Registry | None = None

    def start(self) -> "UpProcess":
        """Launch and wait for ``/readyz`` (raises :class:`FailoverBenchError` with the log tail on failure)."""
        import httpx

        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "eaas.cli", "up", "--port", str(self.port), "--workers", str(self.workers),
               "--replicas", str(self.replicas), "--autoscale" if self.autoscale else "--no-autoscale"]  # fmt: skip
        if self.model_dir is not None:
            cmd += ["--model", str(self.model_dir)]
        cmd += self.extra_args
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise FailoverBenchError(f"eaas up exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise FailoverBenchError(f"eaas up not ready after {self.ready_timeout_s:g}s:\n{self.log_tail()}")

    def log_tail(self, max_bytes: int = 3000) -> str:
        try:
            return self.log_path.read_bytes()[-max_bytes:].decode(errors="replace")
        except OSError:
            return ""

    @property
    def state(self) -> dict[str, Any]:
        return json.loads((self.workdir / "state" / "deployment.json").read_text())

    def registry(self) -> Registry:
        """The deployment's registry (from its state file; one connection, reused)."""
        if self._registry is None:
            st = self.state
            self._registry = Registry.from_url(st["redis_url"], st["prefix"])
        return self._registry

    def stop(self, timeout_s: float = 90.0) -> int | None:
        """SIGTERM (workers drain, state file removed); SIGKILL after ``timeout_s``. Returns the exit code."""
        if self._registry is not None:
            self._registry.close()
            self._registry = None
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("eaas up: still alive %gs after SIGTERM, SIGKILL", timeout_s)
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> "UpProcess":
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def ready_workers(registry: Registry, model: str | None = None) -> list[Any]:
    """Registry records of the ready workers (of ``model``)."""
    return [w for w in registry.workers(model) if w.state is WorkerState.READY]


def wait_pool_size(registry: Registry, size: int, timeout_s: float, model: str | None = None) -> float:
    """Wait until ``size`` workers are ready; returns the seconds waited.

    Raises:
        FailoverBenchError: not back to ``size`` within ``timeout_s``.
    """
    t0 = time.monotonic()
    while True:
        if len(ready_workers(registry, model)) >= size:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            raise FailoverBenchError(f"pool not back to {size} ready workers after {timeout_s:g}s")
        time.sleep(0.2)


# --- fault injection ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Kill:
    """One SIGKILL: unix time, worker id and pid, and ready workers just before."""

    at_s: float
    worker_id: str
    pid: int
    ready_before: int


class FaultInjector:
    """SIGKILL a random ready worker every ``interval_s``, at most ``max_kills`` times.

    A kill happens only while at least ``min_ready`` workers are ready (so with
    ``min_ready`` = the pool size, the previous victim has been replaced first and
    every expert keeps a replica); a kill that waits for that slips, it is not
    skipped. Only workers on this host (same pid namespace) can be killed.

    Args:
        registry: the deployment's registry.
        interval_s: time from the start (or the previous kill) to the next kill.
        max_kills: bound on the number of kills.
        min_ready: ready workers required before a kill.
        model: only this model's workers (default: any).
        seed: seed of the victim choice.
    """

    def __init__(self, registry: Registry, *, interval_s: float, max_kills: int, min_ready: int = 2,
                 model: str | None = None, seed: int = 0) -> None:  # fmt: skip
        self.registry, self.interval_s, self.max_kills = registry, interval_s, max_kills
        self.min_ready, self.model = min_ready, model
        self.rng = random.Random(seed)
        self.kills: list[Kill] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run(self, until_s: float | None = None) -> list[Kill]:
        """Kill on schedule until ``max_kills`` are done, :meth:`stop` is called, or unix time ``until_s``."""
        next_s = time.time() + self.interval_s
        while len(self.kills) < self.max_kills and not self._stop.is_set():
            now = time.time()
            if until_s is not None and now >= until_s:
                break
            if now < next_s:
                self._stop.wait(min(0.2, next_s - now))
                continue
            try:
                ready = ready_workers(self.registry, self.model)
            except EaaSError as e:
                log.warning("faults: registry read failed: %s", e)
                self._stop.wait(0.2)
                continue
            victims = [w for w in ready if w.pid > 0]
            if len(ready) < self.min_ready or not victims:
                self._stop.wait(0.2)  # the previous victim is not replaced yet: slip
                continue
            w = self.rng.choice(victims)
            try:
                os.kill(w.pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.kills.append(Kill(time.time(), w.id, w.pid, len(ready)))
            log.info("faults: worker %s (pid %d) SIGKILLed, %d were ready", w.id, w.pid, len(ready))
            next_s = time.time() + self.interval_s
        return self.kills

    def start(self, until_s: float | None = None) -> "FaultInjector":
        self._thread = threading.Thread(target=self.run, args=(until_s,), name="eaas-faults", daemon=True)
        self._thread.start()
        return self

    def wait(self, timeout_s: float) -> bool:
        """Wait for the kill schedule to end (at most ``timeout_s``); True when it has."""
        if self._thread is not None:
            self._thread.join(timeout_s)
            return not self._thread.is_alive()
        return True

    def stop(self) -> list[Kill]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        return self.kills

    def write(self, path: Path) -> None:
        """The kills as CSV (``.csv``) or JSON (anything else): at_s, worker_id, pid, ready_before."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [asdict(k) for k in self.kills]
        if path.suffix == ".csv":
            with open(path, "w", newline="") as f:
                wr = csv.DictWriter(f, fieldnames=["at_s", "worker_id", "pid", "ready_before"])
                wr.writeheader()
                wr.writerows(rows)
        else:
            path.write_text(json.dumps(rows, indent=1))


