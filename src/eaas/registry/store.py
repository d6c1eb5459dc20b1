"""The registry: models, functions, workers and leases in Redis.

Redis is the only source of truth (DESIGN.md, "Registry"). Multi-key updates
are atomic: model registration and removal run in WATCH/MULTI/EXEC transactions,
the worker operations are Lua scripts (:mod:`eaas.registry.scripts`), so a crash
midway never leaves a half-registered model and there is no check-then-act race. Listing N functions costs ``1 + ceil(N / 1000)`` round
trips (one pipeline per chunk), never one per key.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

import redis

from eaas.errors import NotFound, RegistryError, RegistryUnavailable
from eaas.registry.keys import Keys, check_name
from eaas.registry.records import Event, EventKind, WorkerRecord, WorkerState, WorkerStats
from eaas.registry.scripts import HEARTBEAT, REAP, REGISTER_WORKER, SET_STATE, UPDATE_HOSTING

log = logging.getLogger(__name__)

_CHUNK = 1000

def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class Registry:
    """Client of the EaaS registry for one deployment prefix.

    Args:
        client: a ``redis.Redis`` connection (``decode_responses`` either way).
        prefix: key prefix of the deployment (``EAAS_PREFIX``).

    Every method raises :class:`RegistryUnavailable` when Redis cannot be
    reached or refuses the credentials, :class:`NotFound` for unknown ids.
    """

    def __init__(self, client: redis.Redis, prefix: str = "eaas") -> None:
        self.redis = client
        self.keys = Keys(prefix)
        self._register_worker = client.register_script(REGISTER_WORKER)
        self._heartbeat = client.register_script(HEARTBEAT)
        self._reap = client.register_script(REAP)
        self._set_state = client.register_script(SET_STATE)
        self._update_hosting = client.register_script(UPDATE_HOSTING)

    @classmethod
    def from_url(cls, url: str, prefix: str = "eaas", timeout_s: float = 2.0) -> "Registry":
        """Connect to ``url`` (``redis://[:password@]host:port/db``) without touching the network yet."""
        client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=True
        )
        return cls(client, prefix)

    @property
    def prefix(self) -> str:
        return self.keys.prefix

    def close(self) -> None:
        self.redis.close()

    # --- plumbing ---------------------------------------------------------

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except redis.AuthenticationError as e:
            raise RegistryUnavailable(f"redis refused our credentials: {e}") from None
        except redis.ResponseError as e:
            msg = str(e)
            if "NOAUTH" in msg or "WRONGPASS" in msg or "invalid password" in msg.lower():
                raise RegistryUnavailable(f"redis refused our credentials: {msg}") from None
            raise RegistryError(f"redis error: {msg}") from None
        except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
            raise RegistryUnavailable(f"cannot reach redis at {self._where()}: {e}") from None

    def _where(self) -> str:
        kw = self.redis.connection_pool.connection_kwargs
        return f"{kw.get('host', '?')}:{kw.get('port', '?')}"

    def ping(self) -> None:
        """Check that Redis answers.

        Raises:
            RegistryUnavailable: unreachable, or wrong password.
        """
        self._call(self.redis.ping)

    def _publish(self, event: Event) -> None:
        self._call(self.redis.publish, self.keys.events, event.to_json())

    def _chunked_hget(self, keys: list[str], field: str) -> list[str | None]:
        out: list[str | None] = []
        for i in range(0, len(keys), _CHUNK):
            pipe = self.redis.pipeline(transaction=False)
            for k in keys[i : i + _CHUNK]:
                pipe.hget(k, field)
            out.extend(None if v is None else _s(v) for v in self._call(pipe.execute))
        return out

    # --- models and functions ---------------------------------------------

    def register_model(self, model: dict[str, Any], functions: Iterable[dict[str, Any]]) -> int:
        """Register a model and all its functions in one transaction (idempotent).

        Re-registering replaces the specs; functions that the new registration no
        longer lists are removed with their hosting sets.

        Args:
            model: JSON-able model spec with at least ``name``.
            functions: JSON-able function specs, each with ``id`` (``{model}/{layer}/{expert}``).

        Returns:
            The number of functions registered.

        Raises:
            ConfigError: a name or id is not valid in a key.
            RegistryUnavailable / RegistryError: Redis failed; nothing was written.
        """
        name = check_name("model", str(model["name"]))
        specs = {str(f["id"]): f for f in functions}
        for fid in specs:
            if not fid.startswith(name + "/"):
                raise RegistryError(f"function {fid!r} does not belong to model {name!r}")
            self.keys.function(fid)  # validates
        mkey, fkey = self.keys.model(name), self.keys.model_functions(name)
        now = time.time()

        def txn(pipe: redis.client.Pipeline) -> None:
            old = {_s(x) for x in pipe.smembers(fkey)}
            pipe.multi()
            for fid in old - specs.keys():
                pipe.delete(self.keys.function(fid), self.keys.function_replicas(fid))
            pipe.delete(fkey)
            pipe.hset(mkey, mapping={"spec": json.dumps(model, sort_keys=True), "registered_at_s": f"{now:.6f}"})
            pipe.sadd(self.keys.models, name)
            ids = list(specs)
            for i in range(0, len(ids), _CHUNK):
                chunk = ids[i : i + _CHUNK]
                pipe.sadd(fkey, *chunk)
                for fid in chunk:
                    pipe.hset(self.keys.function(fid), mapping={"spec": json.dumps(specs[fid], sort_keys=True), "model": name})

        self._call(self.redis.transaction, txn, fkey)
        self._publish(Event(EventKind.MODEL_REGISTERED, model=name, ts_s=now))
        log.info("model %s: registered with %d functions", name, len(specs))
        return len(specs)

    def remove_model(self, name: str) -> int:
        """Remove a model, its functions and their hosting sets in one transaction.

        Workers hosting it keep running until drained; clients stop routing to them.

        Returns:
            The number of functions removed.

        Raises:
            NotFound: no such model.
        """
        mkey, fkey = self.keys.model(name), self.keys.model_functions(name)
        removed: list[int] = []

        def txn(pipe: redis.client.Pipeline) -> None:
            if not pipe.exists(mkey):
                raise NotFound(f"unknown model {name!r}")
            fids = [_s(x) for x in pipe.smembers(fkey)]
            pipe.multi()
            for fid in fids:
                pipe.delete(self.keys.function(fid), self.keys.function_replicas(fid))
            pipe.delete(fkey, mkey)
            pipe.srem(self.keys.models, name)
            removed.append(len(fids))

        self._call(self.redis.transaction, txn, fkey, mkey)
        self._publish(Event(EventKind.MODEL_REMOVED, model=name, ts_s=time.time()))
        log.info("model %s: removed", name)
        return removed[-1]

    def model_names(self) -> list[str]:
        """Names of registered models, sorted."""
        return sorted(_s(x) for x in self._call(self.redis.smembers, self.keys.models))

    def model(self, name: str) -> dict[str, Any]:
        """The model spec stored at registration.

        Raises:
            NotFound: no such model.
        """
        raw = self._call(self.redis.hget, self.keys.model(name), "spec")
        if raw is None:
            raise NotFound(f"unknown model {name!r}")
        return json.loads(raw)

    def models(self) -> list[dict[str, Any]]:
        """All model specs (2 round trips), each with ``num_functions`` added."""
        names = self.model_names()
        pipe = self.redis.pipeline(transaction=False)
        for n in names:
            pipe.hget(self.keys.model(n), "spec")
            pipe.scard(self.keys.model_functions(n))
        res = self._call(pipe.execute)
        out = []
        for i, _n in enumerate(names):
            spec, count = res[2 * i], res[2 * i + 1]
            if spec is None:
                continue  # removed between the two reads
            d = json.loads(spec)
            d["num_functions"] = int(count)
            out.append(d)
        return out

    def function_ids(self, model: str | None = None) -> list[str]:
        """Function ids, of one model or of all, sorted by (model, layer, expert)."""
        names = [model] if model else self.model_names()
        pipe = self.redis.pipeline(transaction=False)
        for n in names:
            pipe.smembers(self.keys.model_functions(n))
        ids = [_s(x) for members in self._call(pipe.execute) for x in members]
        return sorted(ids, key=_fid_sort_key)

    def functions(self, model: str | None = None) -> list[dict[str, Any]]:
        """Function specs with ``replicas`` (hosting worker ids) added.

        Costs ``1 + ceil(N / 500)`` round trips for N functions.

        Raises:
            NotFound: ``model`` is given and unknown.
        """
        if model is not None and not self._call(self.redis.exists, self.keys.model(model)):
            raise NotFound(f"unknown model {model!r}")
        ids = self.function_ids(model)
        out: list[dict[str, Any]] = []
        for i in range(0, len(ids), _CHUNK // 2):
            chunk = ids[i : i + _CHUNK // 2]
            pipe = self.redis.pipeline(transaction=False)
            for fid in chunk:
                pipe.hget(self.keys.function(fid), "spec")
                pipe.smembers(self.keys.function_replicas(fid))
            res = self._call(pipe.execute)
            for j, fid in enumerate(chunk):
                spec = res[2 * j]
                if spec is None:
                    continue
                d = json.loads(spec)
                d["replicas"] = sorted(_s(x) for x in res[2 * j + 1])
                out.append(d)
        return out

    def function(self, fid: str) -> dict[str, Any]:
        """One function spec with its ``replicas``.

        Raises:
            NotFound: no such function.
        """
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(self.keys.function(fid), "spec")
        pipe.smembers(self.keys.function_replicas(fid))
        spec, replicas = self._call(pipe.execute)
        if spec is None:
            raise NotFound(f"unknown function {fid!r}")
        d = json.loads(spec)
        d["replicas"] = sorted(_s(x) for x in replicas)
        return d

    # --- workers and leases -------------------------------------------------

    def register_worker(self, record: WorkerRecord, ttl_s: float) -> int:
        """Register (or re-register) a worker under a lease of ``ttl_s`` seconds.

        Writes the record, the shard set, the index entry and every hosting set
        atomically, then publishes ``worker_registered``. Every registration is a
        new *incarnation*: it gets a fresh epoch from a per-deployment counter
        (``{prefix}:epoch``), so a worker that lost its lease and came back is told
        apart from the one clients knew (clients drop that one's connection and
        in-flight state).

        Returns:
            The incarnation's epoch (> every earlier epoch of the deployment).

        Raises:
            RegistryError: a function of the shard is not registered.
        """
        wid = check_name("worker", record.id)
        fields: list[str] = []
        for k, v in record.to_hash().items():
            fields += [k, v]
        epoch = int(self._call(
            self._register_worker,
            keys=[self.keys.worker(wid), self.keys.workers, self.keys.worker_shard(wid), self.keys.events],
            args=[int(ttl_s * 1000), wid, len(fields) // 2, self.prefix, *fields, *record.shard],
        ))
        self._publish(Event(EventKind.WORKER_REGISTERED, model=record.model, worker=wid, state=record.state.value, ts_s=time.time()))
        log.info("worker %s: registered (%d functions, %s, epoch %d)", wid, len(record.shard), record.state.value, epoch)
        return epoch

    def heartbeat(self, wid: str, ttl_s: float, stats: WorkerStats | None = None) -> WorkerState | None:
        """Renew a worker's lease and store its stats.

        Returns:
            The state stored in the registry (an admin may have set ``draining``),
            or ``None`` when the lease had already expired: the worker must
            register again.
        """
        args: list[Any] = [int(ttl_s * 1000)]
        if stats is not None:
            for k, v in stats.to_hash(time.time()).items():
                args += [k, v]
        state = self._call(self._heartbeat, keys=[self.keys.worker(wid)], args=args)
        if state is None:
            return None
        try:
            return WorkerState(_s(state))
        except ValueError:
            return WorkerState.STARTING

    def set_worker_state(self, wid: str, state: WorkerState) -> None:
        """Set a worker's state (``ready``, ``draining``) and publish it.

        Raises:
            NotFound: no live worker with this id.
        """
        ok = self._call(self._set_state, keys=[self.keys.worker(wid)], args=[WorkerState(state).value])
        if not ok:
            raise NotFound(f"unknown worker {wid!r}")
        self._publish(Event(EventKind.WORKER_STATE, worker=wid, state=WorkerState(state).value, ts_s=time.time()))

    def update_hosting(self, wid: str, add: Iterable[str] = (), remove: Iterable[str] = ()) -> int:
        """Change the functions a live worker hosts, atomically (its shard set and every hosting
        set); publishes ``worker_registered`` when something changed, so clients re-read routing.

        Returns:
            How many memberships changed (0: already so), or -1 when the worker's lease is gone.

        Raises:
            RegistryError: a function in ``add`` is not registered.
        """
        wid = check_name("worker", wid)
        add, remove = sorted(set(add)), sorted(set(remove) - set(add))
        changed = int(self._call(self._update_hosting, keys=[self.keys.worker(wid), self.keys.worker_shard(wid)],
                                 args=[self.prefix, wid, len(add), *add, *remove]))
        if changed > 0:
            self._publish(Event(EventKind.WORKER_REGISTERED, worker=wid, ts_s=time.time()))
            log.info("worker %s: hosting +%d -%d functions", wid, len(add), len(remove))
        return changed

    def set_extra_functions(self, wid: str, fids: Iterable[str]) -> None:
        """The extra replicas the autoscaler wants worker ``wid`` to host (replaces the set).

        The worker loads them, then adds them to its hosting sets (:meth:`update_hosting`).
        """
        key = self.keys.worker_extra(check_name("worker", wid))
        fids = sorted(set(fids))
        pipe = self.redis.pipeline(transaction=True)  # MULTI/EXEC: readers see the old set or the new one
        pipe.delete(key)
        if fids:
            pipe.sadd(key, *fids)
        self._call(pipe.execute)

    def extra_functions(self, wid: str) -> set[str]:
        """The extra replicas wanted of worker ``wid`` (empty when none)."""
        return {_s(v) for v in self._call(self.redis.smembers, self.keys.worker_extra(check_name("worker", wid)))}

    def deregister_worker(self, wid: str) -> None:
        """Remove a worker now (end of drain): record, index and hosting entries."""
        gone = self._call(self._reap, keys=[self.keys.workers], args=[self.prefix, wid])
        if gone:
            self._publish(Event(EventKind.WORKER_GONE, worker=wid, ts_s=time.time()))
        log.info("worker %s: deregistered", wid)

    def reap_expired(self) -> list[str]:
        """Remove workers whose lease expired from the index and every hosting set.

        Atomic (one Lua script); publishes ``worker_gone`` for each. Any process
        may call it; clients, the gateway and the autoscaler do, periodically.

        Returns:
            Ids of the workers removed.
        """
        gone = [_s(x) for x in self._call(self._reap, keys=[self.keys.workers], args=[self.prefix])]
        for wid in gone:
            log.info("worker %s: lease expired, removed", wid)
            self._publish(Event(EventKind.WORKER_GONE, worker=wid, ts_s=time.time()))
        return gone

    def worker_ids(self) -> list[str]:
        return sorted(_s(x) for x in self._call(self.redis.smembers, self.keys.workers))

    def workers(self, model: str | None = None, include_expired: bool = False) -> list[WorkerRecord]:
        """Live workers (lease held), optionally of one model, in 2 round trips."""
        ids = self.worker_ids()
        records: list[WorkerRecord] = []
        for i in range(0, len(ids), _CHUNK // 2):
            chunk = ids[i : i + _CHUNK // 2]
            pipe = self.redis.pipeline(transaction=False)
            for wid in chunk:
                pipe.hgetall(self.keys.worker(wid))
                pipe.smembers(self.keys.worker_shard(wid))
            res = self._call(pipe.execute)
            for j, wid in enumerate(chunk):
                h, shard = res[2 * j], res[2 * j + 1]
                if not h and not include_expired:
                    continue
                rec = WorkerRecord.from_hash({_s(k): _s(v) for k, v in h.items()} | ({"id": wid} if not h else {}), {_s(x) for x in shard})
                if model is None or rec.model == model:
                    records.append(rec)
        return records

    def worker(self, wid: str) -> WorkerRecord:
        """One live worker.

        Raises:
            NotFound: unknown id or lease expired.
        """
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.keys.worker(wid))
        pipe.smembers(self.keys.worker_shard(wid))
        h, shard = self._call(pipe.execute)
        if not h:
            raise NotFound(f"unknown worker {wid!r} (never registered, or its lease expired)")
        return WorkerRecord.from_hash({_s(k): _s(v) for k, v in h.items()}, {_s(x) for x in shard})

    def routing_table(self, model: str | None = None) -> dict[str, list[WorkerRecord]]:
        """Function id -> ready replicas (live lease, state ``ready``), from one read of the workers.

        Functions of ``model`` (or of every model) with no ready replica map to ``[]``.
        """
        return self.routing(model)[0]

    def routing(self, model: str | None = None) -> tuple[dict[str, list[WorkerRecord]], dict[str, WorkerRecord]]:
        """The routing table and the *draining* workers, from one read of the workers.

        A draining worker takes no new work but still answers what it was sent:
        clients keep waiting for its in-flight replies instead of failing them over.

        Returns:
            (function id -> ready replicas, worker id -> record of each draining worker).
        """
        table: dict[str, list[WorkerRecord]] = {fid: [] for fid in self.function_ids(model)}
        draining: dict[str, WorkerRecord] = {}
        for rec in self.workers(model):
            if rec.state is WorkerState.DRAINING:
                draining[rec.id] = rec
            if rec.state is not WorkerState.READY:
                continue
            for fid in rec.shard:
                if fid in table:
                    table[fid].append(rec)
        return table, draining

    # --- events -------------------------------------------------------------

    def events(self, timeout_s: float = 1.0, stop: Any = None) -> Iterator[Event | None]:
        """Yield membership events as they arrive; ``None`` on each idle ``timeout_s``.

        ``stop`` (a ``threading.Event``) ends the iteration. Malformed messages are skipped.
        """
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            self._call(pubsub.subscribe, self.keys.events)
            while stop is None or not stop.is_set():
                msg = self._call(pubsub.get_message, timeout=timeout_s)
                if msg is None:
                    yield None
                    continue
                ev = Event.from_json(msg.get("data", b""))
                if ev is not None:
                    yield ev
        finally:
            try:
                pubsub.close()
            except Exception:  # noqa: BLE001 - closing a dead connection
                pass


def _fid_sort_key(fid: str) -> tuple[str, int, int]:
    model, _, rest = fid.rpartition("/")
    model, _, layer = model.rpartition("/")
    try:
        return (model, int(layer), int(rest))
    except ValueError:
        return (fid, 0, 0)
