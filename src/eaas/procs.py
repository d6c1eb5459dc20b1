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


def use_batch_scheduling() -> bool:
    """Run the calling thread — and every thread and process it starts afterwards — under
    Linux's ``SCHED_BATCH`` policy (same nice level, no privilege needed).

    A ``SCHED_BATCH`` task that is woken never preempts the running task on wake-up
    (kernel ``check_preempt_wakeup_fair``: only ``SCHED_NORMAL`` tasks do); it runs on an
    idle core at once, otherwise at the next tick or when the running task yields or blocks.
    Expert workers use it: a client that rings a sleeping worker's doorbell keeps its core
    and rings the next worker's too, instead of being switched out for the first worker's
    whole expert computation (at concurrency 32 the gateway spent 12% of its time inside
    ``Ring.notify``). Returns whether the policy was set (False off Linux or when refused).
    """
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):
        return False
    return True
