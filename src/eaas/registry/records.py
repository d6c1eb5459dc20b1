"""Records stored in the registry, as frozen slotted dataclasses.

Model and function specs are owned by :mod:`eaas.functions.spec` and stored as
JSON; the registry treats them as plain dicts with at least ``name`` (model) and
``id`` (function). Workers are described here because their record is the
registry's own: a Redis hash held by a lease.
"""

from __future__ import annotations

import enum
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any


class WorkerState(str, enum.Enum):
    """Lifecycle of an expert worker (DESIGN.md, "Registry")."""

    STARTING = "starting"  # launched, loading weights: counts toward a target, not as capacity
    READY = "ready"  # registered and serving
    DRAINING = "draining"  # finishing its queue before exit: takes no new work


class EventKind(str, enum.Enum):
    """Membership events published on ``{prefix}:events``."""

    MODEL_REGISTERED = "model_registered"
    MODEL_REMOVED = "model_removed"
    WORKER_REGISTERED = "worker_registered"
    WORKER_STATE = "worker_state"
    WORKER_GONE = "worker_gone"


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """One expert worker as the registry sees it.

    Attributes:
        id: worker id (unique in the deployment).
        model: the model whose functions it hosts.
        endpoint: ZeroMQ address clients connect to (``tcp://host:port`` or ``ipc://``).
        shard: the function ids it hosts (``{model}/{layer}/{expert}``), sorted.
        state: lifecycle state.
        host_id: identity of its host (same host -> shared memory is possible).
        device: torch device of its experts (``cpu``, ``cuda:0``).
        capabilities: transport capabilities (see ``eaas.platform.transport``).
        pid: process id on its host.
        shard_name: name of the shard group it belongs to (for the autoscaler).
        queue_tokens: rows waiting or in service at the last heartbeat.
        queue_requests: requests waiting or in service at the last heartbeat.
        tokens_served: rows computed since start.
        requests_served: requests answered since start.
        batches: forward batches run since start.
        cross_client_batches: batches that mixed requests of several clients.
        replies_dropped: replies the worker could not deliver (the client's queue was
            full or it was gone); each was failed with a ``reply_dropped`` error reply
            when the client read again (:mod:`eaas.platform.outbox`).
        busy_fraction: share of wall time spent computing over the last heartbeat period.
        function_tokens: rows computed per function id since start.
        started_at_s: unix time of start.
        heartbeat_at_s: unix time of the last heartbeat.
        lease_ttl_s: lease length in seconds.
        epoch: the incarnation, set by the registry at each registration (a worker
            that lost its lease and registered again has a larger one).
        warmup_ms: time the worker spent running each hosted function once before
            it registered ``ready`` (no live call pays first-call costs).
    """

    id: str
    model: str
    endpoint: str
    shard: tuple[str, ...] = ()
    state: WorkerState = WorkerState.STARTING
    host_id: str = ""
    device: str = "cpu"
    capabilities: dict[str, Any] = field(default_factory=dict)
    pid: int = 0
    shard_name: str = ""
    queue_tokens: int = 0
    queue_requests: int = 0
    tokens_served: int = 0
    requests_served: int = 0
    batches: int = 0
    cross_client_batches: int = 0
    replies_dropped: int = 0
    busy_fraction: float = 0.0
    function_tokens: dict[str, int] = field(default_factory=dict)
    started_at_s: float = 0.0
    heartbeat_at_s: float = 0.0
    lease_ttl_s: float = 0.0
    epoch: int = 0
    warmup_ms: float = 0.0

    def lease_age_s(self, now_s: float | None = None) -> float:
        """Seconds since the last heartbeat."""
        return max(0.0, (time.time() if now_s is None else now_s) - self.heartbeat_at_s)

    def to_hash(self) -> dict[str, str]:
        """Flatten to a Redis hash (strings; JSON for nested values). The shard is stored apart."""
        out: dict[str, str] = {}
        for k, v in asdict(self).items():
            if k == "shard":
                continue
            if isinstance(v, WorkerState):
                out[k] = v.value
            elif isinstance(v, (dict, list, tuple)):
                out[k] = json.dumps(v, sort_keys=True)
            else:
                out[k] = str(v)
        return out

    @classmethod
    def from_hash(cls, h: dict[str, str], shard: set[str] | list[str] | tuple[str, ...] = ()) -> "WorkerRecord":
        """Rebuild from a Redis hash (values decoded to ``str``); unknown fields are ignored."""

        def num(key: str, typ: type, default: Any = 0) -> Any:
            try:
                return typ(h.get(key, default))
            except (TypeError, ValueError):
                return default

        def js(key: str, default: Any) -> Any:
            try:
                return json.loads(h[key])
            except (KeyError, ValueError):
                return default

        try:
            state = WorkerState(h.get("state", "starting"))
        except ValueError:
            state = WorkerState.STARTING
        return cls(
            id=h.get("id", ""),
            model=h.get("model", ""),
            endpoint=h.get("endpoint", ""),
            shard=tuple(sorted(shard)),
            state=state,
            host_id=h.get("host_id", ""),
            device=h.get("device", "cpu"),
            capabilities=js("capabilities", {}),
            pid=num("pid", int),
            shard_name=h.get("shard_name", ""),
            queue_tokens=num("queue_tokens", int),
            queue_requests=num("queue_requests", int),
            tokens_served=num("tokens_served", int),
            requests_served=num("requests_served", int),
            batches=num("batches", int),
            cross_client_batches=num("cross_client_batches", int),
            replies_dropped=num("replies_dropped", int),
            busy_fraction=num("busy_fraction", float, 0.0),
            function_tokens=js("function_tokens", {}),
            started_at_s=num("started_at_s", float, 0.0),
            heartbeat_at_s=num("heartbeat_at_s", float, 0.0),
            lease_ttl_s=num("lease_ttl_s", float, 0.0),
            epoch=num("epoch", int),
            warmup_ms=num("warmup_ms", float, 0.0),
        )


@dataclass(frozen=True, slots=True)
class WorkerStats:
    """What a heartbeat carries (DESIGN.md: queue depth, tokens served, busy fraction)."""

    queue_tokens: int = 0
    queue_requests: int = 0
    tokens_served: int = 0
    requests_served: int = 0
    batches: int = 0
    busy_fraction: float = 0.0
    function_tokens: dict[str, int] = field(default_factory=dict)
    cross_client_batches: int = 0
    replies_dropped: int = 0

    def to_hash(self, now_s: float) -> dict[str, str]:
        return {
            "queue_tokens": str(self.queue_tokens),
            "queue_requests": str(self.queue_requests),
            "tokens_served": str(self.tokens_served),
            "requests_served": str(self.requests_served),
            "batches": str(self.batches),
            "cross_client_batches": str(self.cross_client_batches),
            "replies_dropped": str(self.replies_dropped),
            "busy_fraction": f"{self.busy_fraction:.4f}",
            "function_tokens": json.dumps(self.function_tokens, sort_keys=True),
            "heartbeat_at_s": f"{now_s:.6f}",
        }


@dataclass(frozen=True, slots=True)
class Event:
    """A membership event (JSON on the events channel)."""

    kind: EventKind
    model: str = ""
    worker: str = ""
    state: str = ""
    ts_s: float = 0.0

    def to_json(self) -> str:
        return json.dumps(
            {"kind": self.kind.value, "model": self.model, "worker": self.worker, "state": self.state, "ts_s": self.ts_s}
        )

    @classmethod
    def from_json(cls, data: str | bytes) -> "Event | None":
        """Parse an event; returns None for anything malformed (events are hints, never trusted)."""
        try:
            d = json.loads(data)
            return cls(
                kind=EventKind(d["kind"]),
                model=str(d.get("model", "")),
                worker=str(d.get("worker", "")),
                state=str(d.get("state", "")),
                ts_s=float(d.get("ts_s", 0.0)),
            )
        except (ValueError, KeyError, TypeError):
            return None
