"""CURVE on worker sockets: only clients holding an authorized key get answers (real processes).

Over loopback here (every pair on one host would pick shared memory, so the pairs are forced
to ``inline``: every byte of the request then crosses the CURVE-protected socket);
``tests/test_multihost.py`` runs the same deployment keys across network namespaces.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import zmq

from eaas.errors import EaaSError, NoReplicaAvailable
from eaas.platform.client import ExpertClient
from eaas.platform.curve import (
    ensure_keys,
    generate_keys,
    is_loopback_bind,
    load_keys,
    require_keys_beyond_loopback,
    worker_bind_address,
)
from eaas.settings import get_settings
from eaas.testing import wait_workers_ready

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")


@pytest.mark.parametrize("address,loopback", [
    ("tcp://127.0.0.1:0", True), ("tcp://127.100.0.3:5555", True), ("tcp://[::1]:1", True),
    ("ipc:///tmp/x.sock", True), ("tcp://10.0.0.5:0", False), ("tcp://0.0.0.0:0", False),
    ("tcp://*:5555", False), ("tcp://eth0:5555", False),
])
def test_what_counts_as_binding_beyond_loopback(address, loopback) -> None:
    assert is_loopback_bind(address) is loopback
    if not loopback:
        with pytest.raises(EaaSError, match="EAAS_CURVE_KEYS_DIR"):
            require_keys_beyond_loopback(address, None)


def test_worker_bind_addresses() -> None:
    assert worker_bind_address(None, "127.0.0.1") == "tcp://127.0.0.1:0"
    assert worker_bind_address(None, "::") == "tcp://[::]:0" and not is_loopback_bind("tcp://[::]:0")
    assert worker_bind_address("ipc:///tmp/w.sock", "10.0.0.1") == "ipc:///tmp/w.sock"


def test_key_directory_is_made_once_with_private_secrets(tmp_path) -> None:
    assert ensure_keys(None) is False  # no directory set: nothing to make
    assert ensure_keys(tmp_path / "keys") is True and ensure_keys(tmp_path / "keys") is False  # eaas up / worker
    d = generate_keys(tmp_path / "keys")
    first = load_keys(d)
    assert generate_keys(d) == d and load_keys(d) == first  # idempotent: the keys stay
    assert (d / "authorized" / "client.key").exists()
    assert oct(os.stat(d / "server.key_secret").st_mode & 0o777) == "0o600"
    assert first.server_secret and first.client_secret and first.server_public != first.client_public


def test_a_worker_refuses_to_bind_beyond_loopback_without_keys(registry, registered, eaas_env) -> None:
    model = registered("mixtral")
    # 192.0.2.1 (TEST-NET-1) is no address of this machine: even a regression could not bind it
    env = {**eaas_env, "EAAS_BIND_HOST": "192.0.2.1"}
    out = subprocess.run([sys.executable, "-m", "eaas.cli", "worker", "--model", model, "--shard", "all"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "refusing to bind tcp://192.0.2.1:0 without CURVE keys" in out.stderr + out.stdout


def test_only_authorized_clients_get_answers_and_the_worker_keeps_serving(registry, registered, workers, eaas_env,
                                                                         tmp_path) -> None:
    model = registered("mixtral")
    keys = generate_keys(tmp_path / "deployment")
    stranger = generate_keys(tmp_path / "stranger")  # same layout, other keys: not authorized
    (p,) = workers(model, ["all"], env={**eaas_env, "EAAS_CURVE_KEYS_DIR": str(keys), "EAAS_TRANSPORT": "inline"})
    wait_workers_ready(registry, model, 1)
    x, idx, w = torch.randn(3, 64), torch.tensor([[0, 5]] * 3), torch.rand(3, 2)

    def client(keys_dir) -> ExpertClient:  # type: ignore[no-untyped-def]
        s = get_settings(redis_url="unused", prefix=registry.prefix, transport="inline", curve_keys_dir=keys_dir,
                         request_timeout_ms=300, call_deadline_ms=1500, no_replica_grace_ms=1500)
        return ExpertClient(registry, model, s)

    good = client(keys)
    try:
        want = good.forward(0, x, idx, w)
        for keys_dir in (None, stranger):  # no CURVE at all; CURVE with a key the worker does not list
            other = client(keys_dir)
            try:
                with pytest.raises(NoReplicaAvailable):  # no handshake completes: no answer, ever
                    other.forward(0, x, idx, w)
            finally:
                other.close()
        assert p.poll() is None
        assert torch.equal(good.forward(0, x, idx, w), want)  # the worker kept serving the authorized client
    finally:
        good.close()
