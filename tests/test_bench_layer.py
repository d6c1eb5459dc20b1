"""`eaas bench layer` end to end on a tiny layer: JSON shape, PNG, exactness held."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from eaas.bench.layer import run_layer_bench


def test_bench_layer_cli_json_and_png(tmp_path):
    png = tmp_path / "layer.png"
    p = subprocess.run(
        [sys.executable, "-m", "eaas.cli", "bench", "layer", "--tokens", "4,16", "--workers", "2", "--hidden", "64",
         "--intermediate", "128", "--experts", "4", "--top-k", "2", "--repeats", "1", "--warmup", "1",
         "--transport", "shm", "--inputs", "3", "--json", "--png", str(png)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout)
    assert out["benchmark"] == "layer"
    cfg = out["config"]
    assert cfg["exact"] is True and cfg["max_rel_err"] <= 1e-5
    assert cfg["hidden"] == 64 and cfg["intermediate"] == 128 and cfg["experts"] == 4 and cfg["top_k"] == 2
    assert cfg["workers"] == 2 and cfg["transports_used"] == ["shm"]
    assert cfg["thread_budget"]["monolithic_threads"] == cfg["thread_budget"]["total"] == 2
    assert cfg["client_failovers"] == 0
    assert cfg["inputs"] == 3  # three inputs per T, each EaaS output checked against its monolithic one
    # every block started after the other side was let settle: 2 T x 1 block (2 calls <= --block 5) x 2 sides
    assert cfg["settle"]["blocks"] == 4 and 0 <= cfg["settle"]["unsettled"] <= 4
    assert [r["tokens"] for r in out["rows"]] == [4, 16]
    for r in out["rows"]:
        assert {"tokens", "eaas_tokens_per_s", "monolithic_tokens_per_s", "ratio"} <= set(r)
        assert r["eaas_tokens_per_s"] > 0 and r["monolithic_tokens_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["eaas_tokens_per_s"] / r["monolithic_tokens_per_s"], rel=1e-9)
        assert r["max_rel_err"] <= 1e-5
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_layer_inline_transport_every_expert_on_both_workers():
    out = run_layer_bench([8], workers=2, replicas=2, hidden=32, intermediate=64, experts=4, top_k=2,
                          repeats=1, warmup=0, transport="inline")  # fmt: skip
    assert out["config"]["exact"] is True
    assert out["config"]["shards"] == ["*:0-3", "*:0-3"]
    assert out["config"]["transports_used"] == ["inline"]
    assert len(out["rows"]) == 1 and out["rows"][0]["tokens"] == 8


def test_settle_waits_for_a_running_process_and_not_for_a_sleeping_one():
    """The block switch's wait reads real thread states: a busy process counts as running
    until it is gone, a sleeping one never does (the settle would otherwise wait for nothing)."""
    from eaas.bench.layer import _running_threads, _settle

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    idle = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)  # blocks
    try:
        from eaas.testing import wait_for
        wait_for(lambda: _running_threads([busy.pid]) >= 1, 30, what="the busy loop running")
        wait_for(lambda: _running_threads([idle.pid]) == 0, 30, what="the sleeper asleep")
        assert _settle([idle.pid], timeout_s=5.0)
        assert not _settle([busy.pid], timeout_s=0.05)
    finally:
        busy.kill()
        idle.kill()
        busy.wait()
        idle.wait()
        idle.stdin.close()
    assert _running_threads([busy.pid, idle.pid]) == 0  # gone processes count as idle


def test_bench_layer_rejects_bad_arguments():
    with pytest.raises(ValueError):
        run_layer_bench([0])
    with pytest.raises(ValueError):
        run_layer_bench([1], inputs=0)
