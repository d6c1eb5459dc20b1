"""The records of one layer call, and the lane it runs on.

A *lane* (:class:`CallEnv`) is the set of long-lived parts one call at a time uses — the
routing view, the connections, the suspects, the waiter, the counters — owned by an
:class:`~eaas.platform.client.ExpertClient`; a call is a list of :class:`Item` (one
expert's rows) and, while it runs, the :class:`InFlight` requests sent and not answered
(:class:`~eaas.platform.inflight.LayerCall` holds them).
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from eaas.platform.connections import Connections
from eaas.platform.dispatch import RecentTokens
from eaas.platform.routing import RoutingView, Suspects
from eaas.platform.waiter import Waiter
from eaas.settings import Settings


@dataclass(slots=True)
class ClientStats:
    """Counters of one client (read by the gateway's metrics)."""

    calls: int = 0
    requests: int = 0
    rows: int = 0
    failovers: int = 0
    late_replies: int = 0
    errors: Counter = field(default_factory=Counter)


@dataclass(slots=True)
class CallEnv:
    """A lane: the long-lived parts one call at a time uses. An
    :class:`~eaas.platform.client.ExpertClient` has one per concurrent caller (at most
    ``MAX_LANES``); the lanes share its routing view, suspects, counters and random source,
    and each has its own connections and waiter.

    Attributes:
        model: model name (logs, metrics labels).
        settings: timeouts and limits.
        routing, conns, suspects, waiter: the client's routing view, this lane's
            connections, the client's suspected workers, this lane's reply waiter.
        rng: replica-choice random source.
        stats: counters; metrics: optional ``record_expert_call(n, model)`` /
            ``record_failover(n, model)`` sink.
        stop: set when the client closes (cuts waits short).
        next_request_id: a fresh request id per call.
        recent: rows sent to each (worker, layer) lately (shared by the lanes; steers replica choice).
    """

    model: str
    settings: Settings
    routing: RoutingView
    conns: Connections
    suspects: Suspects
    waiter: Waiter
    rng: random.Random
    stats: ClientStats
    stop: threading.Event
    next_request_id: Callable[[], str]
    metrics: Any = None
    recent: RecentTokens = field(default_factory=RecentTokens)


@dataclass(slots=True)
class Item:
    """One expert's rows in a call: where they come from and where their output goes."""

    fid: str
    rows: torch.Tensor  # [n] int64 indices into the call's x
    out_row: int  # first row of its output in the call's y
    n: int  # rows (rows.numel())
    tried: set[str] = field(default_factory=set)


@dataclass(slots=True)
class InFlight:
    """One request sent and not yet answered."""

    wid: str
    slot: Any
    items: list[Item]
    deadline_s: float
    epoch: int = 0  # the incarnation of the worker it was sent to
