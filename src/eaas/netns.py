"""Several hosts on one machine: network namespaces joined by a bridge (a test harness).

:class:`Hosts` makes ``N`` network namespaces ("hosts") and one more that holds a Linux
bridge; each host gets a veth pair whose far end is a port of the bridge, and one address
in ``127.100.0.0/24`` (host ``i`` is ``127.100.0.{i+1}``). Only the loopback range is
used: there is no default route and no NAT, so nothing outside the namespaces the harness
made can be reached from them. Loopback addresses on a veth need
``net.ipv4.conf.*.route_localnet=1``, and each host's ``lo`` keeps only ``127.0.0.1/32``
(with the usual ``127.0.0.0/8`` the kernel would deliver ``127.100.0.x`` locally instead
of on the wire).

A command runs "on" a host through ``ip netns exec`` (:meth:`Hosts.popen`); a host is cut
off, and healed, by taking its bridge port down and up (:meth:`Hosts.cut`, :meth:`Hosts.heal`);
two hosts are cut off from each other only by isolating their two bridge ports
(:meth:`Hosts.cut_between`).
Everything is removed on exit, also after a failed test; namespaces an earlier run left
behind (its pid, in the names, is dead) are removed when the next one starts
(:func:`sweep_stale`). Making namespaces needs root (``CAP_SYS_ADMIN``): :func:`unavailable`
says why when it cannot.

Processes in different network namespaces count as different hosts for transport choice
(their ``host_id`` includes the namespace, :mod:`eaas.platform.transport.select`), so pairs
across these hosts use a cross-host transport, as on separate machines.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Sequence
from typing import Any

from eaas.procs import pid_alive

PREFIX = "eaash"
NAME_RE = re.compile(rf"^{PREFIX}(\d+)-(br|\d+)$")
SUBNET = "127.100.0"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable() -> str | None:
    """Why network namespaces cannot be made here (one line), or None when they can."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"{PREFIX}{os.getpid()}-probe"
    r = _ip("netns", "add", name, check=False)
    if r.returncode != 0:
        return f"cannot make a network namespace: {r.stderr.strip()[:120]}"
    _ip("netns", "del", name, check=False)
    return None


def sweep_stale() -> list[str]:
    """Delete this harness's namespaces whose creating pid is dead; return their names."""
    r = _ip("netns", "list", check=False)
    gone = []
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = NAME_RE.match(name)
        if m and not pid_alive(int(m.group(1))):
            _ip("netns", "del", name, check=False)
            gone.append(name)
    return gone


class Hosts:
    """``n`` hosts joined by a bridge; a context manager (see the module docstring).

    Args:
        n: hosts (at most 200).

    Attributes:
        names: the hosts' namespace names, host ``i`` at index ``i``.

    Raises:
        RuntimeError: an ``ip`` command failed while building (everything made is removed).
    """

    def __init__(self, n: int) -> None:
        if not 1 <= n <= 200:
            raise ValueError(f"1..200 hosts, got {n}")
        self.n = n
        tag = f"{PREFIX}{os.getpid()}"
        self.bridge_ns = f"{tag}-br"
        self.names = [f"{tag}-{i}" for i in range(n)]
        self._procs: list[subprocess.Popen] = []
        self._made: list[str] = []

    def addr(self, i: int) -> str:
        """Host ``i``'s address (``127.100.0.{i+1}``)."""
        return f"{SUBNET}.{i + 1}"

    def __enter__(self) -> Hosts:
        sweep_stale()
        try:
            self._make()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _make(self) -> None:
        br = self.bridge_ns
        _ip("netns", "add", br)
        self._made.append(br)
        _ip("-n", br, "link", "add", "br0", "type", "bridge")
        _ip("-n", br, "link", "set", "br0", "up")
        for i, ns in enumerate(self.names):
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"port{i}", "netns", br)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "del", "127.0.0.1/8", "dev", "lo")
            _ip("-n", ns, "addr", "add", "127.0.0.1/32", "dev", "lo")
            _ip("-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", "eth0")
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1",
                            "net.ipv4.conf.eth0.route_localnet=1"], check=True, capture_output=True, timeout=30)
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", br, "link", "set", f"port{i}", "master", "br0", "up")

    def popen(self, i: int, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        """Start ``argv`` on host ``i`` in a new process group; on exit the harness kills the
        group (SIGKILL: the process and whatever it started) if it still runs."""
        kw.setdefault("start_new_session", True)
        p = subprocess.Popen(["ip", "netns", "exec", self.names[i], *argv], **kw)
        self._procs.append(p)
        return p

    def run(self, i: int, argv: Sequence[str], timeout_s: float = 60, **kw: Any) -> subprocess.CompletedProcess:
        """Run ``argv`` on host ``i`` to the end (text output captured)."""
        return subprocess.run(["ip", "netns", "exec", self.names[i], *argv], capture_output=True, text=True,
                              timeout=timeout_s, **kw)

    def cut(self, i: int) -> None:
        """Cut host ``i`` off from every other host (its bridge port goes down)."""
        _ip("-n", self.bridge_ns, "link", "set", f"port{i}", "down")

    def heal(self, i: int) -> None:
        """Join host ``i`` again (its bridge port comes back up)."""
        _ip("-n", self.bridge_ns, "link", "set", f"port{i}", "up")

    def cut_between(self, i: int, j: int) -> None:
        """Cut hosts ``i`` and ``j`` off from each other only (an asymmetric partition: both
        still reach every other host). Their bridge ports become *isolated*, and isolated ports
        do not forward to one another, so one such pair at a time."""
        self._isolate((i, j), "on")

    def heal_between(self, i: int, j: int) -> None:
        """Undo :meth:`cut_between`."""
        self._isolate((i, j), "off")

    def _isolate(self, hosts: Sequence[int], state: str) -> None:
        for k in hosts:
            subprocess.run(["bridge", "-n", self.bridge_ns, "link", "set", "dev", f"port{k}", "isolated", state],
                           check=True, capture_output=True, timeout=30)

    def close(self) -> None:
        """Kill what :meth:`popen` started and delete every namespace made (idempotent)."""
        for p in self._procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # its children too (a worker's lease keeper)
            except OSError:
                pass
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self._procs.clear()
        for name in reversed(self._made):
            _ip("netns", "del", name, check=False)
        self._made.clear()
