"""Extra replicas on a live worker: host more functions, or fewer, without a restart.

The autoscaler writes the extra replicas it wants a worker to host into the registry
(``worker:{id}:extra``, :meth:`~eaas.registry.store.Registry.set_extra_functions`).
:class:`ExtraReplicas` runs on the worker, in its own thread, and follows that set
(vLLM EPLB's redundant experts, placed while serving: no stop-the-world):

1. **removals first**: the functions leave the worker's hosting sets in the registry
   (clients re-read routing on the event and stop sending them new rows), then
   ``grace_s`` passes, so rows already on their way are still served;
2. the worker's whole shard (its own functions plus the wanted extras) is loaded
   anew from the checkpoint in this thread and warmed up, one row per function;
3. the serving loop swaps it in between two batches (:meth:`take`), so no batch
   ever sees half a shard;
4. **additions last**: only then do the new functions join the hosting sets.

A row that still reaches a worker for a function it no longer hosts is answered
``unknown_function``, which clients retry on another replica: nothing is lost.
Each pass survives any failure (logged; the next pass tries again).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

from eaas.errors import EaaSError
from eaas.functions.spec import function_id, parse_function_id

log = logging.getLogger(__name__)

Pair = tuple[int, int]


class ExtraReplicas:
    """Follow the registry's wanted extra replicas for one worker.

    Args:
        registry: the deployment's registry.
        worker_id: this worker.
        model: its model name (extras of other models are ignored).
        base: the ``(layer, expert)`` pairs the worker was started with (always kept).
        load: builds a shard for a list of pairs (the worker's own loader: same
            checkpoint, device and dtype, so the bits are the same).
        interval_s: how often the wanted set is read (s).
        grace_s: how long removed functions stay loaded after leaving the registry (s).
    """

    def __init__(self, registry: Any, worker_id: str, model: str, base: list[Pair],
                 load: Callable[[list[Pair]], Any], *, interval_s: float = 0.5, grace_s: float = 2.0) -> None:
        self.registry, self.worker_id, self.model = registry, worker_id, model
        self.base = frozenset(function_id(model, l, e) for l, e in base)
        self._load = load
        self.interval_s, self.grace_s = interval_s, grace_s
        self.hosted: frozenset[str] = frozenset()  # extras loaded, swapped in and announced
        self.loads = 0
        self.last_error: str | None = None
        self._offer: tuple[Any, dict[str, Pair]] | None = None
        self._taken = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"eaas-extras-{worker_id}", daemon=True)

    def start(self) -> "ExtraReplicas":
        """Start following the registry."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread (an offer not yet taken is dropped)."""
        self._stop.set()
        self._taken.set()
        self._thread.join(timeout=10)

    def take(self) -> tuple[Any, dict[str, Pair]] | None:
        """Serving loop, between batches: the new shard and its ``fid -> (layer, expert)`` map, if one waits."""
        offer = self._offer
        if offer is None:
            return None
        self._offer = None
        self._taken.set()
        return offer

    def _wanted(self) -> frozenset[str]:
        out = set()
        for fid in self.registry.extra_functions(self.worker_id):
            try:
                model, _, _ = parse_function_id(fid)
            except EaaSError:
                continue
            if model == self.model and fid not in self.base:
                out.add(fid)
        return frozenset(out)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
                self.last_error = None
            except Exception as e:  # noqa: BLE001 - one failed pass never ends the thread
                again = self.last_error == repr(e)  # the same failure pass after pass (Redis away): logged once
                self.last_error = repr(e)
                if again:
                    pass
                elif isinstance(e, EaaSError):
                    log.warning("worker %s: extra replicas: %s", self.worker_id, e)
                else:
                    log.exception("worker %s: extra replicas pass failed", self.worker_id)
            self._stop.wait(self.interval_s)

    def step(self) -> None:
        """One pass: make the hosted extras equal the wanted ones (see the module docstring)."""
        wanted = self._wanted()
        if wanted == self.hosted:
            if self.hosted:  # a re-registration (new lease) rewrites the shard set: announce them again
                self.registry.update_hosting(self.worker_id, add=self.hosted)
            return
        removed, added = self.hosted - wanted, wanted - self.hosted
        if removed:
            self.registry.update_hosting(self.worker_id, remove=removed)
            if self._stop.wait(self.grace_s):
                return
        pairs = sorted({parse_function_id(f)[1:] for f in self.base | wanted})
        shard = self._load(pairs)
        x = torch.zeros(len(pairs), shard.hidden_size, dtype=shard.dtype, device=shard.device)
        with torch.inference_mode():  # warm: the first forward of a module pays one-time costs
            shard.forward(x, [(p, 1) for p in pairs])
        self._taken.clear()
        self._offer = (shard, {function_id(self.model, l, e): (l, e) for l, e in pairs})
        self._taken.wait()
        if self._stop.is_set():
            return
        self.loads += 1
        self.hosted = wanted
        if added:
            self.registry.update_hosting(self.worker_id, add=added)
        log.info("worker %s: extra replicas now %s (+%d -%d)", self.worker_id, sorted(self.hosted) or "none",
                 len(added), len(removed))
