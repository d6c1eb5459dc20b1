"""The main job end to end: `eaas up` in a subprocess, real HTTP requests, workers killed under it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from gateway_ckpt import greedy_reference
from prometheus_client.parser import text_string_to_metric_families

from eaas.registry import Registry
from eaas.registry.server import free_port
from eaas.testing import wait_for

PROMPT = "The expert said"
MODEL = "pydoc-mixtral"  # the default: trained on Python's documentation, shipped in the package


class Up:
    def __init__(self, proc: subprocess.Popen, url: str, env: dict, cache: Path) -> None:
        self.proc, self.url, self.env, self.cache = proc, url, env, cache

    @property
    def checkpoint(self) -> Path:
        from eaas.deploy import packaged_model_dir

        return packaged_model_dir()

    def registry(self) -> Registry:
        state = json.loads((Path(self.env["EAAS_STATE_DIR"]) / "deployment.json").read_text())
        return Registry.from_url(state["redis_url"], state["prefix"])


@pytest.fixture(scope="module")
def up(tmp_path_factory) -> Iterator[Up]:  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("up")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EAAS_")}
    env.update(EAAS_STATE_DIR=str(tmp / "state"), EAAS_CACHE_DIR=str(tmp / "cache"), EAAS_PREFIX="e2e",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", COLUMNS="200",
               EAAS_REQUEST_TIMEOUT_MS="3000")  # embedded default: no EAAS_REDIS_URL -> a private Redis
    port = free_port()
    log = open(tmp / "up.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "eaas.cli", "up", "--port", str(port), "--workers", "3",
                             "--no-autoscale"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, (tmp / "up.log").read_text()[-3000:]
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, 180, interval_s=0.2, what="eaas up /readyz")
        yield Up(proc, url, env, tmp / "cache")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


@pytest.fixture(scope="module")
def reference(up: Up):  # type: ignore[no-untyped-def]
    return greedy_reference(up.checkpoint)


def _complete(up: Up, **body: object) -> dict:
    r = httpx.post(f"{up.url}/v1/completions", json={"model": MODEL, **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_greedy_completion_equals_transformers_generate(up: Up, reference) -> None:  # type: ignore[no-untyped-def]
    out = _complete(up, prompt=PROMPT, max_tokens=24, temperature=0, ignore_eos=True)
    assert out["choices"][0]["token_ids"] == reference(PROMPT, 24)
    assert out["usage"]["completion_tokens"] == 24


def test_the_default_model_answers_readable_english(up: Up) -> None:
    """A random-weight model answers byte soup (partial UTF-8, punctuation runs); the trained one words."""
    text = _complete(up, prompt="The with statement is used to", max_tokens=24, temperature=0)["choices"][0]["text"]
    words = text.split()
    assert "\ufffd" not in text and text.isascii(), text
    assert len(words) >= 8 and sum(w.strip(".,:;()*\"'").isalpha() for w in words) / len(words) >= 0.6, text


def test_streamed_completion_gives_the_same_tokens(up: Up, reference) -> None:  # type: ignore[no-untyped-def]
    tokens, done = [], False
    with httpx.stream("POST", f"{up.url}/v1/completions", timeout=120,
                      json={"model": MODEL, "prompt": PROMPT, "max_tokens": 24, "temperature": 0,
                            "stream": True, "ignore_eos": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            tokens += json.loads(line[6:])["choices"][0].get("token_ids") or []
    assert done and tokens == reference(PROMPT, 24)


def test_models_and_metrics_parse(up: Up) -> None:
    models = httpx.get(f"{up.url}/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    _complete(up, prompt="count the calls", max_tokens=2, temperature=0)
    text = httpx.get(f"{up.url}/metrics", timeout=10).text
    calls = {s.labels.get("model"): s.value for f in text_string_to_metric_families(text)
             if f.name == "eaas_expert_calls" for s in f.samples if s.name == "eaas_expert_calls_total"}
    assert calls.get(MODEL, 0) > 0, calls  # the expert client's calls, labelled with its model


def test_chat_completion_on_the_default_model(up: Up) -> None:
    r = httpx.post(f"{up.url}/v1/chat/completions", timeout=120,
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert r.status_code == 200, r.text  # the tiny checkpoint's tokenizer has a chat template
    choice = r.json()["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")


def test_eight_concurrent_completions_share_forward_passes(up: Up, reference) -> None:  # type: ignore[no-untyped-def]
    prompts = [f"{PROMPT} {i}" for i in range(8)]
    results: dict[int, dict] = {}

    def one(i: int) -> None:
        results[i] = _complete(up, prompt=prompts[i], max_tokens=16, temperature=0, ignore_eos=True)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert sorted(results) == list(range(8))
    for i in range(8):
        assert results[i]["choices"][0]["token_ids"] == reference(prompts[i], 16)
    text = httpx.get(f"{up.url}/metrics", timeout=10).text
    batched = 0.0
    for fam in text_string_to_metric_families(text):
        if fam.name == "eaas_gateway_batch_size":
            for s in fam.samples:
                if s.name.endswith("_bucket") and s.labels.get("le") == "1.0":
                    ones = s.value
                if s.name.endswith("_count"):
                    count = s.value
            batched = count - ones
    assert batched >= 1, "no decode step ever batched more than one sequence"


def test_worker_sigkill_during_a_completion(up: Up, reference) -> None:  # type: ignore[no-untyped-def]
    reg = up.registry()
    victims = [w for w in reg.workers(MODEL)]
    assert len(victims) == 3
    tokens, killed = [], False
    with httpx.stream("POST", f"{up.url}/v1/completions", timeout=180,
                      json={"model": MODEL, "prompt": PROMPT, "max_tokens": 48, "temperature": 0,
                            "stream": True, "ignore_eos": True}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            tokens += json.loads(line[6:])["choices"][0].get("token_ids") or []
            if len(tokens) >= 4 and not killed:
                os.kill(victims[0].pid, signal.SIGKILL)
                killed = True
    assert killed and tokens == reference(PROMPT, 48)
    # the pool keeps serving on the survivors
    out = _complete(up, prompt="again", max_tokens=8, temperature=0, ignore_eos=True)
    assert out["choices"][0]["token_ids"] == reference("again", 8)


def test_bad_input_gets_4xx_and_the_gateway_keeps_serving(up: Up) -> None:
    post = lambda **kw: httpx.post(f"{up.url}/v1/completions", timeout=30, **kw)  # noqa: E731
    assert post(content=b"{not json", headers={"content-type": "application/json"}).status_code in (400, 422)
    assert post(json={"model": MODEL, "prompt": PROMPT, "max_tokens": "many"}).status_code in (400, 422)
    assert post(json={"model": MODEL, "prompt": PROMPT, "max_tokens": 10**7}).status_code == 400
    assert post(json={"model": "nope", "prompt": PROMPT}).status_code == 404
    assert _complete(up, prompt=PROMPT, max_tokens=2, temperature=0)["usage"]["completion_tokens"] == 2


def test_sigterm_stops_everything_cleanly(up: Up) -> None:
    reg = up.registry()
    pids = [w.pid for w in reg.workers()]
    assert pids
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(90) == 0

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(lambda: all(gone(p) for p in pids), 30, what="workers exited")
    assert not (Path(up.env["EAAS_STATE_DIR"]) / "deployment.json").exists()


def test_worker_logs_live_in_a_folder_of_this_deployment(up: Up) -> None:
    logs = Path(up.env["EAAS_STATE_DIR"]) / "logs"
    (folder,) = [d for d in logs.iterdir() if d.is_dir()]
    assert folder.name.startswith("up-") and folder.name.endswith(f"-{up.proc.pid}")
    worker_logs = sorted(folder.glob("*.log"))
    assert len(worker_logs) == 3, worker_logs  # --workers 3, one file each
    assert not list(logs.glob("*.log"))  # nothing loose beside the per-deployment folders


def test_old_deployment_log_folders_are_pruned(tmp_path: Path) -> None:
    from eaas.deploy import deployment_log_dir

    logs = tmp_path / "logs"
    for i in range(7):
        (logs / f"up-20260101-00000{i}-1").mkdir(parents=True)
    (logs / "loose-worker.log").write_text("from an old version")
    new = deployment_log_dir(tmp_path, keep=3)
    kept = sorted(d.name for d in logs.iterdir())
    assert new.is_dir() and new.name in kept
    assert kept == sorted(["up-20260101-000005-1", "up-20260101-000006-1", new.name])
