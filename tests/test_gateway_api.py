"""Gateway app in-process (httpx ASGITransport): parity with generate, batching, errors."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from eaas.gateway.app import create_app
from eaas.gateway.runner import ModelRunner
from eaas.settings import Settings
from gateway_ckpt import write_gateway_checkpoint

torch.set_num_threads(1)

MODEL = "tiny"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_gateway_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def loaded(checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    tok = AutoTokenizer.from_pretrained(checkpoint)
    return model, tok


@pytest.fixture(scope="module")
def gateway(loaded):
    model, tok = loaded
    runner = ModelRunner(model, tok, name=MODEL, max_batch_size=16)
    runner.start()

    def invoker(function_id: str, x: torch.Tensor) -> torch.Tensor:
        if function_id != "tiny/0/1":
            from eaas.errors import NotFound

            raise NotFound(f"unknown function {function_id}")
        return 2 * x

    settings = Settings(max_body_bytes=64 * 1024, max_batch_tokens=512)
    app = create_app(settings, runner, function_invoker=invoker, manage_runners=False)
    yield app
    runner.stop()


def reference(loaded, ids: list[int], n: int) -> list[int]:
    model, _ = loaded
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


async def _client_call(app, fn):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=60) as client:
        return await fn(client)


def call(app, fn):
    return asyncio.run(_client_call(app, fn))


def post(app, path, **kw):
    return call(app, lambda c: c.post(path, **kw))


def get(app, path):
    return call(app, lambda c: c.get(path))


PROMPT = "the quick brown fox"


def test_greedy_text_prompt_matches_generate(gateway, loaded):
    _, tok = loaded
    ids = tok(PROMPT)["input_ids"]
    r = post(gateway, "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 24, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = reference(loaded, ids, 24)
    choice = body["choices"][0]
    assert choice["token_ids"] == ref
    assert choice["text"] == tok.decode(ref, skip_special_tokens=True)
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(ref), "total_tokens": len(ids) + len(ref),
                             "prompt_tokens_details": {"cached_tokens": 0}}


def test_greedy_token_prompt_and_list_of_prompts(gateway, loaded):
    ids = [5, 17, 42, 99, 7, 3]
    r = post(gateway, "/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["token_ids"] == reference(loaded, ids, 12)
    _, tok = loaded
    texts = ["hello world", "experts serve models", "dog"]
    r = post(gateway, "/v1/completions", json={"model": MODEL, "prompt": texts, "max_tokens": 10, "temperature": 0})
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert [c["token_ids"] for c in choices] == [reference(loaded, tok(t)["input_ids"], 10) for t in texts]


def _sse_events(text: str) -> list:
    lines = [ln[6:] for ln in text.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_streaming_gives_same_tokens(gateway, loaded):
    _, tok = loaded
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 20, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    r = post(gateway, "/v1/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _sse_events(r.text)
    ids = [t for e in events for c in e["choices"] for t in c["token_ids"]]
    ref = reference(loaded, tok(PROMPT)["input_ids"], 20)
    assert ids == ref
    assert "".join(c["text"] for e in events for c in e["choices"]) == tok.decode(ref, skip_special_tokens=True)
    assert events[-1]["usage"]["completion_tokens"] == len(ref)


def test_concurrent_completions_share_batches(gateway, loaded):
    _, tok = loaded
    prompts = [f"prompt number {i} about experts" for i in range(8)]

    async def many(client):
        reqs = [client.post("/v1/completions", json={"model": MODEL, "prompt": p, "max_tokens": 16, "temperature": 0})
                for p in prompts]
        return await asyncio.gather(*reqs)

    responses = call(gateway, many)
    assert all(r.status_code == 200 for r in responses)
    for p, r in zip(prompts, responses):  # batched == unbatched
        assert r.json()["choices"][0]["token_ids"] == reference(loaded, tok(p)["input_ids"], 16)
    metrics = get(gateway, "/metrics").text
    from prometheus_client.parser import text_string_to_metric_families

    fams = {f.name: f for f in text_string_to_metric_families(metrics)}
    samples = fams["eaas_gateway_batch_size"].samples
    le1 = sum(s.value for s in samples if s.name.endswith("_bucket") and s.labels["le"] == "1.0")
    total = sum(s.value for s in samples if s.name.endswith("_count"))
    assert total - le1 > 0, "no decode step ran with more than one sequence"


def test_sampling_seeded_is_reproducible_and_stop_strings(gateway, loaded):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 16, "temperature": 0.9, "top_p": 0.9, "seed": 7}
    a = post(gateway, "/v1/completions", json=body).json()["choices"][0]
    b = post(gateway, "/v1/completions", json=body).json()["choices"][0]
    assert a["token_ids"] == b["token_ids"]
    full = post(gateway, "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 24, "temperature": 0})
    text = full.json()["choices"][0]["text"]
    stop = text[5:7]
    r = post(gateway, "/v1/completions",
             json={"model": MODEL, "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "stop": [stop]})
    choice = r.json()["choices"][0]
    assert choice["text"] == text[: text.find(stop)]
    assert choice["finish_reason"] == "stop"


def test_chat_and_models(gateway):
    r = post(gateway, "/v1/chat/completions",
             json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"
    models = get(gateway, "/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    health = get(gateway, "/healthz")
    assert health.status_code == 200 and health.json()["runners"][MODEL]["engine"] == "slots"
    assert get(gateway, "/readyz").json()["ready"] is True


def test_streamed_chat_sends_the_role_once_and_the_same_text(gateway):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "tell me"}], "max_tokens": 8,
            "temperature": 0, "ignore_eos": True}
    whole = post(gateway, "/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    r = post(gateway, "/v1/chat/completions", json={**body, "stream": True})
    assert r.status_code == 200, r.text
    deltas = [c["delta"] for e in _sse_events(r.text) for c in e["choices"]]
    assert len(deltas) >= 2 and all(e["object"] == "chat.completion.chunk" for e in _sse_events(r.text))
    assert deltas[0].get("role") == "assistant"  # OpenAI: the role comes in the first delta only
    assert all("role" not in d for d in deltas[1:])
    assert "".join(d.get("content", "") for d in deltas) == whole


BAD_JSON = [
    (b"{not json", 400),
    (json.dumps({"model": MODEL, "prompt": 5}).encode(), 400),
    (json.dumps({"model": MODEL, "prompt": "x", "max_tokens": "many"}).encode(), 400),
    (json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 10_000}).encode(), 400),
    (json.dumps({"model": MODEL, "prompt": "x", "temperature": -1}).encode(), 400),
    (json.dumps({"model": MODEL, "prompt": [10_000]}).encode(), 400),
    (json.dumps({"model": MODEL, "prompt": ""}).encode(), 400),
    (json.dumps({"model": "nope", "prompt": "x"}).encode(), 404),
    (json.dumps({"model": MODEL, "prompt": "x" * 70_000}).encode(), 413),
]


@pytest.mark.parametrize("content,status", BAD_JSON)
def test_bad_completion_input(gateway, content, status):
    r = post(gateway, "/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    ok = post(gateway, "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200


def _st(**tensors) -> bytes:
    return st_save(tensors)


def test_layer_forward_matches_moe_block(gateway, loaded):
    model, _ = loaded
    x = torch.randn(5, model.config.hidden_size)
    r = post(gateway, f"/v1/layers/{MODEL}/1:forward", content=_st(hidden_states=x))
    assert r.status_code == 200, r.text
    out = st_load(r.content)["hidden_states"]
    with torch.no_grad():
        ref = model.model.layers[1].mlp(x.unsqueeze(0))[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "path,body,status",
    [
        (f"/v1/layers/{MODEL}/0:forward", _st(hidden_states=torch.full((2, 64), math.nan)), 400),
        (f"/v1/layers/{MODEL}/0:forward", _st(hidden_states=torch.full((2, 64), math.inf)), 400),
        (f"/v1/layers/{MODEL}/0:forward", _st(hidden_states=torch.zeros(2, 63)), 400),
        (f"/v1/layers/{MODEL}/0:forward", _st(hidden_states=torch.zeros(2, 4, 64)), 400),
        (f"/v1/layers/{MODEL}/0:forward", _st(hidden_states=torch.zeros(2, 64, dtype=torch.int32)), 400),
        (f"/v1/layers/{MODEL}/0:forward", _st(other=torch.zeros(2, 64)), 400),
        (f"/v1/layers/{MODEL}/0:forward", b"garbage bytes here", 400),
        (f"/v1/layers/{MODEL}/0:forward", _st(hidden_states=torch.zeros(600, 64)), 413),
        (f"/v1/layers/{MODEL}/9:forward", _st(hidden_states=torch.zeros(2, 64)), 404),
        ("/v1/layers/nope/0:forward", _st(hidden_states=torch.zeros(2, 64)), 404),
        ("/v1/functions/tiny/0/2:invoke", _st(x=torch.zeros(2, 64)), 404),
        ("/v1/functions/tiny/0/1:invoke", _st(x=torch.full((2, 64), math.nan)), 400),
    ],
)
def test_bad_tensor_input(gateway, path, body, status):
    r = post(gateway, path, content=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]
    assert post(gateway, f"/v1/layers/{MODEL}/0:forward", content=_st(hidden_states=torch.zeros(2, 64))).status_code == 200


def test_function_invoke(gateway):
    x = torch.randn(3, 64)
    r = post(gateway, "/v1/functions/tiny/0/1:invoke", content=_st(x=x))
    assert r.status_code == 200, r.text
    torch.testing.assert_close(st_load(r.content)["y"], 2 * x)


def test_function_invoke_not_configured_and_api_keys(loaded):
    model, tok = loaded
    runner = ModelRunner(model, tok, name=MODEL)
    app = create_app(Settings(api_keys=["s3cret"]), runner, manage_runners=False)
    runner.start()
    try:
        assert get(app, "/v1/models").status_code == 401
        r = call(app, lambda c: c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}))
        assert r.status_code == 200
        r = call(app, lambda c: c.post("/v1/functions/a/0/1:invoke", content=_st(x=torch.zeros(1, 4)),
                                       headers={"Authorization": "Bearer s3cret"}))
        assert r.status_code == 501 and "not configured" in r.json()["error"]["message"]
        assert get(app, "/healthz").status_code == 200
    finally:
        runner.stop()


def test_no_replica_maps_to_503(loaded):
    from eaas.errors import NoReplicaAvailable

    class Broken(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.inner = model
            self.config = model.config
            self.generation_config = model.generation_config

        @property
        def device(self):
            return torch.device("cpu")

        def forward(self, input_ids=None, cache=None, use_cache=True, logits_to_keep=1, **kw):
            raise NoReplicaAvailable(["tiny/0/3"])

    model, tok = loaded
    runner = ModelRunner(Broken(model), tok, name=MODEL)
    app = create_app(Settings(), runner, manage_runners=False, readiness=lambda: (False, {"missing": ["tiny/0/3"]}))
    runner.start()
    try:
        r = post(app, "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3})
        assert r.status_code == 503 and r.headers["retry-after"]
        assert "no ready replica" in r.json()["error"]["message"]
        r = post(app, "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3, "stream": True})
        assert r.status_code == 503
        r = get(app, "/readyz")
        assert r.status_code == 503 and r.json()["detail"]["missing"] == ["tiny/0/3"]
        assert r.json()["detail"]["runners"][MODEL]["alive"] is True
    finally:
        runner.stop()


def test_text_prompt_too_long_to_fit_is_refused_before_tokenizing(gateway, loaded):
    from eaas.gateway.completions import max_prompt_chars

    runner = next(iter(gateway.state.runners.values()))
    limit = max_prompt_chars(runner)
    calls = []
    real = runner.tokenizer.__class__.__call__

    def spy(self, *a, **kw):  # noqa: ANN001, ANN202
        calls.append(1)
        return real(self, *a, **kw)

    runner.tokenizer.__class__.__call__ = spy
    try:
        r = post(gateway, "/v1/completions", json={"model": MODEL, "prompt": "a" * (limit + 1), "max_tokens": 2})
    finally:
        runner.tokenizer.__class__.__call__ = real
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert calls == []  # refused from its length alone: never tokenized
    assert post(gateway, "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}).status_code == 200


def test_a_prompt_that_fills_the_context_is_blamed_on_the_prompt_not_max_tokens(gateway, loaded):
    runner = next(iter(gateway.state.runners.values()))
    full = [5] * runner.max_model_len
    r = post(gateway, "/v1/completions", json={"model": MODEL, "prompt": full, "max_tokens": 2})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == "prompt", r.text
    assert f"{runner.max_model_len} tokens leave no room" in err["message"]
    # one token shorter fits a 1-token answer; asking for 2 is then max_tokens' fault
    r = post(gateway, "/v1/completions", json={"model": MODEL, "prompt": full[1:], "max_tokens": 2})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == "max_tokens", r.text


def test_lone_surrogate_is_a_400_not_a_500(gateway):
    body = b'{"model": "tiny", "prompt": "\\ud800 x", "max_tokens": 2}'
    r = post(gateway, "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "Unicode" in r.json()["error"]["message"], r.text
    body = b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}'
    r = post(gateway, "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    # a stop string with one could never match decoded text: refused, not accepted and ignored
    # (the official SDK cannot even send it; other clients can, as JSON escapes)
    for stop in (b'"\\ud800"', b'["ok", "x\\udfff"]'):
        body = b'{"model": "tiny", "prompt": "x", "max_tokens": 2, "stop": ' + stop + b'}'
        r = post(gateway, "/v1/completions", content=body, headers={"content-type": "application/json"})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "stop" and "Unicode" in err["message"], r.text


class _Wrapped(torch.nn.Module):
    """The tiny model behind a hook: ``poison`` (a token id) in a prefill gives NaN logits, ``gate``
    (an Event) makes every forward wait for it. Stands in for a checkpoint with a NaN expert and for
    a hung expert call; the runner sees exactly what it would see from them."""

    def __init__(self, model, poison: int | None = None, gate=None):
        super().__init__()
        self.inner, self.poison, self.gate = model, poison, gate
        self.config, self.generation_config = model.config, model.generation_config
        import threading

        self.entered = threading.Event()  # set once a forward is waiting at the gate

    @property
    def device(self):
        return torch.device("cpu")

    def forward(self, input_ids=None, **kw):
        if self.gate is not None:
            self.entered.set()
            assert self.gate.wait(60)
        out = self.inner(input_ids=input_ids, **kw)
        if self.poison is not None and input_ids.shape[1] > 1 and bool((input_ids == self.poison).any()):
            out.logits = torch.full_like(out.logits, float("nan"))
        return out


def test_nan_logits_end_only_that_request_and_the_runner_lives(loaded):
    model, tok = loaded
    poison = tok("zebra", add_special_tokens=False).input_ids[0]
    runner = ModelRunner(_Wrapped(model, poison=poison), tok, name=MODEL)
    app = create_app(Settings(), runner, manage_runners=False)
    runner.start()
    try:
        bad = {"model": MODEL, "prompt": [[poison, 3, 4]], "max_tokens": 4, "temperature": 1.0, "seed": 1}
        r = post(app, "/v1/completions", json=bad)
        assert r.status_code == 500 and r.json()["error"]["code"] == "non_finite_logits", r.text
        assert "non-finite logits" in r.json()["error"]["message"]
        r = post(app, "/v1/completions", json={**bad, "stream": True})
        assert r.status_code == 500 and r.json()["error"]["code"] == "non_finite_logits", r.text
        good = post(app, "/v1/completions", json={"model": MODEL, "prompt": [[5, 6, 7]], "max_tokens": 4,
                                                  "temperature": 1.0, "seed": 1})
        assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 4
        health = get(app, "/healthz")
        assert health.status_code == 200 and health.json()["runners"][MODEL]["alive"] is True
    finally:
        runner.stop()
    assert get(app, "/healthz").status_code == 503  # a dead runner thread is reported


def test_a_stuck_runner_turns_healthz_red(loaded):
    import threading

    from eaas.testing import wait_for

    model, tok = loaded
    gate = threading.Event()
    runner = ModelRunner(_Wrapped(model, gate=gate), tok, name=MODEL)
    app = create_app(Settings(runner_stuck_s=0.5), runner, manage_runners=False)
    runner.start()

    async def scenario(client):
        request = asyncio.ensure_future(client.post("/v1/completions", json={"model": MODEL, "prompt": [[5, 6]],
                                                                            "max_tokens": 2}))
        deadline = asyncio.get_running_loop().time() + 30
        while (await client.get("/healthz")).status_code == 200:  # bounded: 30 s
            assert asyncio.get_running_loop().time() < deadline, "healthz never turned red"
            await asyncio.sleep(0.05)
        body = (await client.get("/healthz")).json()
        gate.set()  # the step finishes: healthy again, and the request completes
        return body, await request

    try:
        body, done = call(app, scenario)
        assert body["runners"][MODEL]["stuck"] is True and body["status"] == "unhealthy"
        assert done.status_code == 200
        wait_for(lambda: get(app, "/healthz").status_code == 200, 10, what="healthz green again")
    finally:
        gate.set()
        runner.stop()


async def _asgi_call_then_disconnect(app, path: str, body: bytes, leave: "asyncio.Event") -> list[dict]:
    """Drive the ASGI app like a server whose client sends ``body`` and goes away once ``leave`` is
    set (httpx's ASGI transport cannot disconnect before the response ends)."""
    sent = False
    messages: list[dict] = []

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        messages.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/octet-stream"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    await app(scope, receive, send)
    return messages


def test_disconnected_raw_calls_never_run_and_are_counted(loaded, caplog):
    """A raw layer forward queued behind a busy runner step, and a function invoke queued behind a
    busy expert client, are dropped when their clients disconnect: the work never runs, each
    cancellation is logged once at INFO and counted in /metrics."""
    import logging
    import threading

    model, tok = loaded
    gate = threading.Event()
    wrapped = _Wrapped(model, gate=gate)
    runner = ModelRunner(wrapped, tok, name=MODEL)
    client_lock, ran = threading.Lock(), []

    def invoker(function_id, x, cancelled=None):  # the contract ExpertClient.invoke implements
        with client_lock:
            if cancelled is not None and cancelled.is_set():
                from eaas.errors import Cancelled

                raise Cancelled("cancelled")
            ran.append(function_id)
            return x

    app = create_app(Settings(), runner, manage_runners=False, function_invoker=invoker)
    runner.start()
    caplog.set_level(logging.INFO, logger="eaas.gateway.cancel")

    async def scenario() -> tuple[list[dict], list[dict]]:
        loop = asyncio.get_running_loop()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=60) as c:
            busy = asyncio.ensure_future(c.post("/v1/completions", json={"model": MODEL, "prompt": [[5, 6]],
                                                                         "max_tokens": 1}))
            assert await loop.run_in_executor(None, wrapped.entered.wait, 30)  # the runner is mid-step
            client_lock.acquire()  # the expert client is busy with another call
            leave = asyncio.Event()
            layer = asyncio.ensure_future(_asgi_call_then_disconnect(
                app, f"/v1/layers/{MODEL}/1:forward", _st(hidden_states=torch.randn(2, 64)), leave))
            invoke = asyncio.ensure_future(_asgi_call_then_disconnect(
                app, "/v1/functions/tiny/0/1:invoke", _st(x=torch.randn(2, 64)), leave))
            for _ in range(3000):  # bounded: until the layer call waits in the runner's inbox
                if runner._inbox.qsize() >= 1:
                    break
                await asyncio.sleep(0.01)
            assert runner._inbox.qsize() >= 1
            leave.set()
            layer_msgs, invoke_msgs = await asyncio.wait_for(asyncio.gather(layer, invoke), 30)
            gate.set()
            client_lock.release()
            assert (await busy).status_code == 200
            metrics = (await c.get("/metrics")).text
            return layer_msgs, invoke_msgs, metrics

    try:
        layer_msgs, invoke_msgs, metrics = asyncio.run(scenario())
    finally:
        gate.set()
        runner.stop()
    assert layer_msgs[0]["status"] == 499 and invoke_msgs[0]["status"] == 499
    assert ran == []  # the invoke never reached the (stand-in) expert client's send
    lines = [r.getMessage() for r in caplog.records if "cancelled" in r.getMessage()]
    assert len(lines) == 2 and any("layer_forward" in m for m in lines) and any("function_invoke" in m for m in lines)
    assert 'eaas_gateway_cancellations_total{endpoint="layer_forward"} 1.0' in metrics
    assert 'eaas_gateway_cancellations_total{endpoint="function_invoke"} 1.0' in metrics


def test_overload_is_refused_at_once_and_admitted_requests_finish(loaded):
    """10x the queue bound of concurrent requests while the runner is busy: the excess gets 429 with
    Retry-After at once, no connection hangs, and every admitted request completes."""
    import threading

    model, tok = loaded
    gate = threading.Event()
    wrapped = _Wrapped(model, gate=gate)
    runner = ModelRunner(wrapped, tok, name=MODEL, max_waiting_requests=2)
    app = create_app(Settings(), runner, manage_runners=False)
    runner.start()
    body = {"model": MODEL, "prompt": [[5, 6, 7]], "max_tokens": 2}

    async def scenario(c):
        loop = asyncio.get_running_loop()
        first = asyncio.ensure_future(c.post("/v1/completions", json=body))
        assert await loop.run_in_executor(None, wrapped.entered.wait, 30)  # one request mid-prefill
        t0 = loop.time()
        rest = [asyncio.ensure_future(c.post("/v1/completions", json=body)) for _ in range(20)]
        done, _ = await asyncio.wait(rest, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        refused_after = loop.time() - t0
        while sum(t.done() for t in rest) < 18:  # bounded: every one is answered or admitted by now
            assert loop.time() - t0 < 30, "requests hang instead of being refused"
            await asyncio.sleep(0.01)
        gate.set()
        return refused_after, [await first] + [await t for t in rest], (await c.get("/metrics")).text

    try:
        refused_after, responses, metrics = call(app, scenario)
    finally:
        gate.set()
        runner.stop()
    codes = [r.status_code for r in responses]
    assert codes.count(429) == 18 and codes.count(200) == 3, codes
    assert refused_after < 5.0
    r429 = next(r for r in responses if r.status_code == 429)
    assert r429.headers["retry-after"] and r429.json()["error"]["code"] == "overloaded"
    assert f'eaas_gateway_rejected_total{{model="{MODEL}"}} 18.0' in metrics
