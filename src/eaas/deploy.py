"""The whole system on one machine: what ``eaas up`` starts and stops.

In order (DESIGN.md, "The main job"): a private Redis unless ``EAAS_REDIS_URL``
is set; the model registered (``--model DIR``, default the trained ``pydoc-mixtral``
shipped in the package, :func:`packaged_model_dir`); a warm pool of expert workers with every
expert on at least ``replicas`` replicas; the autoscaler; the gateway with an
attention client. :meth:`LocalDeployment.stop` undoes it all in reverse order:
no orphan process, no leaked shared memory, state file removed.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from eaas.errors import ConfigError, EaaSError, NotFound
from eaas.functions import inspect_checkpoint
from eaas.gateway.serve import assemble_gateway
from eaas.platform.autoscale.config import AutoscalerConfig, config_from_env
from eaas.platform.autoscale.mechanism import Autoscaler
from eaas.platform.integration import load_model
from eaas.platform.pool import LocalPool, PoolError, WorkerExitedEarly
from eaas.platform.shards import plan_pool
from eaas.registry.deployment import claim_state, clear_state
from eaas.registry.records import WorkerState
from eaas.registry.server import RedisServer
from eaas.registry.store import Registry
from eaas.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "pydoc-mixtral"
"""The model ``eaas up`` serves without ``--model``: a small Mixtral trained by
``eaas checkpoint train`` on Python's own documentation, shipped in the package."""
KEEP_LOG_DIRS = 5
"""Log directories of past deployments kept under ``<state_dir>/logs`` (the newest ones)."""

Progress = Callable[[str, int, int], None]
"""``progress(step, done, total)``: a hook for the CLI's progress display."""


def packaged_model_dir() -> Path:
    """The trained default checkpoint inside the installed package (read-only; no download).

    Raises:
        CheckpointError: the package was installed without its model files.
    """
    from importlib import resources

    from eaas.errors import CheckpointError

    path = Path(str(resources.files("eaas.data").joinpath("models", DEFAULT_MODEL_NAME)))
    if not (path / "config.json").is_file():
        raise CheckpointError(f"the default model is missing from the package ({path}); reinstall eaas or pass --model DIR")
    return path


def deployment_log_dir(state_dir: Path, keep: int = KEEP_LOG_DIRS, now: float | None = None) -> Path:
    """Create and return a fresh log directory for one deployment; prune old ones.

    Layout: ``<state_dir>/logs/up-YYYYmmdd-HHMMSS-<pid>/<worker id>.log``. Of the
    existing ``up-*`` directories only the ``keep - 1`` newest (by name, which
    sorts by start time) survive, so with the new one there are at most ``keep``.
    Loose ``*.log`` files of versions that wrote every deployment into one folder
    are removed too.

    Raises:
        OSError: the state directory cannot be written.
    """
    root = Path(state_dir) / "logs"
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    new = root / f"up-{stamp}-{os.getpid()}"
    old = sorted(d for d in root.iterdir() if d.is_dir() and d.name.startswith("up-") and d != new)
    for d in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(d, ignore_errors=True)
    for f in root.glob("*.log"):
        f.unlink(missing_ok=True)
    new.mkdir(exist_ok=True)
    return new


@dataclass
class UpConfig:
    """What ``eaas up`` starts.

    Attributes:
        model_dir: checkpoint directory (None: the packaged pydoc-mixtral).
        name: model name (default: the directory name).
        workers: expert worker processes at start.
        replicas: replicas of every expert (>= 2 gives failover).
        autoscale: run the autoscaler on the local pool.
        max_replicas: autoscaler upper bound per shard group.
    """
    model_dir: Path | None = None
    name: str | None = None
    workers: int = 2
    replicas: int = 2
    autoscale: bool = True
    max_replicas: int = 4
    autoscaler_overrides: dict[str, Any] = field(default_factory=dict)


class LocalDeployment:
    """Redis + registry + worker pool + autoscaler + gateway app, on this machine.

    Args:
        settings: the settings object (host/port of the gateway, Redis URL, prefix, ...).
        config: what to start.
        progress: optional progress hook.

    Raises (from :meth:`start`):
        RegistryUnavailable, CheckpointError, UnsupportedArchitecture, PoolError, ConfigError.
    """
    def __init__(self, settings: Settings, config: UpConfig, progress: Progress | None = None) -> None:
        if config.workers < config.replicas:
            raise ConfigError(f"--workers {config.workers} cannot give every expert {config.replicas} replicas")
        self.settings = settings
        self.config = config
        self.progress = progress or (lambda step, done, total: None)
        self.redis: RedisServer | None = None
        self.redis_url = settings.redis_url or ""
        self.registry: Registry | None = None
        self.pool: Any = None
        self.autoscaler: Any = None
        self._autoscaler_stop = threading.Event()
        self._autoscaler_thread: threading.Thread | None = None
        self.client: Any = None
        self.app: Any = None
        self.model_name = ""
        self.model_dir: Path | None = None
        self.log_dir: Path | None = None

    def start(self) -> Any:
        """Bring everything up; returns the gateway's FastAPI app (serve it with uvicorn)."""
        self.progress("redis", 0, 1)
        if not self.redis_url:
            self.redis = RedisServer().start()
            self.redis_url = self.redis.url
        self.registry = Registry.from_url(self.redis_url, self.settings.prefix, self.settings.redis_timeout_s)
        self.registry.ping()
        self.progress("redis", 1, 1)

        self.progress("model", 0, 1)
        self.model_dir = Path(self.config.model_dir) if self.config.model_dir else packaged_model_dir()
        spec, fns = inspect_checkpoint(self.model_dir, name=self.config.name)
        self.model_name = spec.name
        self.registry.register_model(spec.to_dict(), [f.to_dict() for f in fns])
        self.progress("model", 1, 1)

        plans = plan_pool(spec.num_experts, self.config.workers, self.config.replicas)
        self.log_dir = deployment_log_dir(Path(self.settings.state_dir))
        self.pool = LocalPool(self.registry, redis_url=self.redis_url, log_dir=self.log_dir,
                              torch_threads=self.settings.torch_threads)
        handles = [self.pool.start(p.shard_name, p.spec, spec.name) for p in plans]
        self._wait_workers(handles)

        if self.config.autoscale:
            self._start_autoscaler(plans)

        self.progress("gateway", 0, 1)
        self.app = self._build_gateway()
        self.progress("gateway", 1, 1)
        return self.app

    def _wait_workers(self, handles: list[Any], timeout_s: float = 300.0) -> None:
        """Wait for every worker to be ready, reporting progress; fail fast if one exits."""
        total, deadline = len(handles), time.monotonic() + timeout_s
        while True:
            left = [h for h in handles if not self._is_ready(h.worker_id)]
            self.progress("workers", total - len(left), total)
            if not left:
                return
            try:
                self.pool.wait_ready(left[:1], timeout_s=0.25)
            except PoolError as e:
                if isinstance(e, WorkerExitedEarly) or time.monotonic() > deadline:
                    raise

    def _is_ready(self, worker_id: str) -> bool:

        try:
            return self.registry.worker(worker_id).state is WorkerState.READY  # type: ignore[union-attr]
        except NotFound:
            return False

    def _start_autoscaler(self, plans: list[Any]) -> None:

        shards = {p.shard_name: p.spec for p in plans}
        per_shard = min(sum(1 for p in plans if p.shard_name == s) for s in shards)
        knobs: dict[str, Any] = {"min_replicas": max(self.config.replicas, per_shard),
                                 "max_replicas": max(self.config.max_replicas, per_shard)}
        knobs.update(config_from_env())  # EAAS_AUTOSCALER_<FIELD>
        knobs.update(self.config.autoscaler_overrides)
        cfg = AutoscalerConfig.from_mapping(knobs)
        self.autoscaler = Autoscaler(self.registry, self.model_name, cfg, pool=self.pool, shards=shards)  # type: ignore[arg-type]
        self._autoscaler_thread = threading.Thread(target=self.autoscaler.run, args=(self._autoscaler_stop,),
                                                   name="eaas-autoscaler", daemon=True)
        self._autoscaler_thread.start()

    def _build_gateway(self) -> Any:


        torch.set_num_threads(self.settings.torch_threads)
        model, self.client = load_model(self.model_name, settings=self.settings, registry=self.registry)
        tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        return assemble_gateway(model, tokenizer, self.model_name, self.settings, client=self.client)

    def record_state(self, gateway_url: str) -> bool:
        """Write the state file so admin commands in other shells find this deployment.

        Another live deployment already recorded there keeps its place (admin
        commands keep finding it); returns False then, and this one is reached
        through ``EAAS_REDIS_URL`` / ``EAAS_PREFIX``.
        """
        other = claim_state(self.settings.model_copy(update={"redis_url": self.redis_url}), self.redis_url, gateway_url)
        if other is not None:
            log.warning("up: deployment of pid %d is recorded in %s; not replacing it", other.pid, self.settings.state_file)
            return False
        return True

    @property
    def started_anything(self) -> bool:
        """Something is running that :meth:`stop` must stop (Redis, workers, client)."""
        return any(x is not None for x in (self.redis, self.pool, self.client))

    def stop(self) -> None:
        """Stop everything in reverse order (idempotent): autoscaler, client, workers (drained), Redis."""
        self._autoscaler_stop.set()
        if self._autoscaler_thread is not None:
            self._autoscaler_thread.join(timeout=10)
            self._autoscaler_thread = None
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.pool is not None:
            try:
                self.pool.stop_all(timeout_s=30)
            except EaaSError as e:
                log.warning("up: stopping workers: %s", e)
            self.pool = None
        if self.registry is not None:
            self.registry.close()
        clear_state(self.settings)
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
