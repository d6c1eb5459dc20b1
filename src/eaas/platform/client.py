"""The attention client's side of EaaS: dispatch, failover and combine.

:class:`ExpertClient` turns one MoE layer call ``(x[T, D], top_k_index[T, K],
top_k_weights[T, K])`` into requests to expert workers and back into
``out[T, D]`` (DESIGN.md, "One MoE layer, end to end"):

1. **Dispatch.** Rows are grouped by expert in transformers' eager order
   (:func:`~eaas.platform.dispatch.plan_layer`); each expert gets a replica
   (least outstanding tokens, power-of-two choices when many); the experts
   bound for one worker travel in one request of segments, the rows gathered
   straight into the pair's transport slot (a shared-memory arena on one host).
2. Requests to different workers are in flight at once; the call is
   synchronous (transformers calls experts synchronously).
3. **Failover.** A request that misses its per-attempt deadline, whose connection drops,
   whose worker's lease (or incarnation) is gone, or that gets a retryable error, is re-sent
   to another replica; late replies are dropped by request id. Work sent to a *draining*
   worker is waited for. A function with no live replica fails the call after
   ``no_replica_grace_ms`` (:class:`~eaas.errors.NoReplicaAvailable`).
4. **Combine** in the eager loop's order and dtype (:func:`~eaas.platform.dispatch.combine`).

The routing table (function -> ready replicas) is kept by a
:class:`~eaas.platform.routing.RoutingView`; the sockets and transport channels,
one per worker incarnation, by :class:`~eaas.platform.connections.Connections`; one
call's dispatch, waiting and failover by :class:`~eaas.platform.inflight.LayerCall`.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import threading
from collections.abc import Callable
from typing import Any

import torch

from eaas.errors import Cancelled, EaaSError
from eaas.functions.spec import function_id
from eaas.platform.callstate import CallEnv, ClientStats, Item
from eaas.platform.connections import Connections
from eaas.platform.dispatch import RecentTokens, combine, combine_rows, plan_layer
from eaas.platform.inflight import LayerCall
from eaas.platform.routing import RoutingView, Suspects
from eaas.platform.waiter import Waiter
from eaas.registry.records import WorkerRecord
from eaas.registry.store import Registry
from eaas.settings import Settings, get_settings

log = logging.getLogger(__name__)

#: concurrent calls at most (each holds a lane: its own connections and waiter); more wait
MAX_LANES = 4


def _own(call: LayerCall) -> torch.Tensor:
    """The call's ``y``, run to the end and copied so that it outlives the call (a one-row call's
    ``y`` is a view of its reply's slot)."""
    return call.run().clone()


class ExpertClient:
    """Calls the routed experts of one registered model on EaaS workers.

    Args:
        registry: the deployment's registry.
        model: registered model name.
        settings: timeouts, transport override, arena size (default: from the environment).
        transport: force a transport for every pair (``"inline"``, ``"shm"``, ...);
            default ``settings.transport`` (``auto``: chosen per pair).
        seed: seed of the replica-choice random source.

    Thread-safe: concurrent calls (the runner's two micro-batches, the gateway's invoke
    endpoints) each take a *lane* — their own connections (sockets, arenas, rings) and
    reply waiter — so a reply is only ever read by the thread whose call it answers; at
    most ``MAX_LANES`` calls run at once, more wait for a lane. The routing view, the
    suspects and the counters are shared. Close it when done.

    Raises:
        NotFound: the model is not registered.
    """

    def __init__(
        self,
        registry: Registry,
        model: str,
        settings: Settings | None = None,
        *,
        transport: str | None = None,
        seed: int | None = None,
    ) -> None:
        self.settings = settings or get_settings()
        self.registry = registry
        self.model = model
        spec = registry.model(model)
        self.num_experts = int(spec["num_experts"])
        self.hidden_size = int(spec["hidden_size"])
        self.transport = transport or self.settings.transport
        self.stats = ClientStats()
        self._rng = random.Random(seed)
        self._recent = RecentTokens()  # rows sent per worker lately, shared by the lanes
        self._stop = threading.Event()
        self._ids = itertools.count()
        self._id_prefix = f"{os.getpid():x}.{random.getrandbits(24):06x}."
        self._fid_cache: dict[tuple[int, int], str] = {}
        self.suspects = Suspects(max(0.25, 4 * self.settings.lease_ttl_s), self._rng)
        self.routing = RoutingView(registry, model, self.settings.routing_refresh_s)
        self._metrics: Any = None
        self._lanes: list[CallEnv] = []  # every lane made
        self._free: list[CallEnv] = []  # lanes not in use
        self._lane_cv = threading.Condition()
        first = self._new_lane()
        self._free.append(first)
        self._conns, self.waiter = first.conns, first.waiter  # the first lane's (tests, transports)

    def _new_lane(self) -> CallEnv:
        lane = CallEnv(self.model, self.settings, self.routing, Connections(self.model, self.settings, self.transport),
                       self.suspects, Waiter(self.settings.spin_floor_us / 1e6, self.settings.spin_cap_us / 1e6),
                       self._rng, self.stats, self._stop, self._next_request_id, self._metrics, self._recent)
        self._lanes.append(lane)
        return lane

    def _take_lane(self) -> CallEnv:
        """A lane for one call: a free one, a new one below ``MAX_LANES``, or the next one freed
        (give it back with :meth:`_give_lane`)."""
        with self._lane_cv:
            while not self._free and len(self._lanes) >= MAX_LANES:
                self._lane_cv.wait()
            lane = self._free.pop() if self._free else self._new_lane()
            self.stats.calls += 1
        return lane

    def _give_lane(self, lane: CallEnv) -> None:
        with self._lane_cv:
            self._free.append(lane)
            self._lane_cv.notify()

    # --- routing ---------------------------------------------------------------------

    def refresh(self) -> None:
        """Re-read the routing table from the registry now (see :class:`~eaas.platform.routing.RoutingView`)."""
        self.routing.refresh()

    def ready_replicas(self, fid: str) -> list[WorkerRecord]:
        """Ready replicas of a function in the current routing table."""
        return self.routing.ready_replicas(fid)

    def missing_functions(self) -> list[str]:
        """Functions of the model with no ready replica right now."""
        return self.routing.missing_functions()

    def pool_summary(self) -> dict[str, Any]:
        """The pool as this client sees it (see :meth:`RoutingView.pool_summary`)."""
        return self.routing.pool_summary()

    def transports(self) -> dict[str, str]:
        """Worker id -> transport of its open connections (``inline``, ``shm``, ...), over every lane."""
        out: dict[str, str] = {}
        for lane in list(self._lanes):
            out.update(lane.conns.transports())
        return out

    # --- calls --------------------------------------------------------------------

    def function_id(self, layer: int, expert: int) -> str:
        key = (layer, expert)
        fid = self._fid_cache.get(key)
        if fid is None:
            fid = self._fid_cache[key] = function_id(self.model, layer, expert)
        return fid

    def forward(
        self,
        layer: int,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        """One MoE layer's routed experts: ``out[t] = sum_k w[t,k] * f_{e[t,k]}(x[t])``.

        Args:
            layer: decoder layer index.
            hidden_states: ``[T, D]`` (fp32/bf16/fp16; CPU, or CUDA: new pairs then pick
                ``cuda_ipc`` with workers on the same GPU node).
            top_k_index: ``[T, K]`` expert ids from the model's router.
            top_k_weights: ``[T, K]`` routing weights.

        Returns:
            ``[T, D]`` in ``hidden_states.dtype``, combined in transformers' eager order.

        Raises:
            NoReplicaAvailable: some expert had no ready replica until the call deadline.
            RemoteError: a worker rejected the request for a non-retryable reason.
        """
        if hidden_states.dim() != 2 or top_k_index.shape != top_k_weights.shape or top_k_index.shape[0] != hidden_states.shape[0]:
            raise EaaSError(
                f"layer {layer}: expected x[T, D], top_k_index[T, K], top_k_weights[T, K]; got "
                f"{list(hidden_states.shape)}, {list(top_k_index.shape)}, {list(top_k_weights.shape)}"
            )
        plan = plan_layer(top_k_index, self.num_experts)
        if not plan:
            return torch.zeros_like(hidden_states)
        x = hidden_states.detach() if hidden_states.requires_grad else hidden_states
        x = x.contiguous()
        items, row = [], 0
        for (expert, rows), n in zip(plan.expert_rows(), plan.counts):
            items.append(Item(self.function_id(layer, expert), rows, row, n))
            row += n
        def finish(call: LayerCall) -> torch.Tensor:
            rows = call.run_rows()
            if rows is not None:  # a one-token call's replies, unjoined
                return combine_rows(hidden_states, plan, rows, top_k_weights)
            return combine(hidden_states, plan, call.output(), top_k_weights)

        return self._run(x, items, row, finish)

    def invoke(self, function_id: str, x: torch.Tensor, cancelled: threading.Event | None = None) -> torch.Tensor:
        """Compute one function on ``x[N, D]`` remotely: ``y[N, D] = f(x)``.

        Args:
            cancelled: if set by the time this call gets its turn (a free lane),
                nothing is sent and :class:`~eaas.errors.Cancelled` is raised.

        Raises:
            NoReplicaAvailable, ExpertTimeout, RemoteError: as :meth:`forward`.
            Cancelled: ``cancelled`` was set before the call started.
        """
        x = x.detach().contiguous()
        n = x.shape[0]
        if n == 0:
            return torch.empty_like(x)
        return self._run(x, [Item(function_id, torch.arange(n), 0, n)], n, _own, cancelled)

    def _run(self, x: torch.Tensor, items: list[Item], total_rows: int, finish: Callable[[LayerCall], torch.Tensor],
             cancelled: threading.Event | None = None) -> torch.Tensor:
        """Run one call on a lane; ``finish(call)`` runs it (:meth:`LayerCall.run` or
        :meth:`LayerCall.run_rows`) and reads its rows (combine, or a copy) before its slots are released."""
        lane = self._take_lane()  # not a contextmanager: a generator per layer call costs more than the lock
        call = None
        try:
            if cancelled is not None and cancelled.is_set():
                raise Cancelled("the caller cancelled this call before it was sent")
            call = LayerCall(lane, x, items, total_rows)
            return finish(call)
        finally:
            if call is not None:
                call.release()
            self._give_lane(lane)

    @property
    def metrics(self) -> Any:
        """Optional sink: ``record_expert_call(n, model)``, ``record_failover(n, model)``."""
        return self._metrics

    @metrics.setter
    def metrics(self, sink: Any) -> None:
        with self._lane_cv:
            self._metrics = sink
            for lane in self._lanes:
                lane.metrics = sink

    def _next_request_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids)}"

    def close(self) -> None:
        """Stop the routing thread and close every connection (frees shared arenas)."""
        self._stop.set()
        self.routing.close()
        for lane in list(self._lanes):
            lane.conns.close()

    def __enter__(self) -> "ExpertClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
