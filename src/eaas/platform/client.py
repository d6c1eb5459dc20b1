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
one per worker incarnation, by :class:`~eaas.platform.connections.Connections`.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import zmq

from eaas.errors import Cancelled, EaaSError, NoReplicaAvailable, ProtocolError, RemoteError, TransportError
from eaas.functions.spec import function_id
from eaas.platform.connections import CONNECT_TIMEOUT_MS, Conn, Connections
from eaas.platform.dispatch import choose_replica, combine, plan_layer
from eaas.platform.protocol import RETRYABLE_CODES, now_ms, recv_frames, send_frames
from eaas.platform.decode import decode_header
from eaas.platform.routing import RoutingView, Suspects
from eaas.registry.records import WorkerRecord
from eaas.registry.store import Registry
from eaas.settings import Settings, get_settings

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Item:
    """One expert's rows in a call: where they come from and where their output goes."""

    fid: str
    rows: torch.Tensor  # [n] indices into the source x
    out_row: int  # first row of its output in the call's y buffer
    tried: set[str] = field(default_factory=set)


@dataclass(slots=True)
class _InFlight:
    wid: str
    slot: Any
    items: list[_Item]
    deadline_s: float
    epoch: int = 0  # the incarnation of the worker it was sent to


@dataclass(slots=True)
class ClientStats:
    """Counters of one client (read by the gateway's metrics)."""

    calls: int = 0
    requests: int = 0
    rows: int = 0
    failovers: int = 0
    late_replies: int = 0
    errors: Counter = field(default_factory=Counter)


class ExpertClient:
    """Calls the routed experts of one registered model on EaaS workers.

    Args:
        registry: the deployment's registry.
        model: registered model name.
        settings: timeouts, transport override, arena size (default: from the environment).
        transport: force a transport for every pair (``"inline"``, ``"shm"``, ...);
            default ``settings.transport`` (``auto``: chosen per pair).
        seed: seed of the replica-choice random source.

    Not thread-safe for concurrent calls: calls are serialised by a lock (the
    gateway's model runner owns one client). Close it when done.

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
        self.metrics: Any = None  # optional: record_expert_call(n, model), record_failover(n, model)
        self._rng = random.Random(seed)
        self._conns = Connections(model, self.settings, self.transport)
        self._call_lock = threading.Lock()
        self._stop = threading.Event()
        self._ids = itertools.count()
        self._id_prefix = f"{os.getpid():x}.{random.getrandbits(24):06x}."
        self._fid_cache: dict[tuple[int, int], str] = {}
        self.suspects = Suspects(max(0.25, 4 * self.settings.lease_ttl_s), self._rng)
        self.routing = RoutingView(registry, model, self.settings.routing_refresh_s)

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
        """Worker id -> transport of each open connection (``inline``, ``shm``, ...)."""
        return self._conns.transports()

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
            hidden_states: ``[T, D]`` (fp32/bf16/fp16, CPU).
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
        x = hidden_states.detach().contiguous()
        if not plan:
            return torch.zeros_like(hidden_states)
        items, row = [], 0
        for rows in plan:
            items.append(_Item(self.function_id(layer, rows.expert), rows.token_idx, row))
            row += rows.token_idx.numel()
        y = self._run(x, items, row)
        return combine(hidden_states, plan, y, top_k_weights)

    def invoke(self, function_id: str, x: torch.Tensor, cancelled: threading.Event | None = None) -> torch.Tensor:
        """Compute one function on ``x[N, D]`` remotely: ``y[N, D] = f(x)``.

        Args:
            cancelled: if set by the time this call gets its turn (calls are serialised),
                nothing is sent and :class:`~eaas.errors.Cancelled` is raised.

        Raises:
            NoReplicaAvailable, ExpertTimeout, RemoteError: as :meth:`forward`.
            Cancelled: ``cancelled`` was set before the call started.
        """
        x = x.detach().contiguous()
        n = x.shape[0]
        if n == 0:
            return torch.empty_like(x)
        return self._run(x, [_Item(function_id, torch.arange(n), 0)], n, cancelled)

    def _run(self, x: torch.Tensor, items: list[_Item], total_rows: int,
             cancelled: threading.Event | None = None) -> torch.Tensor:
        with self._call_lock:
            if cancelled is not None and cancelled.is_set():
                raise Cancelled("the caller cancelled this call before it was sent")
            self.stats.calls += 1
            return self._run_locked(x, items, total_rows)

    def _run_locked(self, x: torch.Tensor, items: list[_Item], total_rows: int) -> torch.Tensor:
        y = torch.empty((total_rows, x.shape[1]), dtype=x.dtype)
        call_deadline = time.monotonic() + self.settings.call_deadline_ms / 1000
        attempt_s = self.settings.request_timeout_ms / 1000
        pending: list[_Item] = list(items)
        inflight: dict[str, _InFlight] = {}
        waiting_since: float | None = None
        load: Counter[str] = Counter()
        while pending or inflight:
            now = time.monotonic()
            if pending:
                unplaced = self._dispatch(x, pending, inflight, load, min(now + attempt_s, call_deadline), call_deadline)
                if unplaced and not inflight:
                    self._raise_if_hopeless(unplaced, now, call_deadline)
                    if waiting_since is None:
                        waiting_since = now
                        log.warning("client %s: no ready replica for %d function(s); waiting", self.model, len(unplaced))
                    for it in unplaced:
                        it.tried.clear()  # a replica that failed earlier may be back
                    self.routing.request_refresh()
                    self._stop.wait(min(0.05, max(0.0, call_deadline - now)))
                    self.routing.refresh()
                pending = unplaced
                if not inflight:
                    continue
            self._collect(y, inflight, pending, load)
            now = time.monotonic()
            live = self.routing.live_epochs()
            for rid, fl in list(inflight.items()):
                gone = live.get(fl.wid) != fl.epoch
                if now >= fl.deadline_s or gone:
                    reason = ("lease lost" if fl.wid not in live else "a new incarnation replaced it") if gone \
                        else f"no reply within {attempt_s * 1000:.0f} ms"
                    self._fail(rid, inflight, pending, load, reason)
            if (pending or inflight) and now >= call_deadline and not inflight:
                if pending:
                    raise NoReplicaAvailable(sorted({i.fid for i in pending}), "call deadline passed")
        return y

    def _raise_if_hopeless(self, unplaced: list[_Item], now: float, call_deadline: float) -> None:
        """Fail fast when nothing can serve (issue 14).

        A function with *no* live replica in the routing table fails the call once it
        has had none for ``no_replica_grace_ms`` — measured per outage, not per call,
        so concurrent and queued calls do not each wait out a deadline behind one
        another. Functions whose replicas exist but failed keep being retried until the
        call deadline.

        Raises:
            NoReplicaAvailable: the grace or the call deadline has passed.
        """
        if now >= call_deadline:
            raise NoReplicaAvailable(sorted({i.fid for i in unplaced}), f"waited {self.settings.call_deadline_ms} ms")
        grace_s = self.settings.no_replica_grace_ms / 1000
        missing, since = self.routing.without_replica_since({it.fid for it in unplaced}, now)
        if since is not None and now - since >= grace_s:
            raise NoReplicaAvailable(missing, f"no live replica for {(now - since) * 1000:.0f} ms")

    def _dispatch(
        self, x: torch.Tensor, pending: list[_Item], inflight: dict[str, _InFlight],
        load: Counter[str], attempt_deadline_s: float, call_deadline_s: float,
    ) -> list[_Item]:
        """Place pending items on replicas and send one request per worker. Returns the unplaced."""
        by_worker: dict[str, list[_Item]] = {}
        workers: dict[str, WorkerRecord] = {}
        unplaced: list[_Item] = []
        table = self.routing.table()
        for it in pending:
            reps = table.get(it.fid, [])
            base = {w.id: load[w.id] + w.queue_tokens for w in reps}
            ids = [w.id for w in reps]
            now = time.monotonic()
            healthy = [w for w in ids if not self.suspects.suspect(w, now)]
            wid = choose_replica(healthy, base, self._rng, it.tried) or choose_replica(ids, base, self._rng, it.tried)
            if wid is None:
                unplaced.append(it)
                continue
            load[wid] += it.rows.numel()
            by_worker.setdefault(wid, []).append(it)
            workers[wid] = next(w for w in reps if w.id == wid)
        for wid, its in by_worker.items():
            try:
                self._send(x, workers[wid], its, inflight, attempt_deadline_s, call_deadline_s)
            except (zmq.ZMQError, EaaSError) as e:
                log.warning("client %s: sending to worker %s failed: %s", self.model, wid, e)
                self._conns.drop(wid)
                self.suspects.mark(wid)
                for it in its:
                    it.tried.add(wid)
                    load[wid] -= it.rows.numel()
                unplaced.extend(its)
        return unplaced

    def _send(
        self, x: torch.Tensor, worker: WorkerRecord, its: list[_Item], inflight: dict[str, _InFlight],
        attempt_deadline_s: float, call_deadline_s: float,
    ) -> None:
        c = self._conns.connect(worker)
        n = sum(it.rows.numel() for it in its)
        slot = c.channel.alloc(n, x.shape[1], x.dtype)
        idx = its[0].rows if len(its) == 1 else torch.cat([it.rows for it in its])
        torch.index_select(x, 0, idx, out=slot.x)
        rid = f"{self._id_prefix}{next(self._ids)}"
        deadline_ms = now_ms() + int(max(0.0, call_deadline_s - time.monotonic()) * 1000)
        frames = c.channel.invoke_frames(slot, rid, [(it.fid, it.rows.numel()) for it in its], deadline_ms)
        if not c.sock.poll(CONNECT_TIMEOUT_MS, zmq.POLLOUT):
            c.channel.release(slot)
            raise TransportError(f"worker {worker.id} at {worker.endpoint} is not reachable")
        send_frames(c.sock, frames, zmq.NOBLOCK)
        inflight[rid] = _InFlight(worker.id, slot, its, attempt_deadline_s, worker.epoch)
        self.stats.requests += 1
        self.stats.rows += n
        if self.metrics is not None:
            self.metrics.record_expert_call(len(its), self.model)

    def _collect(self, y: torch.Tensor, inflight: dict[str, _InFlight], pending: list[_Item], load: Counter[str]) -> None:
        """Wait (until the earliest attempt deadline, in short polls) for replies and disconnects."""
        poller = zmq.Poller()
        conns = {fl.wid: self._conns[fl.wid] for fl in inflight.values() if fl.wid in self._conns}
        for c in conns.values():
            poller.register(c.sock, zmq.POLLIN)
            poller.register(c.monitor, zmq.POLLIN)
        earliest = min(fl.deadline_s for fl in inflight.values())
        timeout_ms = max(0, min(50, int((earliest - time.monotonic()) * 1000) + 1))
        events = dict(poller.poll(timeout_ms))
        for wid, c in conns.items():
            if c.monitor in events:
                self._on_monitor(wid, c, inflight, pending, load)
            if c.sock in events:
                self._on_replies(wid, c, y, inflight, pending, load)

    def _on_monitor(self, wid: str, c: Conn, inflight: dict[str, _InFlight], pending: list[_Item], load: Counter[str]) -> None:
        disconnected = False
        while True:
            try:
                msg = c.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            event = int.from_bytes(msg[0][:2], "little")
            if event & (zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED):
                disconnected = True
        if disconnected:
            for rid in [r for r, fl in inflight.items() if fl.wid == wid]:
                self._fail(rid, inflight, pending, load, "connection dropped")
            self._conns.drop(wid)

    def _on_replies(self, wid: str, c: Conn, y: torch.Tensor, inflight: dict[str, _InFlight], pending: list[_Item], load: Counter[str]) -> None:
        while True:
            try:
                frames = recv_frames(c.sock, zmq.NOBLOCK, 1)  # header as bytes, payload as frames
            except zmq.Again:
                return
            except zmq.ZMQError:
                return
            try:
                h = decode_header(frames[0], max_message_bytes=self.settings.max_message_bytes, check_deadline=False)
            except ProtocolError as e:
                log.warning("client %s: malformed reply from %s: %s", self.model, wid, e)
                continue
            fl = inflight.get(str(h.id)) if h.id is not None else None
            if fl is None or fl.wid != wid:
                self.stats.late_replies += 1
                c.channel.reply_dropped(h)  # a late duplicate (its request was re-sent): drop it
                continue
            rid = str(h.id)
            if h.kind == "error":
                self.stats.errors[h.code or "error"] += 1
                if (h.code or "") in RETRYABLE_CODES:
                    c.channel.release(fl.slot)
                    inflight.pop(rid)
                    self._requeue(fl, pending, load, f"error {h.code}: {h.error}")
                    continue
                c.channel.release(fl.slot)
                inflight.pop(rid)
                raise RemoteError(f"worker {wid} rejected request {rid}: {h.error}", h.code or "remote_error")
            try:
                out = c.channel.decode_reply(fl.slot, h, frames[1:])
            except ProtocolError as e:
                c.channel.release(fl.slot)
                inflight.pop(rid)
                self._requeue(fl, pending, load, f"bad reply: {e}")
                continue
            row = 0
            for it in fl.items:
                n = it.rows.numel()
                y[it.out_row : it.out_row + n].copy_(out[row : row + n])
                row += n
                load[wid] -= n
            c.channel.release(fl.slot)
            inflight.pop(rid)
            self.suspects.clear(wid)  # a good reply

    def _requeue(self, fl: _InFlight, pending: list[_Item], load: Counter[str], reason: str) -> None:
        self.stats.failovers += 1
        if self.metrics is not None:
            self.metrics.record_failover(len(fl.items), self.model)
        self.suspects.mark(fl.wid)
        log.warning("client %s: failing over %d function(s) from worker %s: %s", self.model, len(fl.items), fl.wid, reason)
        for it in fl.items:
            it.tried.add(fl.wid)
            load[fl.wid] -= it.rows.numel()
            pending.append(it)

    def _fail(self, rid: str, inflight: dict[str, _InFlight], pending: list[_Item], load: Counter[str], reason: str) -> None:
        fl = inflight.pop(rid)
        c = self._conns.get(fl.wid)
        if c is not None:
            try:
                c.channel.abandon(fl.slot)
            except Exception:  # noqa: BLE001 - the channel may be gone already
                pass
        self._requeue(fl, pending, load, reason)

    def close(self) -> None:
        """Stop the routing thread and close every connection (frees shared arenas)."""
        self._stop.set()
        self.routing.close()
        self._conns.close()

    def __enter__(self) -> "ExpertClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
