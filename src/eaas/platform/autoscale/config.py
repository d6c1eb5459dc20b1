"""Autoscaler configuration, in the style of Ray Serve's ``AutoscalingConfig``.

Every default lives here, with its unit. Durations are seconds (``_s``), queue
sizes are tokens (rows of hidden states waiting for, or in, an expert call).

The load of a shard is measured in *replica-equivalents*:

    load = max(sum(busy_fraction) / target_busy_fraction,
               sum(queue_tokens)  / target_queue_tokens_per_replica)

summed over the shard's ready workers with fresh metrics, so ``ceil(load)`` is
the number of replicas that would run each at the target. The first term is
the utilisation signal (Kubernetes HPA style), the second Ray Serve's
"ongoing requests per replica", counted in tokens; whichever asks for more wins.
"""

from __future__ import annotations

import dataclasses
import os
import math
from dataclasses import dataclass
from typing import Any, Mapping

from eaas.errors import ConfigError


@dataclass(frozen=True, slots=True)
class AutoscalerConfig:
    """Knobs of the autoscaling policy (see :func:`eaas.platform.autoscale.policy.decide`).

    Attributes:
        target_busy_fraction: utilisation a replica should run at (0-1]; headroom
            for bursts and for the start-up time of new replicas.
        target_queue_tokens_per_replica: tokens queued or in service per replica
            at which the shard counts as fully loaded (Ray Serve's
            ``target_ongoing_requests``, in tokens).
        min_replicas: replicas per shard never gone below (2: failover always has
            a replica).
        max_replicas: replicas per shard never gone above.
        upscale_delay_s: how long a scale-up proposal must persist before it is
            applied; also the least time between two changes of a shard upwards.
        downscale_delay_s: the same for scale-down (longer: scaling down too early
            costs latency, too late only money); at least ``look_back_s``.
        upscale_smoothing_factor: gain on each scale-up step (Ray Serve): 1 goes
            straight to the proposal, 0.5 half-way.
        downscale_smoothing_factor: the same for scale-down.
        look_back_s: time constant of the exponential moving average of the load
            that normal (non-panic) decisions use; also the window of samples a
            shard must hold (since the autoscaler started or its ready count last
            changed) before it may scale down.
        panic_threshold: ratio of the instantaneous load to the ready replicas at
            or above which the shard scales up at once, skipping delay and
            smoothing (Knative's panic mode; 2.0 = twice what it can serve).
        balance_target: balancedness (vLLM EPLB's, per layer: mean over max tokens
            per worker) up to which extra replicas of hot experts are planned (0-1].
        min_balance_gain: least rise of the predicted balancedness that one more
            extra replica (or a new plan) must bring.
        max_hot_replicas: most extra replicas one function gets (0: never any).
        max_extra_per_worker: most extra replicas one worker hosts.
        metrics_stale_s: a worker whose last heartbeat is older than this is not
            counted, neither its load nor as capacity.
    """

    target_busy_fraction: float = 0.7
    target_queue_tokens_per_replica: float = 2048.0
    min_replicas: int = 2
    max_replicas: int = 8
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 60.0
    upscale_smoothing_factor: float = 1.0
    downscale_smoothing_factor: float = 1.0
    look_back_s: float = 10.0
    panic_threshold: float = 2.0
    balance_target: float = 0.9
    min_balance_gain: float = 0.02
    max_hot_replicas: int = 2
    max_extra_per_worker: int = 8
    metrics_stale_s: float = 3.0

    def __post_init__(self) -> None:
        problems: list[str] = []

        def need(ok: bool, text: str) -> None:
            if not ok:
                problems.append(text)

        need(0.0 < self.target_busy_fraction <= 1.0, f"target_busy_fraction={self.target_busy_fraction!r} must be in (0, 1]")
        need(self.target_queue_tokens_per_replica > 0, f"target_queue_tokens_per_replica={self.target_queue_tokens_per_replica!r} must be > 0")
        need(self.min_replicas >= 0, f"min_replicas={self.min_replicas!r} must be >= 0")
        need(self.max_replicas >= max(self.min_replicas, 1), f"max_replicas={self.max_replicas!r} must be >= max(min_replicas={self.min_replicas!r}, 1)")
        for name in ("upscale_delay_s", "downscale_delay_s", "look_back_s"):
            value = getattr(self, name)
            need(math.isfinite(value) and value >= 0, f"{name}={value!r} must be a finite number >= 0")
        for name in ("upscale_smoothing_factor", "downscale_smoothing_factor"):
            value = getattr(self, name)
            need(0.0 < value <= 1.0, f"{name}={value!r} must be in (0, 1]")
        need(self.panic_threshold > 1.0, f"panic_threshold={self.panic_threshold!r} must be > 1")
        need(0.0 < self.balance_target <= 1.0, f"balance_target={self.balance_target!r} must be in (0, 1]")
        need(0.0 < self.min_balance_gain < 1.0, f"min_balance_gain={self.min_balance_gain!r} must be in (0, 1)")
        need(self.max_extra_per_worker >= 0, f"max_extra_per_worker={self.max_extra_per_worker!r} must be >= 0")
        need(self.max_hot_replicas >= 0, f"max_hot_replicas={self.max_hot_replicas!r} must be >= 0")
        need(self.metrics_stale_s > 0, f"metrics_stale_s={self.metrics_stale_s!r} must be > 0")
        need(not (self.downscale_delay_s < self.look_back_s),
             f"downscale_delay_s={self.downscale_delay_s!r} must be >= look_back_s={self.look_back_s!r}:"
             " a scale-down must rest on at least one full window of smoothed load")
        if problems:
            raise ConfigError("invalid autoscaler config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict (field name -> value)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "AutoscalerConfig":
        """Build a config from a mapping, ignoring ``None`` values (unset flags).

        Raises:
            ConfigError: an unknown field name, or a value out of range.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown autoscaler setting(s) {unknown}; known: {sorted(names)}")
        return cls(**{k: v for k, v in values.items() if v is not None})


ENV_PREFIX = "EAAS_AUTOSCALER_"


def config_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``EAAS_AUTOSCALER_<FIELD>`` variables as typed config values.

    Raises:
        ConfigError: a value does not parse as its field's type.
    """
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for f in dataclasses.fields(AutoscalerConfig):
        raw = env.get(ENV_PREFIX + f.name.upper())
        if raw is None or raw == "":
            continue
        typ = int if f.type in (int, "int") else float
        try:
            out[f.name] = typ(raw)
        except ValueError:
            raise ConfigError(f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a valid {typ.__name__}") from None
    return out
