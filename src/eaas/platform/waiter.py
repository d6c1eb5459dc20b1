"""Waiting for input on the data plane: spin on the fast-path rings, then sleep in the kernel.

Both ends of a same-host pair wait the same way (the client for replies, the worker
for invokes): first a bounded spin that reads each ring's ``posted`` word (and, every
few turns, whether a ZeroMQ socket has input), yielding the core between checks;
then, if nothing came, each ring's ``asleep`` word is set and the process sleeps in
one ``poll`` over the ZeroMQ sockets and the rings' doorbells. How long to spin is
:func:`eaas.platform.spin.spin_budget_s`'s decision, fed with this waiter's recent
waits: how long they were, and whether the waits that spun were shorter than those
that slept (:class:`eaas.platform.spin.SpinState`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from eaas.platform.protocol import has_input
from eaas.platform.spin import SpinState, spin_budget_s

ZMQ_CHECK_EVERY = 8  # spin turns between two ZeroMQ input checks while there are rings to spin on
IDLE_CLAMP = 2.0  # a wait counts as at most this many spin caps in the policy's statistics


def usable_cpus() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass(slots=True)
class WaitResult:
    """What one :meth:`Waiter.wait` saw.

    Attributes:
        closed: rings whose peer closed the doorbell (the peer exited or dropped the pair).
        ring_ready: it ended because a ring had input (the caller may take the rings and
            leave its sockets for its next wait, which checks them again).
        slept: the wait ended in the kernel, not while spinning.
        waited_s: how long it took (s).
        long_spin: it was allowed to spin past the floor (the spinning arm of the policy).
    """

    closed: list[Any] = field(default_factory=list)
    ring_ready: bool = False
    slept: bool = False
    waited_s: float = 0.0
    long_spin: bool = False


class Waiter:
    """Spin-then-sleep waits over fast-path rings and ZeroMQ sockets.

    Args:
        floor_s: always spin at least this long when spinning is on (s).
        cap_s: never spin longer (s); 0 never spins.
    """

    def __init__(self, floor_s: float, cap_s: float) -> None:
        self.floor_s, self.cap_s = floor_s, cap_s
        self.state = SpinState()

    def budget_s(self, may_spin: bool) -> float:
        """A wait's spin budget (s), on the spinning arm of the policy or not."""
        return spin_budget_s(self.state.typical_wait_s, may_spin, floor_s=self.floor_s, cap_s=self.cap_s)

    def wait(self, rings: Sequence[Any], socks: Sequence[zmq.Socket], timeout_s: float) -> WaitResult:
        """Return once a ring or a socket has input, a ring's peer closed, or ``timeout_s`` passed.

        Args:
            rings: :class:`~eaas.platform.transport.ring.Ring` objects to watch.
            socks: ZeroMQ sockets to watch (their input is left for the caller to read).
            timeout_s: longest wait (s); 0 only checks.
        """
        t0 = time.perf_counter()
        res = WaitResult(closed=[r for r in rings if r.closed])
        res.long_spin = self.state.may_spin()
        budget = self.budget_s(res.long_spin)
        if res.closed:
            return self._done(res, t0)
        spin_until = t0 + min(budget, timeout_s)
        check_every = ZMQ_CHECK_EVERY if rings else 1  # sockets only: they are what we wait on
        turn = 0
        while True:
            for r in rings:
                if r.ready():
                    res.ring_ready = True
                    return self._done(res, t0)
            if turn % check_every == 0:
                for s in socks:
                    if has_input(s):
                        return self._done(res, t0)
            turn += 1
            if time.perf_counter() >= spin_until:
                break
            os.sched_yield()
        remaining = timeout_s - (time.perf_counter() - t0)
        if remaining <= 0:
            return self._done(res, t0)
        began = []
        for r in rings:
            if r.sleep_begin():  # input arrived between the spin and now
                for b in began:
                    if not b.sleep_end():
                        res.closed.append(b)
                if r.closed:
                    res.closed.append(r)
                else:
                    res.ring_ready = True
                return self._done(res, t0)
            began.append(r)
        poller = zmq.Poller()
        for s in socks:
            poller.register(s, zmq.POLLIN)
        for r in rings:
            poller.register(r, zmq.POLLIN)
        poller.poll(max(1, int(remaining * 1000)))
        res.slept = True
        for r in rings:
            if not r.sleep_end():
                res.closed.append(r)
            elif not res.ring_ready and r.ready():
                res.ring_ready = True
        return self._done(res, t0)

    def _done(self, res: WaitResult, t0: float) -> WaitResult:
        res.waited_s = time.perf_counter() - t0
        # An idle gap (a client between bursts, a worker between calls of a benchmark's other
        # side) counts as twice the cap at most: one long gap must not turn spinning off for
        # the many short waits of the next burst (an unclamped 50 ms sample took ~10 of them to
        # forget with alpha 0.2; clamped, spinning stays on, and it takes three gaps in a row).
        self.state.observe(min(res.waited_s, IDLE_CLAMP * self.cap_s) if self.cap_s > 0 else res.waited_s,
                           res.slept, res.long_spin)
        return res
