"""How long to spin before a kernel wait (policy: pure functions, no I/O).

A process waiting for its peer on the same host can spin on a shared-memory word
(a round trip of ~1 µs) or sleep in the kernel until the peer rings its doorbell
(a wake-up costs ~30-60 µs on a small VM). Spinning burns a core, so it only pays
when the wait is short *and* a core is free: with more runnable processes than
cores, a spinner steals the very compute it waits for.

The rule (:func:`spin_budget_s`) is the classic ski-rental bound, adapted:

- always spin at least ``floor_s`` (about one kernel wake-up): a wait that short
  costs no more spinning than sleeping would add;
- spin up to ``cap_s`` only while the machine has a core to spare (the runnable
  count, minus ourselves, is below the core count) and the recent waits
  (``typical_wait_s``, an exponentially weighted mean) fit in the cap — then a
  spin catches the reply without a wake-up;
- otherwise spin only ``floor_s`` and sleep.

Spin loops also call ``sched_yield`` between checks, so a runnable peer on the
same core gets it at once (see :mod:`eaas.platform.transport.ring`).
"""

from __future__ import annotations

from dataclasses import dataclass

#: weight of a new observation in the exponentially weighted mean of waits
EWMA_ALPHA = 0.2


def spin_budget_s(typical_wait_s: float, runnable: int, cpus: int, *, floor_s: float, cap_s: float) -> float:
    """Seconds to spin before sleeping.

    Args:
        typical_wait_s: recent waits' weighted mean (s).
        runnable: processes runnable on the machine now, this one included
            (``/proc/loadavg``'s fourth field, numerator).
        cpus: cores this process may run on.
        floor_s: always spin this long (about one kernel wake-up), s.
        cap_s: never spin longer (s); 0 disables spinning entirely.

    Returns:
        A budget in ``[0, cap_s]``: ``cap_s`` bounds everything, ``floor_s`` is the
        least when spinning is on.
    """
    if cap_s <= 0:
        return 0.0
    floor = min(floor_s, cap_s)
    if runnable - 1 >= cpus:  # no spare core: spinning would take it from someone runnable
        return floor
    if typical_wait_s > cap_s:
        return floor
    return max(floor, min(cap_s, 2.0 * typical_wait_s))


def ewma(mean: float, sample: float, alpha: float = EWMA_ALPHA) -> float:
    """Exponentially weighted mean: ``mean + alpha * (sample - mean)``."""
    return mean + alpha * (sample - mean)


@dataclass(slots=True)
class SpinState:
    """One waiter's memory of its recent waits (the mechanism feeds it, the policy reads it).

    Attributes:
        typical_wait_s: weighted mean of recent waits (s).
        spun: waits that ended while spinning; slept: waits that needed a kernel wake-up.
    """

    typical_wait_s: float = 0.0
    spun: int = 0
    slept: int = 0

    def observe(self, waited_s: float, slept: bool) -> None:
        """Record one finished wait of ``waited_s`` seconds."""
        self.typical_wait_s = ewma(self.typical_wait_s, waited_s)
        if slept:
            self.slept += 1
        else:
            self.spun += 1
