"""One layer call in flight: dispatch to replicas, wait for replies, fail over.

:class:`LayerCall` holds a call's state — the rows each function still needs
(``pending``), the requests sent and not answered (``inflight``), this call's load
per worker — and runs it to the end (:meth:`LayerCall.run`). The long-lived parts it
uses belong to the :class:`~eaas.platform.client.ExpertClient` that made it: the
routing view, the connections, the suspects, the waiter and the counters (its lane,
:mod:`eaas.platform.callstate`). Waiting for and taking the replies is
:class:`~eaas.platform.intake.ReplyIntake`'s part; what each reply means is this module's.

Per request the data path is: rows gathered straight into the pair's slot (a plain copy
when the call has one token: every row is that token); the invoke posted on the pair's
shared-memory ring when it has one (the same-host fast path,
:mod:`eaas.platform.transport.ring`), else sent over ZeroMQ; the reply taken from either.

Where the reply's rows go depends on the call's size. A one-token call (a lone decode
stream) keeps them where they landed — the slot stays held — until the call ends, when
the caller reads them (one row per expert: :meth:`LayerCall.run_rows`, combined unjoined;
otherwise joined into ``y``, one ``torch.cat`` or the lone reply itself) and then
releases the slots (:meth:`LayerCall.release`): measured on a T=1 call at
D=256 (2 workers, 2 vCPUs), copying each reply into a ``y`` buffer and gathering with
``index_select`` cost a tensor allocation and four small ops, 7% and 7% of the client's
samples. A larger call copies each reply into ``y`` as it arrives and frees its slot at
once: those copies are real work, done while later replies are still being computed
rather than after the last one.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import zmq

from eaas.errors import (
    EaaSError,
    NoReplicaAvailable,
    ProtocolError,
    RemoteError,
    TransportError,
)
from eaas.platform.callstate import CallEnv, InFlight, Item
from eaas.platform.connections import CONNECT_TIMEOUT_MS, Conn
from eaas.platform.decode import decode_header
from eaas.platform.dispatch import choose_replica, layer_key
from eaas.platform.intake import ReplyIntake
from eaas.platform.protocol import (
    PAIR_RESET_CODES,
    RETRYABLE_CODES,
    now_ms,
    send_frames,
)

log = logging.getLogger(__name__)

#: placement rounds per dispatch when sends fail (each failed worker is tried once per item)
SEND_ROUNDS = 4


class LayerCall(ReplyIntake):
    """Runs one call: ``y[total_rows, D]`` where the rows of ``item`` are ``f_item(x[item.rows])``.

    Args:
        env: the client's routing, connections, counters.
        x: ``[T, D]`` source rows (contiguous; CPU, or CUDA).
        items: the functions to compute and their rows.
        total_rows: rows of ``y`` (the sum of the items' rows).

    Use: ``y = call.run()``, read ``y``, then ``call.release()`` (always, also after an
    error: the answered slots are held until then).
    """

    def __init__(self, env: CallEnv, x: torch.Tensor, items: list[Item], total_rows: int) -> None:
        self.c = env
        self.x = x
        self.device = str(x.device)
        self.pending: list[Item] = list(items)
        self.inflight: dict[str, InFlight] = {}
        self.load: dict[str, int] = {}  # rows in flight per worker (this call)
        self.total_rows = total_rows
        self.in_place = x.shape[0] == 1  # a one-token call reads its replies in their slots
        self.y: torch.Tensor | None = None  # a larger call's buffer, filled as replies arrive
        self.parts: list[tuple[int, torch.Tensor]] = []  # (first row in y, rows of y): answered items
        self.held: list[tuple[Any, Any]] = []  # (channel, slot) of the answered requests, until release()

    def release(self) -> None:
        """Give back the slots of the answered requests (``y`` from :meth:`run` may be a view of one)."""
        held, self.held = self.held, []
        for channel, slot in held:
            channel.release(slot)

    def run(self) -> torch.Tensor:
        """Dispatch, wait, fail over until every item is computed; returns ``y[total_rows, D]``.

        ``y`` may be a view of a reply's slot: valid until :meth:`release`.

        Raises:
            NoReplicaAvailable: some function had no replica until the grace or the deadline.
            RemoteError: a worker refused a request for a non-retryable reason.
        """
        self.complete()
        return self._join()

    def run_rows(self) -> list[torch.Tensor] | None:
        """Like :meth:`run`, but a one-token call whose every reply is one row on ``x``'s device
        returns those rows, ``[1, D]`` each in ``y``'s order, unjoined (views of their slots, valid
        until :meth:`release`): :func:`~eaas.platform.dispatch.combine_rows` reads them without a
        ``torch.cat``. Any other call returns None; :meth:`output` then gives ``y``.

        Raises:
            NoReplicaAvailable, RemoteError: as :meth:`run`.
        """
        self.complete()
        parts = self.parts
        if self.y is not None or len(parts) != self.total_rows:  # not in place, or an item of several rows
            return None
        parts.sort(key=lambda p: p[0])
        rows = [p for _, p in parts]
        return rows if rows[0].device == self.x.device else None

    def output(self) -> torch.Tensor:
        """``y[total_rows, D]`` of a completed call (after :meth:`run_rows` returned None)."""
        return self._join()

    def complete(self) -> None:
        """Dispatch, wait and fail over until every item is computed (the rows: :meth:`output`).

        Raises:
            NoReplicaAvailable, RemoteError: as :meth:`run`.
        """
        c = self.c
        settings = c.settings
        call_deadline = time.monotonic() + settings.call_deadline_ms / 1000
        attempt_s = settings.request_timeout_ms / 1000
        waiting_since: float | None = None
        while self.pending or self.inflight:
            now = time.monotonic()
            if self.pending:
                unplaced = self._dispatch(min(now + attempt_s, call_deadline), call_deadline)
                if unplaced and not self.inflight:
                    self._raise_if_hopeless(unplaced, now, call_deadline)
                    if waiting_since is None:
                        waiting_since = now
                        log.warning("client %s: no ready replica for %d function(s); waiting", c.model, len(unplaced))
                    for it in unplaced:
                        it.tried.clear()  # a replica that failed earlier may be back
                    c.routing.request_refresh()
                    c.stop.wait(min(0.05, max(0.0, call_deadline - now)))
                    try:
                        c.routing.refresh()
                    except EaaSError as e:  # Redis unreachable: retry on the table held until the deadline
                        log.debug("client %s: routing refresh failed while waiting: %s", c.model, e)
                self.pending = unplaced
                if not self.inflight:
                    continue
            self._collect()
            if not self.inflight:
                continue
            now = time.monotonic()
            live = c.routing.live_epochs()
            for rid, fl in list(self.inflight.items()):
                gone = live.get(fl.wid) != fl.epoch
                if now >= fl.deadline_s or gone:
                    reason = ("lease lost" if fl.wid not in live else "a new incarnation replaced it") if gone \
                        else f"no reply within {attempt_s * 1000:.0f} ms"
                    self._fail(rid, reason)
            if self.pending and not self.inflight and now >= call_deadline:
                raise NoReplicaAvailable(sorted({i.fid for i in self.pending}), "call deadline passed")

    def _join(self) -> torch.Tensor:
        """``y``: the buffer, or the answered rows in order — the lone reply itself, or one ``torch.cat``."""
        if self.y is not None:
            return self.y
        parts = self.parts
        if len(parts) == 1:
            y = parts[0][1]
        else:
            parts.sort(key=lambda p: p[0])
            y = torch.cat([p for _, p in parts])
        if y.device != self.x.device:  # a host transport for device rows: one copy over
            y = y.to(self.x.device)
        return y

    def _raise_if_hopeless(self, unplaced: list[Item], now: float, call_deadline: float) -> None:
        """Fail fast when nothing can serve (issue 14).

        A function with *no* live replica in the routing table fails the call once it
        has had none for ``no_replica_grace_ms`` — measured per outage, not per call,
        so concurrent and queued calls do not each wait out a deadline behind one
        another. Functions whose replicas exist but failed keep being retried until the
        call deadline.

        Raises:
            NoReplicaAvailable: the grace or the call deadline has passed.
        """
        settings = self.c.settings
        if now >= call_deadline:
            raise NoReplicaAvailable(sorted({i.fid for i in unplaced}), f"waited {settings.call_deadline_ms} ms")
        grace_s = settings.no_replica_grace_ms / 1000
        missing, since = self.c.routing.without_replica_since({it.fid for it in unplaced}, now)
        if since is not None and now - since >= grace_s:
            raise NoReplicaAvailable(missing, f"no live replica for {(now - since) * 1000:.0f} ms")

    # --- dispatch ----------------------------------------------------------------

    def _dispatch(self, attempt_deadline_s: float, call_deadline_s: float) -> list[Item]:
        """Place pending items on replicas and send one request per worker. Returns the unplaced.

        Items whose send failed (a worker that died: its connection cannot be opened) are
        placed again at once on a replica they have not tried, up to ``SEND_ROUNDS`` rounds,
        rather than waiting for the next pass of :meth:`complete`.
        """
        items = self.pending
        for _ in range(SEND_ROUNDS):
            items, send_failed = self._dispatch_once(items, attempt_deadline_s, call_deadline_s)
            if not send_failed or not items:
                break
        return items

    def _dispatch_once(self, items: list[Item], attempt_deadline_s: float,
                       call_deadline_s: float) -> tuple[list[Item], bool]:
        """One placement round: returns the unplaced items and whether a send failed."""
        c = self.c
        by_worker: dict[str, list[Item]] = {}
        workers: dict[str, Any] = {}
        unplaced: list[Item] = []
        send_failed = False
        table = c.routing.table()
        now = time.monotonic()
        for it in items:
            reps = table.get(it.fid, ())
            layer = layer_key(it.fid)
            if len(reps) == 1:  # the only replica (suspect or not), unless it already failed this item
                chosen = reps[0]
                wid = None if chosen.id in it.tried else chosen.id
            else:
                base = {w.id: self.load.get(w.id, 0) + w.queue_tokens + c.recent.get((w.id, layer), now)
                        for w in reps}
                ids = [w.id for w in reps]
                healthy = [w for w in ids if not c.suspects.suspect(w, now)]
                wid = choose_replica(healthy, base, c.rng, it.tried) or choose_replica(ids, base, c.rng, it.tried)
                chosen = next((w for w in reps if w.id == wid), None)
            if wid is None:
                unplaced.append(it)
                continue
            n = it.n
            self.load[wid] = self.load.get(wid, 0) + n
            c.recent.add((wid, layer), n, now)
            by_worker.setdefault(wid, []).append(it)
            workers[wid] = chosen
        bells = []
        try:
            for wid, its in by_worker.items():
                try:
                    ring = self._send(workers[wid], its, attempt_deadline_s, call_deadline_s)
                    if ring is not None:
                        bells.append(ring)
                except (zmq.ZMQError, EaaSError) as e:
                    log.warning("client %s: sending to worker %s failed: %s", c.model, wid, e)
                    send_failed = True
                    c.conns.drop(wid)
                    c.suspects.mark(wid)
                    for it in its:
                        it.tried.add(wid)
                        self.load[wid] -= it.n
                    unplaced.extend(its)
        finally:
            for ring in bells:  # every request posted first: a doorbell (a syscall, ~20-60 µs) delays no other post
                ring.notify()
        return unplaced, send_failed

    def _send(self, worker: Any, its: list[Item], attempt_deadline_s: float, call_deadline_s: float) -> Any:
        """Post one request to ``worker``; returns the ring whose doorbell is still to be rung (None when
        the request went over ZeroMQ)."""
        c = self.c
        conn = c.conns.connect(worker, self.device)
        ch = conn.channel
        x = self.x
        n = its[0].n if len(its) == 1 else sum(it.n for it in its)
        slot = ch.alloc(n, x.shape[1], x.dtype)
        if x.shape[0] == 1:  # one token: every row is row 0 (a decode step) — a copy, no index op
            slot.x.copy_(x if n == 1 else x.expand(n, -1))
        else:
            idx = its[0].rows if len(its) == 1 else torch.cat([it.rows for it in its])
            if slot.x.device == x.device:
                torch.index_select(x, 0, idx if idx.device == x.device else idx.to(x.device), out=slot.x)
            else:  # a host transport for device rows (no cuda_ipc between these two): one copy over
                slot.x.copy_(x.index_select(0, idx.to(x.device)))
        rid = c.next_request_id()
        deadline_ms = now_ms() + int(max(0.0, call_deadline_s - time.monotonic()) * 1000)
        frames = ch.invoke_frames(slot, rid, [(it.fid, it.n) for it in its], deadline_ms)
        ring = conn.ring
        if ring is None or len(frames) != 1 or not ring.post(frames[0]):
            ring = None
            if not conn.sock.poll(CONNECT_TIMEOUT_MS, zmq.POLLOUT):
                ch.release(slot)
                raise TransportError(f"worker {worker.id} at {worker.endpoint} is not reachable")
            send_frames(conn.sock, frames, zmq.NOBLOCK)
        self.inflight[rid] = InFlight(worker.id, slot, its, attempt_deadline_s, worker.epoch)
        c.stats.requests += 1
        c.stats.rows += n
        if c.metrics is not None:
            c.metrics.record_expert_call(len(its), c.model)
        return ring

    # --- replies (taken by ReplyIntake._collect) --------------------------------------

    def _disconnected(self, wid: str, reason: str) -> None:
        for rid in [r for r, fl in self.inflight.items() if fl.wid == wid]:
            self._fail(rid, reason)
        self.c.conns.drop(wid)

    def _on_reply(self, wid: str, cn: Conn, frames: list[Any]) -> None:
        c = self.c
        try:
            h = decode_header(frames[0], max_message_bytes=c.settings.max_message_bytes, check_deadline=False)
        except ProtocolError as e:
            log.warning("client %s: malformed reply from %s: %s", c.model, wid, e)
            return
        fl = self.inflight.get(str(h.id)) if h.id is not None else None
        if fl is None or fl.wid != wid:
            c.stats.late_replies += 1
            cn.channel.reply_dropped(h)  # a late duplicate (its request was re-sent): drop it
            return
        rid = str(h.id)
        if h.kind == "error":
            c.stats.errors[h.code or "error"] += 1
            cn.channel.release(fl.slot)
            self.inflight.pop(rid)
            if (h.code or "") in RETRYABLE_CODES:
                self._requeue(fl, f"error {h.code}: {h.error}")
                if h.code in PAIR_RESET_CODES:  # the worker forgot this pair: a new connection (and hello) next time
                    self._disconnected(wid, f"worker dropped the pair's transport state ({h.code})")
                return
            raise RemoteError(f"worker {wid} rejected request {rid}: {h.error}", h.code or "remote_error")
        try:
            out = cn.channel.decode_reply(fl.slot, h, frames[1:])
        except ProtocolError as e:
            cn.channel.release(fl.slot)
            self.inflight.pop(rid)
            self._requeue(fl, f"bad reply: {e}")
            return
        except TransportError as e:  # the pair's data path broke (NIXL): fail over, reconnect next time
            self._fail(rid, f"reply data lost: {e}")
            self._disconnected(wid, "the pair's data path failed")
            return
        # A one-token call keeps the rows in the slot until release() (joined into y once); a larger
        # one copies them into y now, while other replies are still being computed.
        y = self.y
        if y is None and not self.in_place:
            y = self.y = torch.empty((self.total_rows, self.x.shape[1]), dtype=self.x.dtype, device=self.x.device)
        whole, row = len(fl.items) == 1, 0
        for it in fl.items:
            rows = out if whole else out[row : row + it.n]
            if y is None:
                self.parts.append((it.out_row, rows))
            else:
                y[it.out_row : it.out_row + it.n].copy_(rows)
            row += it.n
            self.load[wid] -= it.n
        if y is None:
            self.held.append((cn.channel, fl.slot))
        else:
            cn.channel.release(fl.slot)
        self.inflight.pop(rid)
        c.suspects.clear(wid)  # a good reply

    # --- failover ------------------------------------------------------------------

    def _requeue(self, fl: InFlight, reason: str) -> None:
        c = self.c
        c.stats.failovers += 1
        if c.metrics is not None:
            c.metrics.record_failover(len(fl.items), c.model)
        c.suspects.mark(fl.wid)
        log.warning("client %s: failing over %d function(s) from worker %s: %s", c.model, len(fl.items), fl.wid, reason)
        for it in fl.items:
            it.tried.add(fl.wid)
            self.load[fl.wid] -= it.n
            self.pending.append(it)

    def _fail(self, rid: str, reason: str) -> None:
        fl = self.inflight.pop(rid)
        cn = self.c.conns.get(fl.wid)
        if cn is not None:
            try:
                cn.channel.abandon(fl.slot)
            except Exception:  # noqa: BLE001 - the channel may be gone already
                pass
        self._requeue(fl, reason)
