"""The expert worker: a warm, stateless server of one shard's expert functions.

Life (DESIGN.md, "Worker"): load the shard (before registering: warm pool) ->
bind a ZeroMQ ROUTER socket (loopback unless told otherwise) -> run every hosted
function once (warm-up) -> register under a lease -> serve -> on SIGTERM or an
admin ``drain``: state ``draining`` (announced at once), finish everything queued,
deregister, exit 0. The lease is renewed by a keeper *process*
(:mod:`eaas.platform.lease`) that reads queue depth, tokens served and busy time
from a shared page, so no computation, however long it holds the GIL, can starve
it; every registration is a new incarnation (epoch). ``kill -9`` leaves a lease
that expires within its TTL (the keeper dies with the worker).

Serving loop (continuous batching across clients): take every message waiting
on the pairs' rings and the socket (:class:`~eaas.platform.mailroom.Mailroom`),
answer control messages and bad input at once (a bad message
never kills the worker), then run the waiting invokes together, up to
``max_batch_tokens`` rows: rows of all requests are grouped by expert and each
expert runs once (:meth:`eaas.functions.ExpertShard.forward`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import torch
import zmq

from eaas.errors import EaaSError, ExpertComputeError, ProtocolError, RegistryError
from eaas.platform.curve import load_keys, require_keys_beyond_loopback, serve_curve, worker_bind_address
from eaas.platform.lease import LeaseBoard, start_keeper
from eaas.platform.mailroom import Mailroom
from eaas.platform.outbox import ReplyOutbox
from eaas.platform.protocol import Header, now_ms
from eaas.platform.replicas import ExtraReplicas
from eaas.platform.transport.select import WorkerEndpoint
from eaas.platform.waiter import Waiter
from eaas.registry.records import WorkerRecord, WorkerState
from eaas.registry.store import Registry
from eaas.settings import Settings

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Pending:
    peer: bytes
    header: Header
    x: torch.Tensor
    received_s: float
    ring: Any = None  # the fast-path ring it came through (its reply goes back there)


def default_worker_id() -> str:
    """``{hostname}-{pid}-{random}``, or the pod name on Kubernetes (``POD_NAME``)."""
    pod = os.environ.get("POD_NAME")
    if pod:
        return pod
    host = socket.gethostname().split(".")[0][:40] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


class ExpertWorker:
    """Serve one shard of one model.

    Args:
        settings: the settings object (lease TTL, heartbeat period, limits, bind address).
        registry: the deployment's registry.
        model: registered model name.
        shard: the loaded :class:`~eaas.functions.ExpertShard`.
        worker_id: id in the registry (default :func:`default_worker_id`).
        shard_name: shard group name (for the autoscaler).
        bind: ZeroMQ address to bind, e.g. ``tcp://127.0.0.1:0`` (0 = a free port).
        advertise_host: host put in the advertised endpoint (default: the bound one).
        transports: transports to offer (default: every one available here).
        reload: ``pairs -> ExpertShard`` from the worker's checkpoint; when given, the worker
            follows the extra replicas the autoscaler asks of it (:class:`ExtraReplicas`).

    Raises:
        RegistryError: registration refused (e.g. the model was removed).
    """

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        model: str,
        shard: Any,
        *,
        worker_id: str | None = None,
        shard_name: str = "",
        bind: str | None = None,
        advertise_host: str | None = None,
        transports: list[str] | None = None,
        reload: Callable[[list[tuple[int, int]]], Any] | None = None,
    ) -> None:
        from eaas.functions.spec import function_id

        self.settings = settings
        self.registry = registry
        self.model = model
        self.shard = shard
        self.id = worker_id or default_worker_id()
        self.shard_name = shard_name
        self._fid_to_pair = {function_id(model, l, e): (l, e) for l, e in shard.functions}
        self._reload = reload
        self.extras: ExtraReplicas | None = None
        self.endpoint_io = WorkerEndpoint(
            max_message_bytes=settings.max_message_bytes,
            max_arena_bytes=max(settings.shm_arena_bytes, settings.max_message_bytes),
            known_functions=self._fid_to_pair,
            offered=transports,
            device=str(shard.device),
            ring=settings.shm_ring,
            xfer_timeout_s=settings.request_timeout_ms / 1000,
        )
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 1000)
        self.outbox = ReplyOutbox(self._sock, self.id, send_timeout_ms=settings.reply_send_timeout_ms)
        self.mailroom = Mailroom(self._sock, self.endpoint_io, self.outbox,
                                 Waiter(settings.spin_floor_us / 1e6, settings.spin_cap_us / 1e6), self.id,
                                 self._queue_invoke)
        addr = worker_bind_address(bind, settings.bind_host)
        keys = load_keys(settings.curve_keys_dir) if settings.curve_keys_dir else None
        require_keys_beyond_loopback(addr, keys)
        if keys is not None:
            serve_curve(self._sock, keys)  # before bind: every connection then needs the handshake
        self.curve = keys is not None
        if addr.startswith("tcp://") and addr.endswith(":0"):
            port = self._sock.bind_to_random_port(addr[: -len(":0")])
            bound = f"{addr[: -len(':0')]}:{port}"
        else:
            self._sock.bind(addr)
            bound = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        adv = advertise_host or settings.advertise_host
        if adv and bound.startswith("tcp://"):
            bound = f"tcp://{adv}:{bound.rsplit(':', 1)[1]}"
        self.endpoint = bound
        self._draining = threading.Event()
        self.drain_started_s: float | None = None
        self.received_after_drain = 0  # invokes that arrived more than 100 ms after the drain was announced
        self._board: LeaseBoard | None = None
        self._keeper: Any = None
        self.warmup_ms: float | None = None
        self._pending: list[_Pending] = []
        self._lock = threading.Lock()
        # counters (read by the heartbeat thread)
        self.tokens_served = 0
        self.requests_served = 0
        self.batches = 0
        self.cross_client_batches = 0
        self.loop_errors = 0  # serving-loop iterations that raised (logged; the loop goes on)
        self.function_tokens: Counter[str] = Counter()
        self._busy_s = 0.0
        self.started_at_s = time.time()

    # --- registry ------------------------------------------------------------

    def record(self, state: WorkerState) -> WorkerRecord:
        """This worker's registry record in ``state``."""
        return WorkerRecord(
            id=self.id, model=self.model, endpoint=self.endpoint, shard=tuple(sorted(self._fid_to_pair)),
            state=state, host_id=str(self.endpoint_io.capabilities.get("host_id", "")),
            device=str(self.shard.device), capabilities=dict(self.endpoint_io.capabilities),
            pid=os.getpid(), shard_name=self.shard_name, started_at_s=self.started_at_s,
            heartbeat_at_s=time.time(), lease_ttl_s=self.settings.lease_ttl_s, warmup_ms=self.warmup_ms or 0.0,
        )  # fmt: skip

    def queue_depth(self) -> tuple[int, int]:
        """(rows, requests) waiting for a batch."""
        with self._lock:
            return sum(p.x.shape[0] for p in self._pending), len(self._pending)

    def _publish(self) -> None:
        """Write the counters to the lease board (the keeper reports them at its next beat)."""
        q_tokens, q_reqs = self.queue_depth()
        self._board.publish(
            queue_tokens=q_tokens, queue_requests=q_reqs, tokens_served=self.tokens_served,
            requests_served=self.requests_served, batches=self.batches,
            cross_client_batches=self.cross_client_batches, replies_dropped=self.outbox.dropped,
            busy_s=self._busy_s, function_tokens=dict(self.function_tokens),
        )  # fmt: skip

    def _start_keeper(self, timeout_s: float) -> None:
        """Start the lease keeper and wait until it has registered this worker (epoch > 0).

        Raises:
            RegistryError: the keeper exited or did not register within ``timeout_s``.
        """
        rec = self.record(WorkerState.READY)
        before = self._board.epoch
        self._keeper = start_keeper(self._board, json.dumps({"hash": rec.to_hash(), "shard": list(rec.shard)}))
        deadline = time.monotonic() + timeout_s
        while self._board.epoch == before:
            if self._keeper.poll() is not None:
                raise RegistryError(f"worker {self.id}: its lease keeper exited ({self._keeper.returncode})"
                                    " before registering it; see the log above")
            if time.monotonic() > deadline:
                raise RegistryError(f"worker {self.id}: not registered within {timeout_s:g} s")
            time.sleep(0.01)

    @property
    def epoch(self) -> int:
        """This worker's current incarnation (registry epoch; 0 before it registered)."""
        return self._board.epoch if self._board is not None else 0

    def _watch_lease(self) -> None:
        """Once per loop: an operator's drain, a dead keeper (restarted: a new incarnation)."""
        board = self._board
        if board.admin_drain and not self._draining.is_set():
            log.info("worker %s: drain requested through the registry", self.id)
            self._draining.set()
        if self.drain_started_s is None and board.drain_announced_s:
            self.drain_started_s = board.drain_announced_s
        if self._keeper is not None and self._keeper.poll() is not None and not self._draining.is_set():
            log.warning("worker %s: lease keeper exited (%s); starting a new one", self.id, self._keeper.returncode)
            try:
                self._start_keeper(self.settings.startup_timeout_s)
            except EaaSError as e:
                log.error("worker %s: %s", self.id, e)

    # --- serving ---------------------------------------------------------------

    def request_drain(self, *_: Any) -> None:
        """Begin draining (signal-handler safe): the lease keeper announces it at once, so
        clients stop sending new work while the current batch still runs."""
        self._draining.set()
        if self._board is not None:
            self._board.request_drain()

    def _queue_invoke(self, peer: bytes, header: Header, x: torch.Tensor, ring: Any) -> None:
        """A valid invoke arrived (the mailroom's handler): queue it for the next batch."""
        now = time.monotonic()
        if self.drain_started_s is not None and now - self.drain_started_s > 0.1:
            self.received_after_drain += 1
        with self._lock:
            self._pending.append(_Pending(peer, header, x, now, ring))

    def _take_batch(self) -> list[_Pending]:
        """Pop waiting invokes up to ``max_batch_tokens`` rows (at least one request)."""
        cap = self.settings.max_batch_tokens
        with self._lock:
            batch, rows = [], 0
            while self._pending and (not batch or rows + self._pending[0].x.shape[0] <= cap):
                p = self._pending.pop(0)
                batch.append(p)
                rows += p.x.shape[0]
        return batch

    def _hosts_all(self, segments: tuple[tuple[str, int], ...]) -> bool:
        hosted = self._fid_to_pair
        for f, _ in segments:
            if f not in hosted:
                return False
        return True

    def _run_batch(self, batch: list[_Pending]) -> None:
        now = now_ms()
        live: list[_Pending] = []
        for p in batch:
            if p.header.deadline_ms is not None and p.header.deadline_ms < now:
                self._reply_error(p, ProtocolError(f"request {p.header.id!r} expired in the queue", "deadline_exceeded"))
            elif not self._hosts_all(p.header.segments):  # an extra replica removed meanwhile
                self._reply_error(p, ProtocolError(f"request {p.header.id!r} names a function no longer hosted here",
                                                   "unknown_function"))
            else:
                live.append(p)
        if not live:
            return
        segments = [(self._fid_to_pair[f], r) for p in live for f, r in p.header.segments]
        t0 = time.monotonic()
        try:
            x = live[0].x if len(live) == 1 else torch.cat([p.x for p in live])
            y = self.shard.forward(x, segments)  # runs in inference mode
        except Exception as e:  # noqa: BLE001 - a failed batch answers errors, the worker lives
            log.exception("worker %s: batch of %d requests failed", self.id, len(live))
            for p in live:
                self._reply_error(p, ExpertComputeError(f"expert computation failed: {e}"))
            return
        finally:
            self._busy_s += time.monotonic() - t0
        self.batches += 1
        if len(live) > 1 and len({p.peer for p in live}) > 1:
            self.cross_client_batches += 1
        row = 0
        for p in live:
            n = p.x.shape[0]
            self._reply(p, y if len(live) == 1 else y[row : row + n])
            row += n
            self.requests_served += 1
            self.tokens_served += n
            for f, r in p.header.segments:
                self.function_tokens[f] += r

    def _reply(self, p: _Pending, y: torch.Tensor) -> None:
        """Answer ``p`` with ``y[N, D]``; a reply that cannot be written is failed, never fatal.

        A transport can fail to move the reply's bytes to the client (a NIXL WRITE to a
        client whose process died or whose host was cut off: ``TransportError``). Then the
        reply is counted as dropped, the pair's transport state is forgotten (a broken
        endpoint would fail, slowly, every later reply to it) and the client is told, over
        ZeroMQ, with the retryable code ``transfer_failed``: it re-sends the rows elsewhere
        and says hello again before its next request here.
        """
        try:
            frames = self.endpoint_io.reply_frames(p.peer, p.header, y)
        except ProtocolError as e:
            self._reply_error(p, e)
            return
        except Exception as e:  # noqa: BLE001 - TransportError, or anything a transport raises: the worker lives
            self.outbox.count_lost()
            log.warning("worker %s: the reply to request %r could not be written to its client (%s: %s); dropping"
                        " the pair's %s state", self.id, p.header.id, type(e).__name__, e, p.header.transport)
            self.endpoint_io.drop_peer(p.peer)
            self._reply_error(p, ProtocolError(f"the reply's data could not be written to the client's arena ({e});"
                                               " say hello again and re-send", "transfer_failed"))
            return
        self.mailroom.send(p.peer, frames, p.header.id, p.ring)

    def _reply_error(self, p: _Pending, err: Exception) -> None:
        try:
            self.mailroom.send(p.peer, self.endpoint_io.error_reply(p.header.id, err), p.header.id, p.ring)
        except zmq.ZMQError as e:
            log.warning("worker %s: error reply to request %r failed: %s", self.id, p.header.id, e)

    def warm_up(self) -> float:
        """Run every hosted function once (one row each, one batch) before taking live traffic.

        The first forward of a module pays one-time costs (kernel selection, page
        faults on memory-mapped weights, allocator growth); a worker registers
        ``ready`` only after it, so no live call pays them. Returns the time taken in
        ms, which the worker's record carries as ``warmup_ms``.

        Raises:
            Exception: whatever the shard's forward raises (the worker does not register).
        """
        t0 = time.monotonic()
        pairs = sorted(self._fid_to_pair.values())
        x = torch.zeros(len(pairs), self.shard.hidden_size, dtype=self.shard.dtype, device=self.shard.device)
        with torch.inference_mode():
            self.shard.forward(x, [(pair, 1) for pair in pairs])
        self.warmup_ms = (time.monotonic() - t0) * 1000
        log.info("worker %s: warmed up %d functions in %.1f ms", self.id, len(pairs), self.warmup_ms)
        return self.warmup_ms

    def serve(self, install_signal_handlers: bool = True) -> int:
        """Register, serve until drained, deregister. Returns the exit code (0).

        Raises:
            RegistryError / RegistryUnavailable: the first registration failed.
        """
        if install_signal_handlers:
            signal.signal(signal.SIGTERM, self.request_drain)
            signal.signal(signal.SIGINT, self.request_drain)
        if self.warmup_ms is None:
            self.warm_up()
        self._board = LeaseBoard()
        self._board.tick()
        self._publish()
        try:
            self._start_keeper(self.settings.startup_timeout_s + 10)
        finally:
            self._board.unlink()  # a temp-file board (not Linux): both processes map it, the file can go
        log.info("worker %s: serving %d functions at %s (epoch %d)", self.id, len(self._fid_to_pair), self.endpoint,
                 self.epoch)
        if self._reload is not None:
            self.extras = ExtraReplicas(self.registry, self.id, self.model, list(self.shard.functions), self._reload,
                                        interval_s=self.settings.heartbeat_interval_s).start()
        try:
            with torch.inference_mode():  # the whole loop: no guard entered and left per batch
                self._serve_until_drained()
        finally:
            if self.extras is not None:
                self.extras.stop()
            self._stop_keeper()
            try:
                self.registry.deregister_worker(self.id)
            except EaaSError as e:
                log.warning("worker %s: deregistration failed (%s); its lease will expire", self.id, e)
            self.close()
        log.info("worker %s: drained (%d requests, %d tokens served; %d requests arrived more than 100 ms after"
                 " the drain was announced)", self.id, self.requests_served, self.tokens_served,
                 self.received_after_drain)
        return 0

    def _serve_until_drained(self) -> None:
        """Receive, batch, compute and reply until a drain has seen no traffic for a grace period."""
        idle_since: float | None = None
        grace_s = max(0.5, 2 * self.settings.heartbeat_interval_s)
        last_sweep = last_publish = time.monotonic()
        while True:
            self._board.tick()
            got, batch = False, []
            try:
                got = self.mailroom.receive(timeout_ms=0 if self._pending else 50)
                batch = self._take_batch()
                if batch:
                    self._run_batch(batch)
                if self.extras is not None and (offer := self.extras.take()) is not None:
                    self.shard, self._fid_to_pair = offer  # between batches: never half a shard
                    self.endpoint_io.known_functions = self._fid_to_pair
                if self.outbox.owed:
                    self.outbox.flush()
                now = time.monotonic()
                if now - last_publish >= 0.1:
                    self._publish()
                    self._watch_lease()
                    last_publish = now
                if now - last_sweep > 5.0:
                    self.endpoint_io.sweep()
                    last_sweep = now
            except Exception:  # noqa: BLE001 - one failed iteration never ends the serving loop
                self.loop_errors += 1
                log.exception("worker %s: serving-loop iteration failed (%d so far); serving on", self.id,
                              self.loop_errors)
            if not self._draining.is_set():
                continue
            if got or batch or self._pending:
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= grace_s:
                return

    def _stop_keeper(self) -> None:
        if self._board is not None:
            self._board.request_stop()
        if self._keeper is not None:
            try:
                self._keeper.wait(5)
            except Exception:  # noqa: BLE001 - a keeper that does not stop is killed
                self._keeper.kill()
                self._keeper.wait(5)

    def close(self) -> None:
        """Close the socket and release the mappings of peers that are gone."""
        self.endpoint_io.sweep()
        self._sock.close(linger=500)
