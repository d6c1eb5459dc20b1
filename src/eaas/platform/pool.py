"""The local worker pool: ``eaas worker`` processes on this machine.

The autoscaler (and ``eaas up``) act on the pool; the pool owns processes, the
registry owns the truth about membership. :meth:`LocalPool.workers` reads the
registry, so a pool object created after a restart adopts the workers it finds
(no duplicates, no orphans); workers it started itself and that are still
loading their weights (not registered yet) are added as ``starting``.

Warm pool: a worker registers only after its shard is loaded, so "ready in the
registry" means "serving". Scale-down always drains: SIGTERM to a child (or
the registry's ``draining`` state for a worker this object did not start);
the worker finishes its queue, deregisters and exits 0.

Children die with the process that holds the pool (``PR_SET_PDEATHSIG``,
SIGTERM -> a drain). The kernel sends that signal when the *thread* that forked
the child ends, so every child is forked from one long-lived spawner thread,
never from a short-lived caller thread (e.g. an autoscaler loop being stopped).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Mapping

from eaas.procs import die_with_parent as die_with_parent_fn, own_group, pid_alive
from eaas.errors import EaaSError, NotFound
from eaas.registry.records import WorkerRecord, WorkerState
from eaas.registry.store import Registry

log = logging.getLogger(__name__)

DEFAULT_READY_TIMEOUT_S = 120.0  # a worker's import + shard load + registration
DEFAULT_DRAIN_TIMEOUT_S = 30.0  # queued work + the worker's idle grace period

_SPAWNER: concurrent.futures.ThreadPoolExecutor | None = None
_SPAWNER_LOCK = threading.Lock()


class PoolError(EaaSError):
    """A pool worker failed to start, become ready, or exit."""


class WorkerExitedEarly(PoolError):
    """A worker process exited before it registered ready (its log tail is in the message)."""


def _spawner() -> concurrent.futures.ThreadPoolExecutor:
    """The process-wide thread every child is forked from (see module docstring)."""
    global _SPAWNER
    with _SPAWNER_LOCK:
        if _SPAWNER is None:
            _SPAWNER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="eaas-pool-spawner")
        return _SPAWNER


@dataclass(frozen=True, slots=True)
class WorkerHandle:
    """A worker process this pool started.

    Attributes:
        worker_id: its registry id (chosen by the pool).
        model: registered model name.
        shard_name: shard group name (the autoscaler's unit).
        spec: shard SPEC passed to ``eaas worker --shard``.
        pid: process id.
        started_at_s: unix time the process was launched.
        log_path: file receiving its stdout and stderr.
    """

    worker_id: str
    model: str
    shard_name: str
    spec: str
    pid: int
    started_at_s: float
    log_path: str


@dataclass(frozen=True, slots=True)
class PoolMember:
    """One member of the pool as seen now (registry record, or a child still loading).

    Attributes:
        worker_id: registry id.
        shard_name: shard group name.
        state: ``starting`` (launched, not registered yet), ``ready`` or ``draining``.
        pid: process id (0 if unknown).
        local: this pool object started it (it can signal and reap it).
        record: its registry record (``None`` while starting).
        launched_at_s: unix time its process started (0 if unknown).
    """

    worker_id: str
    shard_name: str
    state: WorkerState
    pid: int
    local: bool
    record: WorkerRecord | None = None
    launched_at_s: float = 0.0


class LocalPool:
    """Start, drain and list ``eaas worker`` processes of one deployment on this machine.

    Args:
        registry: the deployment's registry (its prefix is passed to children).
        redis_url: Redis URL for children (default: ``EAAS_REDIS_URL`` of ``env`` or the environment).
        env: extra environment for children (on top of ``os.environ``).
        log_dir: directory for per-worker log files (default: a fresh temp dir).
        torch_threads: torch intra-op threads per worker.
        python: interpreter to run (default: this one).
        die_with_parent: children drain when this process dies (``False``: they
            outlive it, and a restarted autoscaler adopts them from the registry).
    """

    def __init__(
        self,
        registry: Registry,
        *,
        redis_url: str | None = None,
        env: Mapping[str, str] | None = None,
        log_dir: str | Path | None = None,
        torch_threads: int = 1,
        python: str | None = None,
        die_with_parent: bool = True,
    ) -> None:
        self.registry = registry
        self._preexec = die_with_parent_fn if die_with_parent else own_group
        self._env = dict(os.environ)
        self._env.update(env or {})
        url = redis_url or self._env.get("EAAS_REDIS_URL")
        if url:
            self._env["EAAS_REDIS_URL"] = url
        self._env["EAAS_PREFIX"] = registry.prefix
        self._env["EAAS_TORCH_THREADS"] = str(torch_threads)
        self._env["OMP_NUM_THREADS"] = str(torch_threads)
        self._env.setdefault("PYTHONUNBUFFERED", "1")
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="eaas-pool-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.python = python or sys.executable
        self._lock = threading.Lock()
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._handles: dict[str, WorkerHandle] = {}
        self._logs: dict[str, IO[bytes]] = {}
        self._seen_registered: set[str] = set()

    # --- starting ---------------------------------------------------------------

    def start(self, shard_name: str, spec: str, model: str, *, worker_id: str | None = None) -> WorkerHandle:
        """Launch one worker (returns at once; it serves after :meth:`wait_ready`).

        Args:
            shard_name: shard group name (registry ``shard_name``).
            spec: shard SPEC (see :mod:`eaas.platform.shards`).
            model: registered model name.
            worker_id: registry id (default ``{model}-{shard_name}-{random}``).

        Raises:
            PoolError: the process could not be launched.
        """
        wid = worker_id or f"{model}-{shard_name}-{uuid.uuid4().hex[:6]}".replace(":", "-").replace("/", "-")
        log_path = self.log_dir / f"{wid}.log"
        cmd = [self.python, "-m", "eaas.cli", "worker", "--model", model, "--shard", spec,
               "--shard-name", shard_name, "--id", wid]  # fmt: skip
        out = open(log_path, "ab")  # noqa: SIM115 - closed when the child is reaped

        def launch() -> subprocess.Popen[bytes]:
            return subprocess.Popen(cmd, env=self._env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, preexec_fn=self._preexec)  # fmt: skip

        try:
            proc = _spawner().submit(launch).result()
        except OSError as e:
            out.close()
            raise PoolError(f"worker {wid}: could not launch {cmd[0]}: {e}") from e
        handle = WorkerHandle(wid, model, shard_name, spec, proc.pid, time.time(), str(log_path))
        with self._lock:
            self._procs[wid] = proc
            self._handles[wid] = handle
            self._logs[wid] = out
        log.info("worker %s: launched (pid %d, shard %s = %s)", wid, proc.pid, shard_name, spec)
        return handle

    def wait_ready(self, handles: list[WorkerHandle], timeout_s: float = DEFAULT_READY_TIMEOUT_S) -> list[WorkerRecord]:
        """Wait until every handle's worker is registered and ``ready``.

        Raises:
            PoolError: a worker exited first (its log tail is quoted) or the timeout passed.
        """
        want = {h.worker_id: h for h in handles}
        deadline = time.monotonic() + timeout_s
        while True:
            ready = {r.id: r for r in self.registry.workers() if r.id in want and r.state is WorkerState.READY}
            if len(ready) == len(want):
                return [ready[w] for w in want]
            for wid in want:
                proc = self._procs.get(wid)
                if wid not in ready and proc is not None and proc.poll() is not None:
                    raise WorkerExitedEarly(f"worker {wid}: exited with {proc.returncode} before ready; log tail:\n{self.log_tail(wid)}")
            if time.monotonic() > deadline:
                missing = sorted(set(want) - set(ready))
                raise PoolError(f"workers {missing} not ready after {timeout_s:g}s")
            time.sleep(0.05)

    def log_tail(self, worker_id: str, max_bytes: int = 2000) -> str:
        """The last ``max_bytes`` of a child's log ('' if none)."""
        h = self._handles.get(worker_id)
        if h is None:
            return ""
        try:
            data = Path(h.log_path).read_bytes()
        except OSError:
            return ""
        return data[-max_bytes:].decode(errors="replace")

    # --- membership ---------------------------------------------------------------

    def workers(self, model: str | None = None) -> list[PoolMember]:
        """Current members: every live registry worker (of ``model``) plus own children still loading.

        A child that has exited is reaped here (and its handle dropped).
        """
        self.reap()
        records = self.registry.workers(model)
        members = []
        registered = set()
        for r in records:
            registered.add(r.id)
            members.append(PoolMember(r.id, r.shard_name, r.state, r.pid, r.id in self._procs, r, r.started_at_s))
        with self._lock:
            self._seen_registered.update(registered & set(self._procs))
            for wid, h in self._handles.items():
                if wid in registered or (model is not None and h.model != model):
                    continue
                state = WorkerState.DRAINING if wid in self._seen_registered else WorkerState.STARTING
                members.append(PoolMember(wid, h.shard_name, state, h.pid, True, None, h.started_at_s))
        return members

    def by_shard(self, model: str | None = None) -> dict[str, list[PoolMember]]:
        """:meth:`workers` grouped by shard name."""
        out: dict[str, list[PoolMember]] = {}
        for m in self.workers(model):
            out.setdefault(m.shard_name, []).append(m)
        return out

    def reap(self) -> dict[str, int]:
        """Collect children that exited; returns ``{worker_id: exit code}``.

        A child that exited with an error (killed, crashed) is deregistered at once: clients
        route around it on the ``worker_gone`` event instead of retrying a dead endpoint until
        its lease expires (each retry costs them a connection timeout). A clean exit (0)
        deregistered itself at the end of its drain.
        """
        done: dict[str, int] = {}
        with self._lock:
            for wid, proc in list(self._procs.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                done[wid] = rc
                self._procs.pop(wid)
                self._handles.pop(wid, None)
                self._seen_registered.discard(wid)
                f = self._logs.pop(wid, None)
                if f is not None:
                    f.close()
        for wid, rc in done.items():
            (log.info if rc == 0 else log.warning)("worker %s: exited with %d", wid, rc)
            if rc != 0:
                try:
                    self.registry.deregister_worker(wid)
                except EaaSError as e:
                    log.warning("worker %s: deregistration after its exit failed (%s); its lease will expire", wid, e)
        return done

    # --- stopping -------------------------------------------------------------

    def drain(self, worker_id: str, *, wait: bool = True, timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S) -> int | None:
        """Drain one worker: it finishes queued work, deregisters and exits 0.

        Own children get SIGTERM; other workers (adopted after a restart) are
        set ``draining`` in the registry and exit by themselves.

        Args:
            worker_id: registry id.
            wait: wait until it has exited (and is gone from the registry).
            timeout_s: how long to wait; a child still alive then is SIGKILLed.

        Returns:
            The exit code of an own child once reaped, else ``None``.

        Raises:
            PoolError: ``wait`` and an adopted worker still registered after ``timeout_s``.
        """
        proc = self._procs.get(worker_id)
        if proc is not None:
            log.info("worker %s: draining (SIGTERM to pid %d)", worker_id, proc.pid)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            if not wait:
                return None
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("worker %s: still alive %gs after SIGTERM, SIGKILL", worker_id, timeout_s)
                proc.kill()
                proc.wait()
            rc = proc.returncode
            self.reap()
            return rc
        log.info("worker %s: draining through the registry", worker_id)
        try:
            rec = self.registry.worker(worker_id)
            self.registry.set_worker_state(worker_id, WorkerState.DRAINING)
        except NotFound:
            return None
        if wait:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                gone = worker_id not in self.registry.worker_ids()
                if gone and not (rec.host_id and _same_host(rec) and pid_alive(rec.pid)):
                    return None
                time.sleep(0.05)
            raise PoolError(f"worker {worker_id}: still registered {timeout_s:g}s after drain")
        return None

    def kill(self, worker_id: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a worker's process (fault injection; SIGKILL leaves a lease to expire).

        Raises:
            NotFound: no such child, nor a registered worker with a pid.
        """
        proc = self._procs.get(worker_id)
        if proc is not None:
            proc.send_signal(sig)
            return
        rec = self.registry.worker(worker_id)
        if rec.pid <= 0:
            raise NotFound(f"worker {worker_id!r} has no pid on record")
        os.kill(rec.pid, sig)

    def stop_all(
        self, timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S, model: str | None = None, *, adopted: bool = True
    ) -> dict[str, int | None]:
        """Drain every member in parallel and reap children.

        Args:
            timeout_s: total wait; children still alive then are SIGKILLed.
            model: only this model's workers (default: every model).
            adopted: also drain workers this object did not start (through the registry).

        Returns:
            ``{worker_id: exit code}`` (``None`` for workers this object did not start).
        """
        members = [m for m in self.workers(model) if (m.local or adopted) and (m.local or m.state is not WorkerState.DRAINING)]
        for m in members:
            try:
                self.drain(m.worker_id, wait=False)
            except EaaSError as e:
                log.warning("worker %s: drain failed: %s", m.worker_id, e)
        deadline = time.monotonic() + timeout_s
        out: dict[str, int | None] = {}
        for m in members:
            proc = self._procs.get(m.worker_id)
            if proc is None:
                out[m.worker_id] = None
                continue
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %s: not drained after %gs, SIGKILL", m.worker_id, timeout_s)
                proc.kill()
                proc.wait()
            out[m.worker_id] = proc.returncode
        others = [m.worker_id for m in members if m.worker_id not in self._procs]
        while others and time.monotonic() < deadline and set(others) & set(self.registry.worker_ids()):
            time.sleep(0.05)
        self.reap()
        return out

    def __enter__(self) -> "LocalPool":
        return self

    def __exit__(self, *_: object) -> None:
        self.stop_all()


def _same_host(rec: WorkerRecord) -> bool:
    """Whether a registry record describes a process on this machine (same host id as ours)."""
    from eaas.platform.transport.select import _host_ids

    return _host_ids()[0] == rec.host_id
