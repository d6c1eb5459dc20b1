"""Finding the Redis of a deployment, or starting a private one.

Admin commands run from another shell find the deployment that ``eaas up`` (or
``eaas redis``) started through a *state file*, ``$EAAS_STATE_DIR/deployment.json``
(default ``~/.cache/eaas/deployment.json``), holding the Redis URL, the key
prefix, the gateway URL and the owner's pid. ``EAAS_REDIS_URL`` always wins over
the state file. A state file whose owner process is dead is ignored.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from eaas.backoff import backoff_s
from eaas.errors import DeploymentNotFound, RegistryUnavailable
from eaas.procs import pid_alive
from eaas.registry.server import RedisServer
from eaas.registry.store import Registry
from eaas.settings import Settings


log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DeploymentState:
    """What ``deployment.json`` holds."""

    redis_url: str
    prefix: str
    pid: int
    gateway_url: str = ""
    started_at_s: float = 0.0


def read_state(settings: Settings) -> DeploymentState | None:
    """The live deployment recorded in the state file, or None (missing, malformed, owner dead)."""
    try:
        d = json.loads(Path(settings.state_file).read_text())
        st = DeploymentState(**{k: d[k] for k in ("redis_url", "prefix", "pid")},
                             gateway_url=d.get("gateway_url", ""), started_at_s=float(d.get("started_at_s", 0)))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return st if pid_alive(st.pid) else None


def write_state(settings: Settings, redis_url: str, gateway_url: str = "") -> Path:
    """Record this process as the deployment admin commands should find (atomic rename)."""
    path = Path(settings.state_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    st = DeploymentState(redis_url, settings.prefix, os.getpid(), gateway_url, time.time())
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(st), indent=2))
    os.replace(tmp, path)
    return path


def claim_state(settings: Settings, redis_url: str, gateway_url: str = "") -> DeploymentState | None:
    """Record this process as the deployment, unless another live one is recorded already.

    The read and the write happen under an exclusive ``flock`` on ``deployment.json.lock``,
    so two ``eaas up`` starting together cannot both think they own the state file.

    Returns:
        None when this process was recorded; else the live deployment that keeps its place.
    """
    import fcntl

    path = Path(settings.state_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".json.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            other = read_state(settings)
            if other is not None and other.redis_url != redis_url and other.pid != os.getpid():
                return other
            write_state(settings, redis_url, gateway_url)
            return None
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def clear_state(settings: Settings) -> None:
    """Remove the state file if this process owns it."""
    path = Path(settings.state_file)
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass


def resolve(settings: Settings) -> tuple[str, str] | None:
    """(redis_url, prefix) of the deployment to talk to, or None when there is none.

    ``EAAS_REDIS_URL`` (with ``EAAS_PREFIX``) first, then the state file.
    """
    if settings.redis_url:
        return settings.redis_url, settings.prefix
    st = read_state(settings)
    if st is None:
        return None
    return st.redis_url, st.prefix


def open_registry(settings: Settings, start_if_missing: bool = False) -> tuple[Registry, RedisServer | None]:
    """Connect to the deployment's registry, or start a private Redis.

    Args:
        settings: the settings object.
        start_if_missing: with no deployment found, start a private Redis server
            (stopped with the returned server / this process) instead of failing.

    Returns:
        The registry and the private server it started, if any.

    Raises:
        DeploymentNotFound: nothing found and ``start_if_missing`` is false.
        RegistryUnavailable: the private server could not be started.
    """
    found = resolve(settings)
    if found is not None:
        url, prefix = found
        return Registry.from_url(url, prefix, settings.redis_timeout_s), None
    if not start_if_missing:
        raise DeploymentNotFound(
            f"no EaaS deployment found: set EAAS_REDIS_URL, or start one with `eaas up` (no live {settings.state_file})"
        )
    server = RedisServer().start()
    return Registry.from_url(server.url, settings.prefix, settings.redis_timeout_s), server


def connect_registry(settings: Settings, what: str, *, timeout_s: float | None = None) -> Registry:
    """Connect a long-running process (worker, gateway, autoscaler) to its registry, waiting for Redis.

    A process started while Redis is briefly down (a restart, a failover) should come
    up once it is back rather than exit: Redis is pinged with capped exponential
    backoff and jitter (:func:`eaas.backoff.backoff_s`, 0.1 s doubling to 2 s) until
    ``timeout_s`` (default ``settings.startup_timeout_s``) has passed. The first
    failure is logged at WARNING, every later attempt in one INFO line with the
    time left. Admin commands use :func:`open_registry` instead and fail at once.

    Args:
        settings: the settings object (``redis_url``/state file, ``startup_timeout_s``).
        what: who is starting, for the log lines (``"worker w1"``).
        timeout_s: the start-up deadline in seconds from now.

    Raises:
        DeploymentNotFound: no Redis URL and no recorded deployment (nothing to wait for).
        RegistryUnavailable: Redis did not answer before the deadline.
    """
    registry, _ = open_registry(settings)
    limit_s = settings.startup_timeout_s if timeout_s is None else timeout_s
    deadline = time.monotonic() + limit_s
    attempt = 0
    while True:
        try:
            registry.ping()
            if attempt:
                log.warning("%s: registry reachable after %d attempts", what, attempt + 1)
            return registry
        except RegistryUnavailable as e:
            left = deadline - time.monotonic()
            if left <= 0:
                registry.close()
                raise RegistryUnavailable(
                    f"{what}: registry still unreachable after {limit_s:g} s ({e}); giving up"
                    " (EAAS_STARTUP_TIMEOUT_S sets how long to wait)"
                ) from None
            delay = min(left, backoff_s(attempt, 0.1, 2.0))
            (log.warning if attempt == 0 else log.info)(
                "%s: registry unreachable (%s); attempt %d, retrying in %.2f s, giving up in %.1f s",
                what, e, attempt + 1, delay, left)
            attempt += 1
            time.sleep(delay)
