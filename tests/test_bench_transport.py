"""`eaas bench transport` end to end on small payloads: JSON shape, ratios, PNG, and
the interleaved block sampling it relies on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from eaas.bench.transport import _time_interleaved, parse_size


def test_bench_transport_cli_json_and_png(tmp_path):
    png = tmp_path / "transport.png"
    scratch = tmp_path / "tmp"  # the run's TMPDIR: its peers' socket folder must not outlive it
    scratch.mkdir()
    p = subprocess.run(
        [sys.executable, "-m", "eaas.cli", "bench", "transport", "--sizes", "64K,1M", "--transports",
         "inline_ipc,inline_tcp,shm", "--iters", "12", "--block", "4", "--json", "--png", str(png)],
        capture_output=True, text=True, timeout=240, env={**os.environ, "TMPDIR": str(scratch)},
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert list(scratch.iterdir()) == []
    out = json.loads(p.stdout)
    assert out["benchmark"] == "transport"
    assert out["config"]["block"] == 4 and out["config"]["transports"] == ["inline_ipc", "inline_tcp", "shm"]
    rows = out["rows"]
    names = {"copy_x2", "zmq_bare_ipc", "inline_ipc", "inline_tcp", "shm"}
    assert {(r["transport"], r["payload_bytes"]) for r in rows} == {(n, s) for n in names for s in (65536, 1 << 20)}
    for size in (65536, 1 << 20):
        by = {r["transport"]: r for r in rows if r["payload_bytes"] == size}
        copy_p50 = by["copy_x2"]["rtt_p50_us"]
        for r in by.values():
            assert set(r) == {"transport", "payload_bytes", "rtt_p50_us", "rtt_p99_us", "bandwidth_gbps",
                              "ratio_vs_copy"}
            assert 0 < r["rtt_p50_us"] <= r["rtt_p99_us"]
            assert r["ratio_vs_copy"] == pytest.approx(copy_p50 / r["rtt_p50_us"], abs=2e-3, rel=2e-2)
            assert r["bandwidth_gbps"] == pytest.approx(2 * size * 8 / (r["rtt_p50_us"] * 1e3), rel=2e-2)
    checks = out["checks"]
    by_65k = {r["transport"]: r for r in rows if r["payload_bytes"] == 65536}
    assert checks["smallest_payload_bytes"] == 65536
    assert isinstance(checks["shm_smallest_within_2x_bare_zmq"], bool)
    assert isinstance(checks["inline_smallest_within_2x_bare_zmq"], bool)
    assert checks["shm_ratio_vs_copy_ge_0.6_at_4MiB_plus"] is None  # no payload >= 4 MiB in this run
    assert checks["shm_smallest_within_2x_bare_zmq"] == (
        by_65k["shm"]["rtt_p50_us"] <= 2 * by_65k["zmq_bare_ipc"]["rtt_p50_us"])
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("iters", "block"), [(7, 1), (30, 4), (30, 50), (12, 5)])
def test_time_interleaved_blocks_rotate_and_count(iters, block):
    calls: list[str] = []
    fns = {n: (lambda n=n: calls.append(n)) for n in ("a", "b", "c")}
    stats = _time_interleaved(fns, iters, warmup=2, block=block)
    assert set(stats) == {"a", "b", "c"}
    timed = calls[6:]  # after 2 warm-up calls each
    assert sorted(timed) == sorted(["a", "b", "c"] * iters)  # exactly `iters` samples of each
    eff = max(1, min(block, iters // 6))
    runs = [timed[0]]
    lengths = [1]
    for n in timed[1:]:
        if n == runs[-1]:
            lengths[-1] += 1
        else:
            runs.append(n)
            lengths.append(1)
    assert max(lengths) <= 2 * eff  # a block may only meet the next round's same name at a seam
    firsts = [timed[i * 3 * eff] for i in range(min(3, iters // eff))]
    assert len(set(firsts)) == len(firsts)  # the order rotates from round to round


def test_parse_size():
    assert parse_size("64K") == 65536 and parse_size("4MiB") == 4 << 20 and parse_size("1000") == 1000
