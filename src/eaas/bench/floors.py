"""The physical floors of a same-host round trip, measured where the benchmark runs.

Two processes (this one and a child started with ``subprocess``) bounce a token
``n`` times; the p50 and p90 of the round trips are reported in µs:

- ``unix_socket_rtt_us``: one byte over a unix ``socketpair``, both sides blocked in
  ``recv`` (two kernel wake-ups per round trip: the price of sleeping);
- ``shm_flag_rtt_us``: a sequence word in a shared mapping, both sides spinning (no
  system call: the least a round trip through the fast-path ring can cost).

:func:`measure_floors` runs both; ``eaas bench layer`` prints them next to its
per-layer overhead so a reader sees how much of the overhead the machine imposes.
"""

from __future__ import annotations

import mmap
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

_CHILD = r"""
import mmap, os, socket, sys
mode, n = sys.argv[1], int(sys.argv[2])
if mode == "unix":
    s = socket.socket(fileno=int(sys.argv[3]))
    for _ in range(n):
        if not s.recv(1):
            break
        s.send(b"x")
else:
    fd = os.open(sys.argv[3], os.O_RDWR)
    mm = mmap.mmap(fd, 4096)
    w = memoryview(mm).cast("Q")
    for i in range(1, n + 1):
        while w[0] != i:
            pass
        w[8] = i
"""


def _summary(samples: list[float]) -> dict[str, float]:
    samples = sorted(samples)
    return {"p50": round(statistics.median(samples) * 1e6, 2),
            "p90": round(samples[int(0.9 * (len(samples) - 1))] * 1e6, 2), "n": len(samples)}


def unix_socket_rtt(n: int = 2000) -> dict[str, float]:
    """Round trips of one byte over a unix socketpair to a child process (µs)."""
    a, b = socket.socketpair()
    child = subprocess.Popen([sys.executable, "-c", _CHILD, "unix", str(n), str(b.fileno())], pass_fds=(b.fileno(),))
    b.close()
    out = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            a.send(b"x")
            a.recv(1)
            out.append(time.perf_counter() - t0)
    finally:
        a.close()
        child.wait(30)
    return _summary(out[n // 10:])


def shm_flag_rtt(n: int = 20000) -> dict[str, float]:
    """Round trips of a sequence word in a shared mapping, both sides spinning (µs)."""
    fd, path = tempfile.mkstemp(prefix="eaas-floor-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        os.ftruncate(fd, 4096)
        mm = mmap.mmap(fd, 4096)
        w = memoryview(mm).cast("Q")
        child = subprocess.Popen([sys.executable, "-c", _CHILD, "flag", str(n), path])
        out = []
        try:
            for i in range(1, n + 1):
                t0 = time.perf_counter()
                w[0] = i
                while w[8] != i:
                    if child.poll() is not None:
                        raise RuntimeError(f"the floor child exited ({child.returncode})")
                out.append(time.perf_counter() - t0)
        finally:
            child.wait(30)
            w.release()
            mm.close()
    finally:
        os.close(fd)
        os.unlink(path)
    return _summary(out[n // 10:])


def measure_floors(n_socket: int = 2000, n_flag: int = 20000) -> dict[str, Any]:
    """``{"unix_socket_rtt_us": {p50, p90, n}, "shm_flag_rtt_us": {...}}`` measured now."""
    return {"unix_socket_rtt_us": unix_socket_rtt(n_socket), "shm_flag_rtt_us": shm_flag_rtt(n_flag)}

