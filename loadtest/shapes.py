"""Load shapes for Locust: step, spike and diurnal, parameterised by environment variables.

Each shape is a pure function of the run time (``users_at(t_s)``) wrapped in a
:class:`locust.LoadTestShape`. The classes here are marked ``abstract`` so that
importing this module never selects one by accident; the locustfile picks one
with ``EAAS_LT_SHAPE`` through :func:`select_shape`.

Environment (every duration in seconds, every count in users):

==========================  =========  ==============================================
variable                    default    meaning
==========================  =========  ==============================================
EAAS_LT_SHAPE               (none)     ``step``, ``spike`` or ``diurnal``; unset = Locust's -u/-r/-t
EAAS_LT_DURATION_S          120        total length of the shaped run
EAAS_LT_SPAWN_RATE          5          users started/stopped per second between levels
EAAS_LT_STEP_USERS          4          step: users added per step
EAAS_LT_STEP_S              30         step: length of one step
EAAS_LT_MAX_USERS           16         step/diurnal: ceiling; spike: users during the spike
EAAS_LT_BASE_USERS          4          spike: users before and after; diurnal: the trough
EAAS_LT_SPIKE_AT_S          40         spike: when it starts
EAAS_LT_SPIKE_S             20         spike: how long it lasts
EAAS_LT_PERIOD_S            120        diurnal: one "day" (trough -> peak -> trough)
==========================  =========  ==============================================
"""

from __future__ import annotations

import math
import os

from locust import LoadTestShape


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        return float(raw) if raw.strip() else default
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None


def _env_int(name: str, default: int) -> int:
    return int(_env_float(name, default))


class _EnvShape(LoadTestShape):
    """Common part: total duration and spawn rate; ``users_at`` is the shape."""

    abstract = True

    def __init__(self) -> None:
        super().__init__()
        self.duration_s = _env_float("EAAS_LT_DURATION_S", 120.0)
        self.spawn_rate = _env_float("EAAS_LT_SPAWN_RATE", 5.0)

    def users_at(self, t_s: float) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def tick(self) -> tuple[int, float] | None:
        t_s = self.get_run_time()
        if t_s >= self.duration_s:
            return None
        return max(1, self.users_at(t_s)), self.spawn_rate


class StepShape(_EnvShape):
    """``EAAS_LT_STEP_USERS`` more users every ``EAAS_LT_STEP_S`` seconds, up to ``EAAS_LT_MAX_USERS``."""

    abstract = True

    def __init__(self) -> None:
        super().__init__()
        self.step_users = _env_int("EAAS_LT_STEP_USERS", 4)
        self.step_s = _env_float("EAAS_LT_STEP_S", 30.0)
        self.max_users = _env_int("EAAS_LT_MAX_USERS", 16)

    def users_at(self, t_s: float) -> int:
        return min(self.max_users, self.step_users * (int(t_s // self.step_s) + 1))


class SpikeShape(_EnvShape):
    """``EAAS_LT_BASE_USERS`` users, jumping to ``EAAS_LT_MAX_USERS`` for ``EAAS_LT_SPIKE_S`` at ``EAAS_LT_SPIKE_AT_S``."""

    abstract = True

    def __init__(self) -> None:
        super().__init__()
        self.base_users = _env_int("EAAS_LT_BASE_USERS", 4)
        self.spike_users = _env_int("EAAS_LT_MAX_USERS", 16)
        self.spike_at_s = _env_float("EAAS_LT_SPIKE_AT_S", 40.0)
        self.spike_s = _env_float("EAAS_LT_SPIKE_S", 20.0)
        self.spawn_rate = max(self.spawn_rate, float(self.spike_users))  # a spike arrives at once

    def users_at(self, t_s: float) -> int:
        return self.spike_users if self.spike_at_s <= t_s < self.spike_at_s + self.spike_s else self.base_users


class DiurnalShape(_EnvShape):
    """A raised cosine between ``EAAS_LT_BASE_USERS`` (trough, t=0) and ``EAAS_LT_MAX_USERS`` (peak, mid-period)."""

    abstract = True

    def __init__(self) -> None:
        super().__init__()
        self.base_users = _env_int("EAAS_LT_BASE_USERS", 4)
        self.max_users = _env_int("EAAS_LT_MAX_USERS", 16)
        self.period_s = _env_float("EAAS_LT_PERIOD_S", 120.0)

    def users_at(self, t_s: float) -> int:
        phase = 0.5 - 0.5 * math.cos(2 * math.pi * t_s / self.period_s)  # 0 at the trough, 1 at the peak
        return round(self.base_users + (self.max_users - self.base_users) * phase)


SHAPES: dict[str, type[_EnvShape]] = {"step": StepShape, "spike": SpikeShape, "diurnal": DiurnalShape}


def select_shape(name: str | None) -> type[LoadTestShape] | None:
    """A concrete (non-abstract) subclass of the named shape, or ``None`` for no shape.

    Raises:
        ValueError: an unknown shape name (the known ones are quoted).
    """
    if not name:
        return None
    base = SHAPES.get(name.strip().lower())
    if base is None:
        raise ValueError(f"EAAS_LT_SHAPE={name!r}: unknown shape; use one of {sorted(SHAPES)}")
    return type(f"{base.__name__}Selected", (base,), {"abstract": False, "__doc__": base.__doc__})
