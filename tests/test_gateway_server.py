"""`eaas gateway --monolithic` in a real uvicorn subprocess: serving, and client disconnects."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
from gateway_ckpt import gateway_process, write_gateway_checkpoint
from prometheus_client.parser import text_string_to_metric_families

from eaas.testing import wait_for


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = write_gateway_checkpoint(tmp_path_factory.mktemp("srv") / "tiny")
    with gateway_process(ckpt) as (url, _):
        yield url


def _metric(url: str, name: str, **labels: str) -> float:
    total = 0.0
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def _wait_cancelled(url: str, before: float) -> None:
    wait_for(lambda: _metric(url, "eaas_gateway_sequences_finished_total", reason="cancelled") > before, 10,
             interval_s=0.05, what="generation cancelled after the client disconnected")


LONG = {"model": "tiny", "prompt": "hello", "max_tokens": 240, "temperature": 0, "ignore_eos": True}


def test_real_server_completion(server):
    r = httpx.post(server + "/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 8,
                                                     "temperature": 0}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(server + "/v1/models").json()["data"][0]["id"] == "tiny"


def test_streaming_disconnect_stops_generation(server):
    before = _metric(server, "eaas_gateway_sequences_finished_total", reason="cancelled")
    tokens_before = _metric(server, "eaas_gateway_completion_tokens_total")
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", server + "/v1/completions", json={**LONG, "stream": True}) as r:
            assert r.status_code == 200
            for i, _ in enumerate(r.iter_lines()):
                if i >= 4:
                    break
    _wait_cancelled(server, before)
    assert _metric(server, "eaas_gateway_completion_tokens_total") - tokens_before < 240
    assert _metric(server, "eaas_gateway_running_sequences") == 0


def test_non_streaming_disconnect_stops_generation(server):
    before = _metric(server, "eaas_gateway_sequences_finished_total", reason="cancelled")
    tokens_before = _metric(server, "eaas_gateway_completion_tokens_total")
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server + "/v1/completions", json=LONG, timeout=httpx.Timeout(30, read=0.15))
    _wait_cancelled(server, before)
    assert _metric(server, "eaas_gateway_completion_tokens_total") - tokens_before < 240
    ok = httpx.post(server + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200


def test_bench_serve_json_against_running_gateway(server):
    import json

    r = subprocess.run(
        [sys.executable, "-m", "eaas.cli", "bench", "serve", "--url", server, "--concurrency", "1,4",
         "--requests-per-client", "1", "--max-tokens", "6", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["benchmark"] == "serve" and result["config"]["model"] == "tiny"
    keys = {"concurrency", "requests_per_s", "output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms",
            "itl_p50_ms", "itl_p99_ms", "failed_requests"}
    assert [row["concurrency"] for row in result["rows"]] == [1, 4]
    for row in result["rows"]:
        assert keys <= set(row) and row["failed_requests"] == 0 and row["output_tokens_per_s"] > 0


def test_sigterm_finishes_cleanly_with_exit_0(tmp_path):
    """Its own gateway (the module's server serves the tests above): SIGTERM after a
    request -> graceful uvicorn shutdown, exit 0, no traceback."""
    ckpt = write_gateway_checkpoint(tmp_path / "tiny")
    with gateway_process(ckpt, name=None) as (url, proc):
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200, r.text
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "stopped (SIGTERM)" in out, out
