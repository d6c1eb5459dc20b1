"""The registry: models, functions, workers and leases in Redis (DESIGN.md, "Registry")."""

from eaas.registry.keys import Keys
from eaas.registry.records import Event, EventKind, WorkerRecord, WorkerState, WorkerStats
from eaas.registry.store import Registry

__all__ = ["Event", "EventKind", "Keys", "Registry", "WorkerRecord", "WorkerState", "WorkerStats"]
