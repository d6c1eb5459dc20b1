"""How long to spin before a kernel wait (policy: pure functions, no I/O).

A process waiting for its peer on the same host can spin on a shared-memory word
(a round trip of ~1 µs) or sleep in the kernel until the peer rings its doorbell
(a wake-up costs ~30-60 µs on a small VM, and the compute right after it runs on cold
caches). Spinning burns a core, so it only pays when the wait is short *and* the
spinning does not take the core from the very process it waits for — which happens
when there are more busy processes than cores.

Whether that happens is measured, not guessed. A machine-wide runnable count
(``/proc/loadavg``) cannot tell: spinners are runnable too, so two workers and a client
spinning on two cores each saw "no spare core" and made one another sleep (measured on
the 2-vCPU VMs: +0.35 ms per T=1 layer call, D=256). Instead each waiter keeps two
windows of its own recent waits — those that were allowed to spin up to the cap and
those that slept after the floor — and prefers the arm whose median wait was shorter
(:func:`prefer_spinning`), trying the other arm once every
:data:`EXPLORE_EVERY` waits (:func:`spin_this_wait`). If spinning steals the compute
a waiter waits for, that compute takes longer and the spinning arm's waits grow
past the sleeping arm's: the waiter stops spinning. The rule for one wait
(:func:`spin_budget_s`) is the classic ski-rental bound, adapted:

- always spin at least ``floor_s`` (about one kernel wake-up): a wait that short
  costs no more spinning than sleeping would add;
- spin up to :data:`SPIN_FACTOR` typical waits (at most ``cap_s``) when this wait may
  spin and the recent waits (``typical_wait_s``) fit in the cap — then a spin catches
  the reply without a wake-up;
- otherwise spin only ``floor_s`` and sleep.

A sleep costs more than its wake-up: on these VMs a vCPU that halts gives its core's
caches and TLB to the host's other work, and the work right after it runs cold (two
4 MiB copies took 750 µs after a 100 µs sleep vs 390 µs back to back; a D=256 expert
row 264 vs 128 µs after 1 ms away). Waits have heavy tails, so a budget of twice the
typical wait still slept in 3-7% of a lone client's waits that were meant to spin;
four times, in 0-1% (a 4 MiB shm echo, 300 round trips).

Spin loops also call ``sched_yield`` between checks, so a runnable peer on the
same core gets it at once (see :mod:`eaas.platform.transport.ring`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

#: weight of a new observation in the exponentially weighted mean of all waits (the budget's typical wait)
EWMA_ALPHA = 0.2
#: one wait in this many tries the arm not preferred (keeps both arms' windows current)
EXPLORE_EVERY = 16
#: the spinning arm is preferred unless its median wait exceeds the sleeping arm's by this fraction
SPIN_MARGIN = 0.25
#: recent waits kept per arm; the arms are compared by the median of these
ARM_WINDOW = 15
#: a wait on the spinning arm spins up to this many typical waits (capped) before it sleeps
SPIN_FACTOR = 4.0


def spin_budget_s(typical_wait_s: float, may_spin: bool, *, floor_s: float, cap_s: float) -> float:
    """Seconds to spin before sleeping.

    Args:
        typical_wait_s: recent waits' weighted mean (s).
        may_spin: this wait may spin past the floor (:func:`spin_this_wait`).
        floor_s: always spin this long (about one kernel wake-up), s.
        cap_s: never spin longer (s); 0 disables spinning entirely.

    Returns:
        A budget in ``[0, cap_s]``: ``cap_s`` bounds everything, ``floor_s`` is the
        least when spinning is on.
    """
    if cap_s <= 0:
        return 0.0
    floor = min(floor_s, cap_s)
    if not may_spin or typical_wait_s > cap_s:
        return floor
    return max(floor, min(cap_s, SPIN_FACTOR * typical_wait_s))


def prefer_spinning(spin_wait_s: float | None, sleep_wait_s: float | None) -> bool:
    """Whether to spin: the spinning arm's recent waits (s) were not clearly longer than the sleeping arm's.

    Each arm is summarised by the median of its last :data:`ARM_WINDOW` waits, not a mean:
    a wait that spun has a heavy tail (the peer preempted once in a while, a 3 ms wait among
    60 µs ones), and one such outlier pulled an exponentially weighted mean past the
    sleeping arm's for several waits (measured on a 4 MiB shm echo: spin arm median 55 µs,
    mean 213 µs, sleep arm 141 / 150 µs; the client then slept in 45% of its waits, and
    every sleep costs a wake-up *and* the caches: the copies right after a 100 µs sleep ran
    at half speed on these VMs).

    "Clearly" is :data:`SPIN_MARGIN` of the sleeping arm's median: a wait's length is mostly
    the peer's cycle, which varies by more than the wake-up a spin saves, so an even
    comparison flipped between the arms on noise alone (measured: a worker with a core to
    itself slept in 29% of its waits, and every sleep costs its client a doorbell and a
    wake-up). Spinning that steals the compute a waiter waits for lengthens its waits by
    far more than the margin (session 6: two workers and a client spinning on two vCPUs).
    An arm not measured yet (None) loses to one that was; with neither measured, spin.
    """
    if spin_wait_s is None or sleep_wait_s is None:
        return sleep_wait_s is None
    return spin_wait_s <= sleep_wait_s * (1.0 + SPIN_MARGIN)


def spin_this_wait(waits: int, spin_wait_s: float | None, sleep_wait_s: float | None) -> bool:
    """The arm of wait number ``waits``: the preferred one, the other every :data:`EXPLORE_EVERY`-th."""
    preferred = prefer_spinning(spin_wait_s, sleep_wait_s)
    return (not preferred) if waits % EXPLORE_EVERY == EXPLORE_EVERY - 1 else preferred


def median(window: deque[float]) -> float | None:
    """The median of a window of waits (s), None when it is empty (the upper median of an even count)."""
    if not window:
        return None
    return sorted(window)[len(window) // 2]


def ewma(mean: float | None, sample: float, alpha: float = EWMA_ALPHA) -> float:
    """Exponentially weighted mean: ``mean + alpha * (sample - mean)`` (the sample alone when ``mean`` is None)."""
    return sample if mean is None else mean + alpha * (sample - mean)


@dataclass(slots=True)
class SpinState:
    """One waiter's memory of its recent waits (the mechanism feeds it, the policy reads it).

    Attributes:
        typical_wait_s: weighted mean of all recent waits (s); sizes the spin budget.
        spin_waits: the last :data:`ARM_WINDOW` waits that were allowed to spin to the cap (s).
        sleep_waits: the last :data:`ARM_WINDOW` waits that slept after the floor (s).
        spin_wait_s, sleep_wait_s: their medians (s), None before one (kept up to date by
            :meth:`observe`, so that choosing an arm sorts nothing).
        waits: waits observed.
        spun: waits that ended while spinning; slept: waits that needed a kernel wake-up.
    """

    typical_wait_s: float = 0.0
    spin_waits: deque[float] = field(default_factory=lambda: deque(maxlen=ARM_WINDOW))
    sleep_waits: deque[float] = field(default_factory=lambda: deque(maxlen=ARM_WINDOW))
    spin_wait_s: float | None = None
    sleep_wait_s: float | None = None
    waits: int = 0
    spun: int = 0
    slept: int = 0

    def may_spin(self) -> bool:
        """The arm of the next wait (:func:`spin_this_wait`)."""
        return spin_this_wait(self.waits, self.spin_wait_s, self.sleep_wait_s)

    def observe(self, waited_s: float, slept: bool, spun_arm: bool = True) -> None:
        """Record one finished wait of ``waited_s`` seconds, taken on the spinning arm or not."""
        self.typical_wait_s = ewma(self.typical_wait_s, waited_s)
        if spun_arm:
            self.spin_waits.append(waited_s)
            self.spin_wait_s = median(self.spin_waits)
        else:
            self.sleep_waits.append(waited_s)
            self.sleep_wait_s = median(self.sleep_waits)
        self.waits += 1
        if slept:
            self.slept += 1
        else:
            self.spun += 1
