"""Seeded, token-level load traces for the autoscaling benchmark.

A trace is a list of requests (arrival time, expert function, tokens), drawn
as a non-homogeneous Poisson process whose rate follows one of three shapes,
as a fraction of the peak rate:

- ``step``: 20 % of the peak, 100 % from 1/4 to 3/4 of the duration, then 20 %;
- ``spike``: 30 % of the peak, with a ``spike_s`` burst at 100 % half-way;
- ``diurnal``: one period of a sinusoid between 20 % and 100 %, starting at
  the trough: ``0.6 - 0.4 cos(2 pi t / duration)``. Its mean is 60 % of the
  peak, so a pool that tracked the load perfectly would save 40 %.

Experts are chosen per request with a Zipf law of exponent ``zipf_s`` (0 =
uniform); expert ``e`` lives on shard ``e % num_shards``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from eaas.errors import ConfigError

TraceKind = Literal["step", "spike", "diurnal"]
TRACE_KINDS: tuple[str, ...] = ("step", "spike", "diurnal")


def rate_fraction(kind: str, t_s: np.ndarray | float, duration_s: float, spike_s: float = 60.0) -> np.ndarray:
    """The trace's rate at time ``t_s`` as a fraction of its peak (0-1].

    Raises:
        ConfigError: unknown ``kind``.
    """
    t = np.asarray(t_s, dtype=np.float64)
    if kind == "step":
        return np.where((t >= 0.25 * duration_s) & (t < 0.75 * duration_s), 1.0, 0.2)
    if kind == "spike":
        start = 0.5 * duration_s
        return np.where((t >= start) & (t < start + spike_s), 1.0, 0.3)
    if kind == "diurnal":
        return 0.6 - 0.4 * np.cos(2.0 * math.pi * t / duration_s)
    raise ConfigError(f"unknown trace {kind!r}; expected one of {list(TRACE_KINDS)}")


@dataclass(frozen=True, slots=True)
class TraceSpec:
    """How to draw a trace. Every field has its unit; defaults are cluster scale.

    Attributes:
        kind: ``step``, ``spike`` or ``diurnal``.
        duration_s: length of the trace.
        peak_tokens_per_s: offered load at the peak, all shards together.
        mean_tokens_per_request: mean rows per request (uniform in [mean/2, 3 mean/2]).
        num_functions: expert functions (spread round-robin over shards).
        num_shards: shards (worker types).
        zipf_s: Zipf exponent of the expert popularity; 0 = uniform.
        spike_s: length of the burst of the ``spike`` trace.
        seed: seed of the random generator.
    """

    kind: str = "diurnal"
    duration_s: float = 3600.0
    peak_tokens_per_s: float = 300_000.0
    mean_tokens_per_request: int = 512
    num_functions: int = 64
    num_shards: int = 8
    zipf_s: float = 0.0
    spike_s: float = 60.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in TRACE_KINDS:
            raise ConfigError(f"unknown trace {self.kind!r}; expected one of {list(TRACE_KINDS)}")
        if not (self.duration_s > 0 and self.peak_tokens_per_s > 0 and self.mean_tokens_per_request >= 2):
            raise ConfigError(
                f"trace needs duration_s > 0, peak_tokens_per_s > 0, mean_tokens_per_request >= 2; got "
                f"{self.duration_s!r}, {self.peak_tokens_per_s!r}, {self.mean_tokens_per_request!r}"
            )
        if not (self.num_shards >= 1 and self.num_functions >= self.num_shards and self.zipf_s >= 0):
            raise ConfigError(
                f"trace needs num_shards >= 1, num_functions >= num_shards, zipf_s >= 0; got "
                f"{self.num_shards!r}, {self.num_functions!r}, {self.zipf_s!r}"
            )

    def function_weights(self) -> np.ndarray:
        """Probability of each expert function, ``[num_functions]`` float64 summing to 1."""
        w = 1.0 / np.arange(1, self.num_functions + 1, dtype=np.float64) ** self.zipf_s
        return w / w.sum()

    def shard_of(self, function: np.ndarray | int) -> np.ndarray | int:
        """Shard index of expert function index(es)."""
        return function % self.num_shards

    def shard_shares(self) -> np.ndarray:
        """Share of the tokens each shard receives, ``[num_shards]`` float64."""
        return np.bincount(
            np.arange(self.num_functions) % self.num_shards, weights=self.function_weights(), minlength=self.num_shards
        )

    def shard_name(self, shard: int) -> str:
        return f"shard-{shard}"

    def function_name(self, function: int) -> str:
        return f"sim/0/{function}"


@dataclass(frozen=True, slots=True)
class Trace:
    """The drawn requests, sorted by arrival time (``N`` requests).

    Attributes:
        spec: what was drawn.
        arrival_s: ``[N]`` float64 arrival times in seconds.
        function: ``[N]`` int32 expert function index.
        tokens: ``[N]`` int32 rows per request.
    """

    spec: TraceSpec
    arrival_s: np.ndarray
    function: np.ndarray
    tokens: np.ndarray

    @property
    def num_requests(self) -> int:
        return int(self.arrival_s.shape[0])

    @property
    def shard(self) -> np.ndarray:
        """``[N]`` int32 shard index of each request."""
        return (self.function % self.spec.num_shards).astype(np.int32)


def make_trace(spec: TraceSpec) -> Trace:
    """Draw the requests of ``spec`` (same spec and seed: same trace, bit for bit)."""
    rng = np.random.default_rng(spec.seed)
    bin_s = 0.1
    starts = np.arange(0.0, spec.duration_s, bin_s)
    widths = np.minimum(bin_s, spec.duration_s - starts)
    frac = rate_fraction(spec.kind, starts + widths / 2, spec.duration_s, spec.spike_s)
    requests_per_s = spec.peak_tokens_per_s / spec.mean_tokens_per_request
    counts = rng.poisson(frac * requests_per_s * widths)
    n = int(counts.sum())
    arrival = np.repeat(starts, counts) + rng.random(n) * np.repeat(widths, counts)
    arrival.sort(kind="stable")
    lo = spec.mean_tokens_per_request // 2
    hi = spec.mean_tokens_per_request + lo
    tokens = rng.integers(lo, hi + 1, size=n, dtype=np.int32)
    function = rng.choice(spec.num_functions, size=n, p=spec.function_weights()).astype(np.int32)
    return Trace(spec, arrival, function, tokens)
