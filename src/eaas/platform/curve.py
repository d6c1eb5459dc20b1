"""Authenticated, encrypted worker sockets across hosts: ZeroMQ CURVE (RFC 26 / CurveZMQ).

One key directory per deployment (``EAAS_CURVE_KEYS_DIR``), in pyzmq's certificate format
(``zmq.auth``), made by :func:`generate_keys` (``eaas keys DIR``; ``eaas up`` and ``eaas worker``
make it when the directory they are pointed at has no server key yet):

- ``server.key_secret`` / ``server.key``: the workers' key pair (every worker of the
  deployment serves with it; clients need only its public half, ``server.key``);
- ``client.key_secret`` / ``client.key``: a client key pair (gateways, ``eaas`` admin tools);
- ``authorized/``: the public keys of the clients workers accept (``client.key`` to start
  with; copy more clients' ``*.key`` files here).

A worker with keys serves CURVE only and runs a ZAP authenticator that admits the keys in
``authorized/``: a client without the server's public key, or whose key is not listed,
completes no handshake and gets no answer, and the worker goes on serving the others.
A worker refuses to bind an address outside 127.0.0.0/8 without keys
(:func:`require_keys_beyond_loopback`). Same-host pairs still move tensors through shared
memory; CURVE protects what crosses the network: control messages and inline payloads.
"""

from __future__ import annotations

import ipaddress
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from eaas.errors import EaaSError

SERVER = "server"
CLIENT = "client"
AUTHORIZED = "authorized"

_auth_lock = threading.Lock()
_authenticators: dict[int, Any] = {}  # id(context) -> its running ThreadAuthenticator


@dataclass(frozen=True, slots=True)
class CurveKeys:
    """What one process needs from the key directory (z85-encoded keys, bytes).

    Attributes:
        server_public: the workers' public key (clients pin it).
        server_secret: the workers' secret key (None in a client-only directory).
        client_public, client_secret: this client's key pair (None when absent).
        authorized: the directory of accepted client public keys.
    """

    server_public: bytes
    server_secret: bytes | None
    client_public: bytes | None
    client_secret: bytes | None
    authorized: Path


def generate_keys(directory: str | Path) -> Path:
    """Make the deployment's key directory (server and client pairs, ``authorized/client.key``).

    Existing key files are kept (idempotent). Secret files are mode 0600.

    Raises:
        EaaSError: pyzmq was built without CURVE (libsodium).
    """
    import shutil

    import zmq.auth

    if not zmq.has("curve"):
        raise EaaSError("this pyzmq/libzmq has no CURVE support (built without libsodium)")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    for name in (SERVER, CLIENT):
        if not (d / f"{name}.key_secret").exists():
            zmq.auth.create_certificates(str(d), name)
        os.chmod(d / f"{name}.key_secret", 0o600)
    (d / AUTHORIZED).mkdir(exist_ok=True)
    if not (d / AUTHORIZED / f"{CLIENT}.key").exists():
        shutil.copy(d / f"{CLIENT}.key", d / AUTHORIZED / f"{CLIENT}.key")
    return d


def ensure_keys(directory: str | Path | None) -> bool:
    """Make the key directory when ``directory`` is set and holds no server key yet (what
    ``eaas up`` and ``eaas worker`` do at start-up); True when it made one."""
    if directory is None:
        return False
    d = Path(directory)
    if (d / f"{SERVER}.key_secret").exists() or (d / f"{SERVER}.key").exists():
        return False
    generate_keys(d)
    return True


def load_keys(directory: str | Path) -> CurveKeys:
    """Read a key directory made by :func:`generate_keys` (a client-only copy needs just
    ``server.key`` and ``client.key_secret``).

    Raises:
        EaaSError: ``server.key`` is missing or a file is not a key certificate.
    """
    import zmq.auth

    d = Path(directory)
    try:
        if (d / f"{SERVER}.key_secret").exists():
            server_public, server_secret = zmq.auth.load_certificate(str(d / f"{SERVER}.key_secret"))
        else:
            server_public, server_secret = zmq.auth.load_certificate(str(d / f"{SERVER}.key"))
        client_public = client_secret = None
        if (d / f"{CLIENT}.key_secret").exists():
            client_public, client_secret = zmq.auth.load_certificate(str(d / f"{CLIENT}.key_secret"))
    except (OSError, ValueError) as e:
        raise EaaSError(f"CURVE keys in {d}: {e} (make them with `eaas keys {d}`)") from None
    return CurveKeys(server_public, server_secret, client_public, client_secret, d / AUTHORIZED)


def is_loopback_bind(address: str) -> bool:
    """Whether a ZeroMQ bind address stays on this host (ipc://, inproc://, tcp on 127.0.0.0/8 or ::1)."""
    if not address.startswith("tcp://"):
        return True
    host = address[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name or an interface (tcp://eth0:5555, tcp://*:5555): beyond loopback


def worker_bind_address(bind: str | None, bind_host: str) -> str:
    """The ZeroMQ address a worker binds: ``bind``, else ``tcp://{bind_host}:0`` (IPv6 in brackets)."""
    if bind:
        return bind
    return f"tcp://[{bind_host}]:0" if ":" in bind_host else f"tcp://{bind_host}:0"


def require_keys_beyond_loopback(address: str, keys: CurveKeys | None) -> None:
    """Refuse a worker bind outside loopback without CURVE keys.

    Raises:
        EaaSError: ``address`` is not loopback and ``keys`` is None.
    """
    if keys is None and not is_loopback_bind(address):
        raise EaaSError(f"refusing to bind {address} without CURVE keys: set EAAS_CURVE_KEYS_DIR "
                        "(make the directory with `eaas keys DIR`)")


def serve_curve(sock: zmq.Socket, keys: CurveKeys) -> None:
    """Make ``sock`` (before it binds) a CURVE server that admits the keys in ``keys.authorized``.

    Starts one ZAP authenticator thread per context (shared by its sockets).

    Raises:
        EaaSError: the directory has no server secret key, or no ``authorized/`` directory.
    """
    if keys.server_secret is None:
        raise EaaSError("CURVE: this key directory has no server.key_secret; workers need it")
    if not keys.authorized.is_dir():
        raise EaaSError(f"CURVE: no {keys.authorized} directory of authorized client keys")
    from zmq.auth.thread import ThreadAuthenticator

    ctx = sock.context
    with _auth_lock:
        auth = _authenticators.get(id(ctx))
        if auth is None:
            auth = ThreadAuthenticator(ctx)
            auth.start()
            _authenticators[id(ctx)] = auth
        auth.configure_curve(domain="*", location=str(keys.authorized))
    sock.curve_secretkey = keys.server_secret
    sock.curve_publickey = keys.server_public
    sock.curve_server = True


def connect_curve(sock: zmq.Socket, keys: CurveKeys) -> None:
    """Make ``sock`` (before it connects) a CURVE client pinned to the workers' public key.

    Raises:
        EaaSError: the directory has no client key pair.
    """
    if keys.client_secret is None or keys.client_public is None:
        raise EaaSError("CURVE: this key directory has no client.key_secret; clients need it")
    sock.curve_serverkey = keys.server_public
    sock.curve_publickey = keys.client_public
    sock.curve_secretkey = keys.client_secret

