"""A worker's lease, kept by a process of its own so a long computation cannot starve it.

A heartbeat *thread* in the worker needs the GIL: one call that holds it for longer
than the lease TTL (a huge first batch, a stuck C extension that never releases it)
lets the lease expire although the worker is alive, and the worker then comes back as
if it were a new one while clients already re-sent its work (issue 14). So the lease
is renewed by a small *keeper* process (``python -m eaas.platform.lease``) that shares
one page of memory with the worker — a :class:`LeaseBoard`, an anonymous file (``memfd``)
mapped by both:

- the worker writes its counters there (queue depth, tokens and requests served,
  busy seconds, replies dropped, per-function tokens as JSON) and the time of its
  last serving-loop iteration; writing is a ``struct.pack_into`` on a mapping, so it
  costs microseconds and needs no system call;
- the keeper renews the lease every ``heartbeat_interval_s`` with those counters,
  announces a drain the moment the worker flags one, re-registers the worker as a new
  incarnation (new epoch) when the lease was lost, and writes back the epoch and an
  operator's drain request, which the worker reads in its loop.

A worker that makes no progress at all for ``worker_stall_s`` is not kept alive for
ever: the keeper stops renewing (the lease expires, clients route around it) and
registers it again as a new incarnation once its loop ticks again. The keeper dies
with the worker (``PR_SET_PDEATHSIG``), so ``kill -9`` still frees the lease within
its TTL.

Consistency: the counters block is written under a sequence lock (odd while being
written), read by the keeper with retries; every field is 8 bytes and aligned.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

# offset 0: seq (q) | 8: tick_s (d) | 16..64: queue_tokens, queue_requests, tokens_served, requests_served,
# batches, cross_client_batches, replies_dropped (7 q) | 72: busy_s (d) | 80: drain (q) | 88: stop (q)
# | 96: epoch (q) | 104: admin_drain (q) | 112: unused | 120: drain_announced_s (d)
# | 128: json length (q) | 136..: function_tokens JSON
_STATS = struct.Struct("<qd7qd")
_OFF_DRAIN, _OFF_STOP, _OFF_EPOCH, _OFF_ADMIN_DRAIN, _OFF_ANNOUNCED = 80, 88, 96, 104, 120
_OFF_JSON_LEN, _OFF_JSON = 128, 136
BOARD_BYTES = 64 << 10
_Q = struct.Struct("<q")
_D = struct.Struct("<d")


@dataclass(frozen=True, slots=True)
class BoardStats:
    """One consistent read of the worker's counters (see :class:`LeaseBoard`)."""

    tick_s: float
    queue_tokens: int
    queue_requests: int
    tokens_served: int
    requests_served: int
    batches: int
    cross_client_batches: int
    replies_dropped: int
    busy_s: float
    function_tokens: dict[str, int]


class LeaseBoard:
    """The page the worker and its lease keeper share (a mapped file of ``BOARD_BYTES``).

    On Linux the worker's board is an anonymous ``memfd_create(2)`` file: nothing on disk
    to leak when the worker is SIGKILLed, and the worker keeps the descriptor open to hand
    it to every keeper it starts (a keeper that died is replaced; it inherits the
    descriptor, ``pass_fds``). Elsewhere it is a file in the temp directory, removed by
    :meth:`unlink` once the first keeper mapped it.

    Args:
        path: an existing board file (the keeper's side, without ``fd``); ``None`` creates
            a board (the worker's side).
        fd: a board descriptor inherited from the worker (the keeper's side, Linux).
    """

    def __init__(self, path: str | None = None, *, fd: int | None = None) -> None:
        self.fd: int | None = None  # the worker's memfd, kept open for later keepers
        if fd is not None:
            self.path = None
        elif path is not None:
            fd = os.open(path, os.O_RDWR)
            self.path = path
        elif hasattr(os, "memfd_create"):
            fd = self.fd = os.memfd_create("eaas-lease")
            os.ftruncate(fd, BOARD_BYTES)
            self.path = None
        else:  # pragma: no cover - not Linux
            fd, self.path = tempfile.mkstemp(prefix="eaas-lease-")
            os.ftruncate(fd, BOARD_BYTES)
        try:
            self._mm = mmap.mmap(fd, BOARD_BYTES)
        finally:
            if fd != self.fd:
                os.close(fd)
        self._seq = _Q.unpack_from(self._mm, 0)[0]

    # --- worker side ------------------------------------------------------------

    def tick(self) -> None:
        """Mark one iteration of the serving loop (a monotonic timestamp; a few hundred ns)."""
        self.mark_now(8)

    def publish(self, *, queue_tokens: int, queue_requests: int, tokens_served: int, requests_served: int,
                batches: int, cross_client_batches: int, replies_dropped: int, busy_s: float,
                function_tokens: dict[str, int]) -> None:
        """Write the counters (under the sequence lock)."""
        blob = json.dumps(function_tokens, separators=(",", ":")).encode()
        if len(blob) > BOARD_BYTES - _OFF_JSON:
            blob = b"{}"  # far too many functions for the page: per-function tokens are dropped, not torn
        self._seq += 1
        _Q.pack_into(self._mm, 0, self._seq)  # odd: writing
        _STATS.pack_into(self._mm, 0, self._seq, time.monotonic(), queue_tokens, queue_requests, tokens_served,
                         requests_served, batches, cross_client_batches, replies_dropped, busy_s)
        _Q.pack_into(self._mm, _OFF_JSON_LEN, len(blob))
        self._mm[_OFF_JSON:_OFF_JSON + len(blob)] = blob
        self._seq += 1
        _Q.pack_into(self._mm, 0, self._seq)  # even: consistent

    def mark_now(self, offset: int) -> None:
        """Write the current monotonic time at ``offset`` (a time field of the board)."""
        _D.pack_into(self._mm, offset, time.monotonic())

    def set_flag(self, offset: int, value: int = 1) -> None:
        """Write an int64 field (a flag or the epoch) at ``offset``."""
        _Q.pack_into(self._mm, offset, value)

    def flag(self, offset: int) -> int:
        """Read the int64 field at ``offset``."""
        return int(_Q.unpack_from(self._mm, offset)[0])

    def request_drain(self) -> None:
        """The worker begins draining (signal-handler safe): the keeper announces it."""
        self.set_flag(_OFF_DRAIN)

    def request_stop(self) -> None:
        """The worker is done: the keeper exits at its next wake-up (<= 20 ms)."""
        self.set_flag(_OFF_STOP)

    @property
    def epoch(self) -> int:
        """The incarnation the keeper last registered."""
        return self.flag(_OFF_EPOCH)

    @property
    def admin_drain(self) -> bool:
        """An operator set this worker ``draining`` in the registry."""
        return bool(self.flag(_OFF_ADMIN_DRAIN))

    @property
    def drain_announced_s(self) -> float:
        """Monotonic time the keeper announced the drain (0: not yet)."""
        return float(_D.unpack_from(self._mm, _OFF_ANNOUNCED)[0])

    # --- keeper side --------------------------------------------------------------

    def read(self, retries: int = 1000) -> BoardStats:
        """A consistent copy of the counters (retries while the worker is mid-write)."""
        for _ in range(retries):
            s1 = _Q.unpack_from(self._mm, 0)[0]
            if s1 % 2:
                continue
            vals = _STATS.unpack_from(self._mm, 0)
            n = _Q.unpack_from(self._mm, _OFF_JSON_LEN)[0]
            blob = bytes(self._mm[_OFF_JSON:_OFF_JSON + max(0, min(n, BOARD_BYTES - _OFF_JSON))])
            if _Q.unpack_from(self._mm, 0)[0] != s1:
                continue
            try:
                ft = json.loads(blob) if blob else {}
            except ValueError:
                ft = {}
            return BoardStats(vals[1], *vals[2:9], vals[9], ft)
        raise RuntimeError("lease board: no consistent read")

    def last_tick_s(self) -> float:
        """Monotonic time of the serving loop's last iteration (see :meth:`tick`)."""
        return float(_D.unpack_from(self._mm, 8)[0])

    def close(self) -> None:
        """Unmap the board (and close the worker's descriptor)."""
        self._mm.close()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def unlink(self) -> None:
        """Remove the board's file, if it has one (both processes keep their mappings).
        A memfd board has none: it is freed with the last mapping and descriptor."""
        if self.path is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def start_keeper(board: LeaseBoard, record_json: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start the keeper for ``board`` (``record_json``: the worker's ``WorkerRecord.to_hash()`` and shard
    as JSON, for re-registration). It registers the worker first and writes the epoch to the board.

    Raises:
        OSError: the interpreter could not be started.
    """
    from eaas.procs import die_with_parent

    where = f"fd:{board.fd}" if board.fd is not None else str(board.path)
    proc = subprocess.Popen([sys.executable, "-m", "eaas.platform.lease", where], stdin=subprocess.PIPE,
                            env=env, pass_fds=(board.fd,) if board.fd is not None else (),
                            preexec_fn=die_with_parent if sys.platform == "linux" else None)
    assert proc.stdin is not None
    proc.stdin.write(record_json.encode() + b"\n")
    proc.stdin.close()
    return proc


def _keeper_main(where: str) -> int:  # pragma: no cover - runs in the keeper process (tested end to end)
    import signal

    from eaas.errors import EaaSError
    from eaas.registry.deployment import open_registry
    from eaas.registry.records import WorkerRecord, WorkerState, WorkerStats
    from eaas.settings import get_settings

    logging.basicConfig(level=os.environ.get("EAAS_LOG_LEVEL", "WARNING").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the worker, which drains and stops us
    payload = json.loads(sys.stdin.readline())
    record = WorkerRecord.from_hash(payload["hash"], payload["shard"])
    settings = get_settings()
    wid, ttl, interval = record.id, settings.lease_ttl_s, settings.heartbeat_interval_s
    # A beat stuck on an unreachable Redis (its host cut off) must not outlast a third of the
    # lease: once the network heals, the next beat gets through at once instead of after a
    # full socket timeout (2 s by default), and the worker is back within its TTL + ~1 s.
    beat_timeout_s = min(settings.redis_timeout_s, max(interval, ttl / 3))
    registry, _ = open_registry(settings.model_copy(update={"redis_timeout_s": beat_timeout_s}))
    board = LeaseBoard(fd=int(where[3:])) if where.startswith("fd:") else LeaseBoard(where)

    def register() -> None:
        epoch = registry.register_worker(record, ttl)
        board.set_flag(_OFF_EPOCH, epoch)

    register()
    announced = False
    stalled = False
    last_beat = 0.0
    busy_mark = (time.monotonic(), board.read().busy_s)  # (when, cumulative busy s) at the last beat
    while not board.flag(_OFF_STOP):
        try:
            if board.flag(_OFF_DRAIN) and not announced:
                registry.set_worker_state(wid, WorkerState.DRAINING)
                announced = True
                board.mark_now(_OFF_ANNOUNCED)
                log.info("worker %s: draining announced", wid)
            now = time.monotonic()
            if now - last_beat >= interval:
                last_beat = now
                st = board.read()
                if now - board.last_tick_s() > settings.worker_stall_s:
                    if not stalled:
                        log.warning("worker %s: serving loop made no progress for %.0f s; letting its lease"
                                    " expire", wid, now - board.last_tick_s())
                    stalled = True
                else:
                    # busy fraction over the last beat, from the worker's cumulative busy seconds
                    busy = min(1.0, max(0.0, (st.busy_s - busy_mark[1]) / max(1e-6, now - busy_mark[0])))
                    busy_mark = (now, st.busy_s)
                    stats = WorkerStats(queue_tokens=st.queue_tokens, queue_requests=st.queue_requests,
                                        tokens_served=st.tokens_served, requests_served=st.requests_served,
                                        batches=st.batches, busy_fraction=busy, function_tokens=st.function_tokens,
                                        cross_client_batches=st.cross_client_batches,
                                        replies_dropped=st.replies_dropped)
                    state = registry.heartbeat(wid, ttl, stats)
                    if state is None and not board.flag(_OFF_DRAIN):
                        register()
                        log.warning("worker %s: lease lost%s; registered again as a new incarnation, epoch %d",
                                    wid, " during a stall" if stalled else "", board.epoch)
                    elif state is WorkerState.DRAINING and not board.flag(_OFF_DRAIN):
                        board.set_flag(_OFF_ADMIN_DRAIN)
                        announced = True
                    stalled = False
        except (EaaSError, RuntimeError) as e:  # a Redis blip: keep beating
            log.warning("worker %s: heartbeat failed: %s", wid, e)
        except Exception:  # noqa: BLE001 - one bad beat never ends the keeper
            log.exception("worker %s: heartbeat failed", wid)
        time.sleep(0.02)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_keeper_main(sys.argv[1]))
