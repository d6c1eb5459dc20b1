"""Locust load tests against a real `eaas up`: a clean headless run, and the fault scenario (SIGKILLs)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# never import locust here: it monkey-patches the whole process with gevent; it runs in subprocesses
if importlib.util.find_spec("locust") is None:
    pytest.skip("locust is not installed (pip install -e '.[loadtest]')", allow_module_level=True)

from eaas.bench.harness import UpProcess, ready_workers, wait_pool_size  # noqa: E402

LOADTEST = Path(__file__).resolve().parents[1] / "loadtest"
NAMES = {("POST", "completion [short]"), ("POST", "completion [long]"), ("POST", "completion [stream]"),
         ("POST", "layer forward"), ("TTFT", "stream"), ("ITL", "stream")}

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def up(tmp_path_factory, tiny_checkpoint) -> Iterator[UpProcess]:  # type: ignore[no-untyped-def]
    # the tiny Mixtral (D=64, float32): the shapes the locustfile's layer-forward task sends by default
    with UpProcess(tmp_path_factory.mktemp("lt"), workers=3, replicas=2, autoscale=True, ready_timeout_s=180,
                   model_dir=tiny_checkpoint("mixtral")) as u:
        yield u


_SHAPES_CHECK = """
import shapes
step, spike, diurnal = (shapes.select_shape(n)() for n in ("step", "spike", "diurnal"))
assert [step.users_at(t) for t in (0, 9.9, 10, 25, 100)] == [3, 3, 6, 7, 7]
assert [spike.users_at(t) for t in (0, 39, 40, 59, 60)] == [2, 2, 7, 7, 2]
assert diurnal.users_at(0) == 2 and diurnal.users_at(60) == 7
assert shapes.select_shape(None) is None and not shapes.select_shape("step").abstract
try:
    shapes.select_shape("square")
except ValueError as e:
    assert "unknown shape" in str(e)
else:
    raise AssertionError("no error for an unknown shape")
"""


def test_shapes_follow_their_env() -> None:
    env = {"EAAS_LT_STEP_USERS": "3", "EAAS_LT_STEP_S": "10", "EAAS_LT_MAX_USERS": "7", "EAAS_LT_BASE_USERS": "2"}
    proc = subprocess.run([sys.executable, "-c", _SHAPES_CHECK], cwd=LOADTEST, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def _locust(up: UpProcess, out: Path, users: int, run_time_s: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "locust", "-f", str(LOADTEST / "locustfile.py"), "--headless", "-u", str(users),
           "-r", str(users), "-t", f"{run_time_s}s", "--stop-timeout", "20", "--csv", str(out / "lt"),
           "--html", str(out / "lt.html"), "--only-summary"]
    env = dict(up.env)  # no --host: the locustfile finds the gateway in the state file
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=run_time_s + 60)


def _stats(out: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(out / "lt_stats.csv", newline="") as f:
        return {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}


def test_headless_locust_run_has_no_failures(up: UpProcess, tmp_path: Path) -> None:
    proc = _locust(up, tmp_path, users=10, run_time_s=20)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stats = _stats(tmp_path)
    assert NAMES <= set(stats), sorted(stats)
    for key in NAMES:
        assert int(stats[key]["Request Count"]) > 0, key
    assert all(r["Failure Count"] == "0" for r in stats.values()), stats
    assert (tmp_path / "lt.html").stat().st_size > 0


def test_fault_scenario_kills_workers_without_failed_requests(up: UpProcess, tmp_path: Path) -> None:
    reg = up.registry()
    size = len(ready_workers(reg))
    assert size == 3
    proc = subprocess.run([sys.executable, str(LOADTEST / "run.py"), "--attach", str(up.workdir / "state"),
                           "--out", str(tmp_path), "--duration-s", "25", "--users", "6", "--kill-interval-s", "6",
                           "--kills", "2", "--recover-timeout-s", "90"],
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["kills"] >= 1 and summary["failed_requests"] == 0, summary
    with open(tmp_path / "kills.csv", newline="") as f:
        kills = list(csv.DictReader(f))
    assert len(kills) == summary["kills"]
    assert (tmp_path / "throughput_p99.png").stat().st_size > 10_000
    # the autoscaler replaced every victim: the pool is back to its size with none of them in it
    wait_pool_size(reg, size, 90)
    assert not {k["worker_id"] for k in kills} & {w.id for w in ready_workers(reg)}
    # and it still serves
    import httpx

    r = httpx.post(f"{up.url}/v1/completions", json={"model": "tiny-mixtral", "prompt": "again", "max_tokens": 4},
                   timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
