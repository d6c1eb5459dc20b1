"""Process helpers shared by everything that starts or watches processes (Linux semantics)."""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def pid_alive(pid: int) -> bool:
    """True when ``pid`` is a live process in our pid namespace (a zombie is not alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # exited but not yet reaped by its parent
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def own_group() -> None:  # pragma: no cover - runs in the child
    """``preexec_fn``: put the child in its own process group (Ctrl-C reaches it only through its parent)."""
    os.setpgrp()


def die_with_parent() -> None:  # pragma: no cover - runs in the child
    """``preexec_fn``: the kernel sends SIGTERM when the spawning thread dies; own process group.

    SIGTERM means "drain" for workers and "stop" for Redis, so a SIGKILLed parent
    leaves no orphan. Note: the signal follows the *thread* that spawned the child.
    """
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass
    os.setpgrp()
