"""Shared fixtures: a private, real Redis server per test session.

Never assumes a Redis is running: the session starts its own ``redis-server``
on a free loopback port and stops it at the end. Each test gets its own key
prefix, so tests cannot see each other's keys.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from eaas.registry.server import RedisServer
from eaas.registry.store import Registry
from eaas.testing import start_worker

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server for the whole session (loopback, free port, no persistence)."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def prefix() -> str:
    """A fresh key prefix for one test."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def registry(redis_url: str, prefix: str) -> Iterator[Registry]:
    reg = Registry.from_url(redis_url, prefix)
    yield reg
    reg.close()


@pytest.fixture
def eaas_env(redis_url: str, prefix: str, tmp_path, monkeypatch) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Environment for `eaas` subprocesses pointed at the session Redis with this test's prefix."""
    env = dict(os.environ)
    env.update(
        EAAS_REDIS_URL=redis_url,
        EAAS_PREFIX=prefix,
        EAAS_STATE_DIR=str(tmp_path / "state"),
        EAAS_CACHE_DIR=str(tmp_path / "cache"),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        COLUMNS="200",
    )
    return env


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):  # type: ignore[no-untyped-def]
    """Factory: ``tiny_checkpoint(arch, **kw) -> Path`` of a seeded tiny checkpoint, cached per session."""
    from eaas.functions import write_tiny_checkpoint

    cache: dict = {}

    def make(arch: str = "mixtral", **kw):  # type: ignore[no-untyped-def]
        key = (arch, tuple(sorted(kw.items())))
        if key not in cache:
            name = f"tiny-{arch.replace('_', '-')}" + ("-" + "-".join(f"{k}{v}" for k, v in sorted(kw.items())) if kw else "")
            cache[key] = write_tiny_checkpoint(arch, tmp_path_factory.mktemp("ckpt") / name, **kw)
        return cache[key]

    return make


@pytest.fixture
def registered(registry, tiny_checkpoint):  # type: ignore[no-untyped-def]
    """Factory: register a tiny checkpoint in this test's registry; returns the model name."""
    from eaas.functions import inspect_checkpoint

    def reg(arch: str = "mixtral", **kw) -> str:  # type: ignore[no-untyped-def]
        spec, fns = inspect_checkpoint(tiny_checkpoint(arch, **kw))
        registry.register_model(spec.to_dict(), [f.to_dict() for f in fns])
        return spec.name

    return reg


@pytest.fixture
def workers(registry: Registry, eaas_env, tmp_path):  # type: ignore[no-untyped-def]
    """Factory: start workers ``[(model, shard), ...]``; all killed at teardown."""
    procs = []

    def start(model: str, shards: list[str], env: dict | None = None) -> list:
        for i, shard in enumerate(shards):
            procs.append(start_worker(env or eaas_env, model, shard, log_path=str(tmp_path / f"w{len(procs)}.log")))
        return procs[-len(shards):]

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)
