"""ExpertClient and experts_implementation="eaas": parity with transformers, failover, no-replica."""

from __future__ import annotations

import signal

import pytest
import torch

from eaas.errors import NoReplicaAvailable
from eaas.platform.client import ExpertClient
from eaas.platform.integration import load_model
from eaas.registry import Registry
from eaas.settings import get_settings
from eaas.testing import wait_for, wait_workers_ready

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"]


def _settings(registry: Registry, **kw):  # type: ignore[no-untyped-def]
    return get_settings(redis_url="unused", prefix=registry.prefix, **kw)


@pytest.mark.parametrize("arch", FAMILIES)
def test_logits_and_greedy_tokens_equal_monolithic_transformers(arch, registry, registered, tiny_checkpoint, workers) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    model = registered(arch)
    ckpt = tiny_checkpoint(arch)
    workers(model, ["all", "all"])  # 2 workers: every expert on 2 replicas
    wait_workers_ready(registry, model, 2)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    eaas_model, client = load_model(model, settings=_settings(registry), registry=registry)
    try:
        ids = torch.randint(0, ref.config.vocab_size, (2, 12))
        with torch.no_grad():
            want = ref(ids).logits
            got = eaas_model(ids).logits
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= 1e-5 * max(1.0, scale)
        prompt = ids[:1, :6]
        want_tokens = ref.generate(prompt, max_new_tokens=32, do_sample=False, min_new_tokens=32)
        got_tokens = eaas_model.generate(prompt, max_new_tokens=32, do_sample=False, min_new_tokens=32)
        assert torch.equal(got_tokens, want_tokens)
        assert client.stats.requests > 0 and client.stats.failovers == 0
        # both replicas served: dispatch spreads the load over them
        wait_for(lambda: len([w for w in registry.workers(model) if w.tokens_served]) == 2, 10,
                 what="both workers reporting tokens served")
    finally:
        client.close()


def test_client_process_does_not_materialise_expert_weights(registry, registered, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    model = registered("mixtral")
    eaas_model, client = load_model(model, settings=_settings(registry), registry=registry)
    try:
        from eaas.functions import experts_modules

        for layer, module in experts_modules(eaas_model).items():
            assert list(module.parameters(recurse=False)) == [], f"layer {layer} holds expert weights"
            assert not hasattr(module, "gate_up_proj")
    finally:
        client.close()


def _layer_reference(ckpt, layer: int):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    return ref.model.layers[layer].mlp.experts


def _stream_calls(client: ExpertClient, ref, n: int, on_call=None) -> list[float]:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(7)
    errors = []
    for i in range(n):
        x = torch.randn(24, 64, generator=g)
        idx = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(24)])
        w = torch.rand(24, 2, generator=g)
        if on_call:
            on_call(i)
        out = client.forward(1, x, idx, w)
        with torch.no_grad():
            errors.append((out - ref(x, idx, w)).abs().max().item())
    return errors


def test_sigkill_of_a_worker_during_200_calls_loses_nothing(registry, registered, tiny_checkpoint, workers) -> None:  # type: ignore[no-untyped-def]
    model = registered("mixtral")
    # two shard groups of two workers each: the killed worker hosts half of all replicas
    procs = workers(model, ["*:0-3", "*:4-7", "*:0-3", "*:4-7"])
    wait_workers_ready(registry, model, 4)
    ref = _layer_reference(tiny_checkpoint("mixtral"), 1)
    client = ExpertClient(registry, model, _settings(registry, request_timeout_ms=3000))
    victim = procs[0]

    def kill(i: int) -> None:
        if i == 60:
            victim.send_signal(signal.SIGKILL)

    try:
        errors = _stream_calls(client, ref, 200, kill)
    finally:
        client.close()
    assert victim.wait(10) == -signal.SIGKILL
    assert len(errors) == 200 and max(errors) <= 1e-5


def test_a_dead_replica_is_skipped_within_the_same_dispatch(registry, registered, tiny_checkpoint, workers, caplog) -> None:  # type: ignore[no-untyped-def]
    """Two workers host every expert; one is SIGKILLed while its lease is still valid, so the
    routing table still lists it. A send that fails there (its connection cannot be opened) is
    placed again at once on the live replica: every call stays exact and none goes into the
    "no ready replica; waiting" state (before, each such call waited there although a healthy
    replica was listed, and logged that no replica was ready)."""
    import logging

    model = registered("mixtral")
    procs = workers(model, ["all", "all"])
    wait_workers_ready(registry, model, 2)
    ref = _layer_reference(tiny_checkpoint("mixtral"), 1)
    client = ExpertClient(registry, model, _settings(registry, request_timeout_ms=3000))
    try:
        _stream_calls(client, ref, 4)  # both connections open
        procs[0].send_signal(signal.SIGKILL)
        assert procs[0].wait(10) == -signal.SIGKILL
        errors: list[float] = []

        def sent_to_dead() -> bool:  # calls until one was sent to the dead replica (its suspicion lapses in ~0.25 s)
            errors.extend(_stream_calls(client, ref, 5))
            return any("sending to worker" in r.getMessage() for r in caplog.records)

        with caplog.at_level(logging.WARNING, logger="eaas.platform.inflight"):
            wait_for(sent_to_dead, 60, interval_s=0.0, what="a call sent to the dead replica")
        assert max(errors) <= 1e-5
        waited = [r.getMessage() for r in caplog.records if "no ready replica" in r.getMessage()]
        assert waited == [], waited
    finally:
        client.close()


def test_stalled_worker_is_routed_around_and_its_late_replies_ignored(registry, registered, tiny_checkpoint, workers) -> None:  # type: ignore[no-untyped-def]
    model = registered("mixtral")
    procs = workers(model, ["all", "all"])
    wait_workers_ready(registry, model, 2)
    ref = _layer_reference(tiny_checkpoint("mixtral"), 1)
    client = ExpertClient(registry, model, _settings(registry, request_timeout_ms=400, call_deadline_ms=20_000))
    try:
        _stream_calls(client, ref, 5)
        procs[0].send_signal(signal.SIGSTOP)
        errors = _stream_calls(client, ref, 30)
        assert max(errors) <= 1e-5
        assert client.stats.failovers >= 1
        procs[0].send_signal(signal.SIGCONT)
        # its late replies arrive and are dropped by request id; outputs stay exact
        errors = wait_for(lambda: (e := _stream_calls(client, ref, 5)) and client.stats.late_replies >= 1 and e, 20,
                          what="late replies from the resumed worker")
        assert max(errors) <= 1e-5
    finally:
        if procs[0].poll() is None:
            procs[0].send_signal(signal.SIGCONT)
        client.close()


def test_no_replica_then_recovery(registry, registered, tiny_checkpoint, workers, eaas_env) -> None:  # type: ignore[no-untyped-def]
    model = registered("mixtral")
    (p,) = workers(model, ["all"])
    wait_workers_ready(registry, model, 1)
    client = ExpertClient(registry, model, _settings(registry, call_deadline_ms=1500, request_timeout_ms=500))
    x, idx, w = torch.randn(4, 64), torch.tensor([[0, 5]] * 4), torch.ones(4, 2)
    try:
        client.forward(0, x, idx, w)
        p.terminate()
        assert p.wait(30) == 0
        with pytest.raises(NoReplicaAvailable) as err:
            client.forward(0, x, idx, w)
        assert f"{model}/0/0" in str(err.value) and f"{model}/0/5" in err.value.functions
        # a worker for the functions registers again: the next call succeeds
        workers(model, ["0:0,5"])
        wait_workers_ready(registry, model, 1)
        ref = _layer_reference(tiny_checkpoint("mixtral"), 0)
        out = client.forward(0, x, idx, w)
        assert (out - ref(x, idx, w)).abs().max().item() <= 1e-5
    finally:
        client.close()


def test_concurrent_calls_each_get_their_own_lane_and_exact_results(registry, registered, tiny_checkpoint, workers) -> None:  # type: ignore[no-untyped-def]
    """Two threads call at once (the runner's micro-batches): every output is exact, each thread
    reads only its own replies (a lane each: its connections and rings), and a worker SIGKILLed
    during the calls loses nothing."""
    import threading

    model = registered("mixtral")
    procs = workers(model, ["all", "all"])
    wait_workers_ready(registry, model, 2)
    ref = _layer_reference(tiny_checkpoint("mixtral"), 1)
    client = ExpertClient(registry, model, _settings(registry, request_timeout_ms=3000))
    results: dict[int, list[float]] = {}
    inside = threading.Barrier(2, timeout=60)

    def stream(k: int) -> None:
        inside.wait()  # both threads start calling together
        results[k] = _stream_calls(client, ref, 60, (lambda i: procs[0].send_signal(signal.SIGKILL) if i == 30 else None)
                                   if k == 0 else None)

    threads = [threading.Thread(target=stream, args=(k,)) for k in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
    finally:
        client.close()
    assert sorted(results) == [0, 1] and all(len(e) == 60 and max(e) <= 1e-5 for e in results.values())
    assert len(client._lanes) == 2 and client.stats.calls == 120


def test_a_worker_that_forgot_the_pair_gets_a_new_hello_and_the_call_stays_exact(registry, registered, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    """A worker forgets a pair's transport state when writing a reply into the client's arena
    failed (a NIXL WRITE to a host that was cut off): it answers ``transfer_failed`` and later
    requests on that pair ``unknown_arena``. The client must re-send the rows and open a new
    connection (a new hello) rather than keep sending into a pair the worker no longer knows.

    The worker here is a ROUTER served by a thread of this test process with the real
    worker-side decoding (``WorkerEndpoint``, shm) and the real expert shard; it forgets the
    pair once, at the first invoke, as the worker does after a failed WRITE (a NIXL failure
    cannot be caused on purpose between two live processes on one host)."""
    import threading

    import zmq

    from eaas.errors import ProtocolError
    from eaas.functions import load_shard
    from eaas.functions.spec import function_id
    from eaas.platform.protocol import error_frames
    from eaas.platform.transport.select import WorkerEndpoint, local_capabilities
    from eaas.registry.records import WorkerRecord, WorkerState

    model = registered("mixtral")
    shard = load_shard(tiny_checkpoint("mixtral"), [(l, e) for l in (0, 1) for e in range(8)])
    pairs = {function_id(model, l, e): (l, e) for l, e in shard.functions}
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    endpoint_io = WorkerEndpoint(max_message_bytes=1 << 26, max_arena_bytes=1 << 26, known_functions=pairs,
                                 offered=["inline", "shm"], ring=False)
    seen = {"hello": 0, "invoke": 0, "forgot": 0}
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if not sock.poll(20):
                continue
            peer, *frames = sock.recv_multipart(copy=False)
            inc = endpoint_io.on_message(peer.bytes, frames)
            if inc.header is not None and inc.header.kind in seen:
                seen[inc.header.kind] += 1
            if inc.reply is not None:
                sock.send_multipart([peer, *inc.reply])
            elif inc.x is not None:
                h = inc.header
                if not seen["forgot"]:
                    seen["forgot"] += 1
                    endpoint_io.drop_peer(peer.bytes)
                    sock.send_multipart([peer, *error_frames(ProtocolError("WRITE failed", "transfer_failed"), h.id)])
                    continue
                y = shard.forward(inc.x, [(pairs[f], r) for f, r in h.segments])
                sock.send_multipart([peer, *endpoint_io.reply_frames(peer.bytes, h, y)])

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    registry.register_worker(WorkerRecord(id="w-forgets", model=model, endpoint=f"tcp://127.0.0.1:{port}",
                                          shard=tuple(sorted(pairs)), state=WorkerState.READY,
                                          capabilities=local_capabilities("cpu")), 60)
    client = ExpertClient(registry, model, _settings(registry, shm_ring=False), transport="shm")
    try:
        g = torch.Generator().manual_seed(5)
        for i in range(4):
            x = torch.randn(3, 64, generator=g)
            idx = torch.tensor([[0, 1], [2, 3], [1, 5]])
            w = torch.rand(3, 2, generator=g)
            y = client.forward(i % 2, x, idx, w)
            want = torch.zeros_like(x)
            for tok in range(3):
                for k in range(2):
                    want[tok] += w[tok, k] * shard.forward(x[tok:tok + 1], [((i % 2, int(idx[tok, k])), 1)])[0]
            torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
        assert client.stats.errors["transfer_failed"] == 1
        assert seen["hello"] == 2, seen  # the first connection, and the new one after the worker forgot it
        assert client.transports() == {"w-forgets": "shm"}
    finally:
        client.close()
        stop.set()
        t.join(5)
        sock.close(0)


def test_a_call_retried_while_redis_is_down_goes_on_with_the_table_it_holds(registered, tiny_checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Redis is stopped and the only replica stalls (SIGSTOP) past the per-attempt timeout, so the
    call has no untried replica left and waits for one. While waiting it re-reads the routing
    table; that read fails with Redis down. The call must go on with the table it holds and
    retry the replica, which answers once it resumes (SIGCONT); before, the failed read ended
    the call with RegistryUnavailable although serving needs no Redis."""
    import os
    import threading

    from eaas.functions import inspect_checkpoint, load_shard
    from eaas.registry.server import RedisServer
    from eaas.testing import start_worker

    server = RedisServer().start()
    proc = None
    try:
        reg = Registry.from_url(server.url, "outage")
        spec, fns = inspect_checkpoint(tiny_checkpoint("mixtral"))
        reg.register_model(spec.to_dict(), [f.to_dict() for f in fns])
        env = dict(os.environ, EAAS_REDIS_URL=server.url, EAAS_PREFIX="outage", OMP_NUM_THREADS="1",
                   EAAS_LEASE_TTL_S="60")
        proc = start_worker(env, spec.name, "all", log_path=str(tmp_path / "worker.log"))
        wait_workers_ready(reg, spec.name, 1)
        settings = get_settings(redis_url="unused", prefix="outage", request_timeout_ms=300, call_deadline_ms=60_000)
        client = ExpertClient(reg, spec.name, settings)
        ref = load_shard(tiny_checkpoint("mixtral"), [(0, 2), (0, 5)])
        x, idx, w = torch.randn(1, 64), torch.tensor([[2, 5]]), torch.tensor([[0.25, 0.75]])
        want = 0.25 * ref.forward(x, [((0, 2), 1)]) + 0.75 * ref.forward(x, [((0, 5), 1)])
        try:
            torch.testing.assert_close(client.forward(0, x, idx, w), want, rtol=1e-5, atol=1e-6)
            server.stop()
            proc.send_signal(signal.SIGSTOP)
            out: dict = {}
            t = threading.Thread(target=lambda: out.update(y=_call(client, x, idx, w)), daemon=True)
            t.start()
            wait_for(lambda: client.stats.failovers >= 2 or not t.is_alive(), 30,
                     what="the call failing over from the stalled replica")
            proc.send_signal(signal.SIGCONT)
            t.join(60)
            assert not t.is_alive()
            assert not isinstance(out["y"], Exception), out["y"]
            torch.testing.assert_close(out["y"], want, rtol=1e-5, atol=1e-6)
        finally:
            client.close()
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait(10)
        server.stop()


def _call(client: ExpertClient, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor | Exception:
    try:
        return client.forward(0, x, idx, w)
    except Exception as e:  # noqa: BLE001 - handed to the test thread
        return e
