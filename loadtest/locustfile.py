"""Locust load test of an EaaS gateway (``eaas up``).

User classes (pick some by name on the command line, default all, by weight):

- ``CompletionUser`` — ``POST /v1/completions``, short and long prompts, ``max_tokens``
  drawn from a clipped log-normal distribution (median ``EAAS_LT_MAX_TOKENS_MEDIAN``,
  at most ``EAAS_LT_MAX_TOKENS_MAX``). Names ``completion [short]``, ``completion [long]``.
- ``StreamUser`` — the same with ``stream: true`` (SSE until ``data: [DONE]``). The
  request's time is the whole stream; time to first token and every inter-token gap
  are reported as custom metrics: type ``TTFT`` / ``ITL``, name ``stream``.
- ``LayerUser`` — ``POST /v1/layers/{model}/{layer}:forward`` with a safetensors body
  ``hidden_states[T, D]`` float32 (T from 1 to ``EAAS_LT_LAYER_MAX_TOKENS``); the reply
  is parsed and its shape checked. Name ``layer forward``.

Host: ``--host`` if given, else the gateway in the state file ``eaas up`` writes
(``$EAAS_STATE_DIR/deployment.json``, default ``~/.cache/eaas``), else
``http://127.0.0.1:8000``. API key: ``EAAS_API_KEY``, else the first of ``EAAS_API_KEYS``.
Load shape: ``EAAS_LT_SHAPE=step|spike|diurnal`` (see ``shapes.py``).

Other settings: ``EAAS_LT_MODEL`` (tiny-mixtral), ``EAAS_LT_HIDDEN`` (64),
``EAAS_LT_LAYERS`` (``0,1``), ``EAAS_LT_LONG_WORDS`` (words of a long prompt, ``24-72``: about
100-300 tokens of the tiny model, which holds 512), ``EAAS_LT_WAIT_S`` (think time upper bound, 0.2),
``EAAS_LT_SEED``.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

from locust import HttpUser, between, events, task

import shapes as _shapes  # the module only: its classes are abstract and never picked up by themselves

MODEL = os.environ.get("EAAS_LT_MODEL", "tiny-mixtral")
HIDDEN = int(os.environ.get("EAAS_LT_HIDDEN", "64"))
LAYERS = [int(x) for x in os.environ.get("EAAS_LT_LAYERS", "0,1").split(",") if x.strip()]
LAYER_MAX_TOKENS = int(os.environ.get("EAAS_LT_LAYER_MAX_TOKENS", "32"))
MAX_TOKENS_MEDIAN = float(os.environ.get("EAAS_LT_MAX_TOKENS_MEDIAN", "12"))
MAX_TOKENS_MAX = int(os.environ.get("EAAS_LT_MAX_TOKENS_MAX", "48"))
LONG_MIN_WORDS, LONG_MAX_WORDS = (int(x) for x in os.environ.get("EAAS_LT_LONG_WORDS", "24-72").split("-"))
WAIT_S = float(os.environ.get("EAAS_LT_WAIT_S", "0.2"))
TIMEOUT_S = float(os.environ.get("EAAS_LT_TIMEOUT_S", "120"))

_rng = random.Random(int(os.environ.get("EAAS_LT_SEED", "0")))
_WORDS = ("expert model token layer router shard replica worker gateway client request batch "
          "latency throughput failover lease heartbeat queue cache attention").split()


def default_host() -> str:
    """The gateway of the running ``eaas up`` (state file), else ``http://127.0.0.1:8000``."""
    state_dir = Path(os.environ.get("EAAS_STATE_DIR") or Path.home() / ".cache" / "eaas")
    try:
        url = json.loads((state_dir / "deployment.json").read_text()).get("gateway_url")
    except (OSError, ValueError):
        url = None
    return url or "http://127.0.0.1:8000"


def api_headers() -> dict[str, str]:
    """``Authorization: Bearer`` from ``EAAS_API_KEY`` or the first of ``EAAS_API_KEYS`` (none if unset)."""
    key = os.environ.get("EAAS_API_KEY") or (os.environ.get("EAAS_API_KEYS") or "").split(",")[0].strip()
    return {"Authorization": f"Bearer {key}"} if key else {}


def draw_max_tokens(rng: random.Random = _rng) -> int:
    """``max_tokens`` from a log-normal (median ``MAX_TOKENS_MEDIAN``, sigma 0.6) clipped to [1, MAX]."""
    return max(1, min(MAX_TOKENS_MAX, round(rng.lognormvariate(math.log(MAX_TOKENS_MEDIAN), 0.6))))


def make_prompt(num_words: int, rng: random.Random = _rng) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(num_words))


def _fire(request_type: str, name: str, value_ms: float) -> None:
    """Report a custom metric through Locust's request event (appears in stats, CSV and HTML)."""
    events.request.fire(request_type=request_type, name=name, response_time=value_ms, response_length=0,
                        exception=None, context={})


class _GatewayUser(HttpUser):
    abstract = True
    host = default_host()
    wait_time = between(0.0, WAIT_S)

    def on_start(self) -> None:
        self.client.headers.update(api_headers())


class CompletionUser(_GatewayUser):
    """Non-streamed text completions: short prompts three times as often as long ones."""

    weight = 3

    def _complete(self, name: str, prompt: str) -> None:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": draw_max_tokens(), "temperature": 0.8,
                "top_p": 0.95, "seed": _rng.randrange(1 << 30)}
        with self.client.post("/v1/completions", json=body, name=name, timeout=TIMEOUT_S,
                              catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            try:
                usage = resp.json()["usage"]
            except (ValueError, KeyError) as e:
                resp.failure(f"bad body: {e!r}")
                return
            if usage.get("completion_tokens", 0) < 1:
                resp.failure(f"no completion tokens: {usage}")

    @task(3)
    def short_prompt(self) -> None:
        self._complete("completion [short]", make_prompt(_rng.randint(3, 12)))

    @task(1)
    def long_prompt(self) -> None:
        self._complete("completion [long]", make_prompt(_rng.randint(LONG_MIN_WORDS, LONG_MAX_WORDS)))


class StreamUser(_GatewayUser):
    """Streamed completions (SSE); time to first token and inter-token latency as custom metrics."""

    weight = 2

    @task
    def stream(self) -> None:
        body = {"model": MODEL, "prompt": make_prompt(_rng.randint(3, 24)), "max_tokens": draw_max_tokens(),
                "temperature": 0.8, "seed": _rng.randrange(1 << 30), "stream": True}
        t0 = time.perf_counter()
        first_s: float | None = None
        last_s = t0
        gaps_ms: list[float] = []
        done = False
        with self.client.post("/v1/completions", json=body, name="completion [stream]", stream=True,
                              timeout=TIMEOUT_S, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            try:
                for line in resp.iter_lines(decode_unicode=True):
                    if not line or not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        resp.failure(f"error event: {chunk['error']}")
                        return
                    if not chunk["choices"][0].get("token_ids"):
                        continue
                    now = time.perf_counter()
                    if first_s is None:
                        first_s = now
                    else:
                        gaps_ms.append((now - last_s) * 1000.0)
                    last_s = now
            except Exception as e:  # noqa: BLE001 - a broken stream is a failed request
                resp.failure(f"stream broken: {e!r}")
                return
            resp.request_meta["response_time"] = (time.perf_counter() - t0) * 1000.0  # the whole stream
            if not done:
                resp.failure("stream ended without data: [DONE]")
                return
        if first_s is not None:
            _fire("TTFT", "stream", (first_s - t0) * 1000.0)
        for gap in gaps_ms:
            _fire("ITL", "stream", gap)


class LayerUser(_GatewayUser):
    """Raw MoE layer forwards: safetensors ``hidden_states[T, D]`` float32 in and out."""

    weight = 1

    @task
    def layer_forward(self) -> None:
        import numpy as np
        from safetensors.numpy import load, save

        num_tokens = _rng.randint(1, LAYER_MAX_TOKENS)
        layer = _rng.choice(LAYERS)
        x = np.random.default_rng(_rng.randrange(1 << 30)).standard_normal((num_tokens, HIDDEN)).astype(np.float32)
        with self.client.post(f"/v1/layers/{MODEL}/{layer}:forward", data=save({"hidden_states": x}),
                              headers={"Content-Type": "application/octet-stream"}, name="layer forward",
                              timeout=TIMEOUT_S, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            try:
                y = load(resp.content)["hidden_states"]
            except Exception as e:  # noqa: BLE001
                resp.failure(f"bad safetensors reply: {e!r}")
                return
            if y.shape != x.shape or not np.isfinite(y).all():
                resp.failure(f"reply shape {y.shape}, expected {x.shape} (or non-finite values)")


_shape = _shapes.select_shape(os.environ.get("EAAS_LT_SHAPE"))
if _shape is not None:
    LoadShape = _shape
