"""`eaas registry ...` end to end in subprocesses, against the session's real Redis."""

from __future__ import annotations

import json
import subprocess
import sys

from eaas.registry import Registry, WorkerRecord, WorkerState
from eaas.registry.server import RedisServer, free_port


def eaas(env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "eaas.cli", *args], env=env, capture_output=True, text=True, timeout=60)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def _seed(registry: Registry) -> None:
    model = {"name": "tiny", "model_type": "mixtral", "num_layers": 2, "moe_layers": [0, 1], "num_experts": 2,
             "top_k": 2, "hidden_size": 8, "dtype": "float32", "checkpoint": "/ckpt"}
    fns = [{"id": f"tiny/{l}/{e}", "layer": l, "expert": e, "dtype": "float32", "nbytes": 96} for l in range(2) for e in range(2)]
    registry.register_model(model, fns)
    registry.register_worker(WorkerRecord(id="w-a", model="tiny", endpoint="tcp://127.0.0.1:5555",
                                          shard=("tiny/0/0", "tiny/0/1"), state=WorkerState.READY,
                                          queue_tokens=3, heartbeat_at_s=0.0, lease_ttl_s=30), ttl_s=30)


def test_listings_as_table_and_json(registry: Registry, eaas_env: dict) -> None:
    _seed(registry)
    models = json.loads(eaas(eaas_env, "registry", "models", "--json").stdout)
    assert [(m["name"], m["num_functions"]) for m in models] == [("tiny", 4)]
    fns = json.loads(eaas(eaas_env, "registry", "functions", "--json").stdout)
    assert {f["id"]: f["replicas"] for f in fns} == {"tiny/0/0": ["w-a"], "tiny/0/1": ["w-a"], "tiny/1/0": [], "tiny/1/1": []}
    workers = json.loads(eaas(eaas_env, "registry", "workers", "--json").stdout)
    assert workers[0]["id"] == "w-a" and workers[0]["state"] == "ready" and workers[0]["queue_tokens"] == 3
    assert workers[0]["shard"] == ["tiny/0/0", "tiny/0/1"]
    table = eaas(eaas_env, "registry", "workers").stdout
    assert "w-a" in table and "tcp://127.0.0.1:5555" in table and "ready" in table
    assert "tiny/1/1" in eaas(eaas_env, "registry", "functions", "--model", "tiny").stdout
    assert "tiny" in eaas(eaas_env, "registry", "models").stdout
    desc = json.loads(eaas(eaas_env, "registry", "describe", "tiny/0/1").stdout)
    assert desc["kind"] == "function" and desc["function"]["replicas"] == ["w-a"]
    assert json.loads(eaas(eaas_env, "registry", "describe", "w-a").stdout)["kind"] == "worker"


def test_drain_and_remove(registry: Registry, eaas_env: dict) -> None:
    _seed(registry)
    eaas(eaas_env, "registry", "drain", "w-a")
    assert registry.worker("w-a").state is WorkerState.DRAINING
    out = eaas(eaas_env, "registry", "remove", "tiny").stdout
    assert "removed model tiny (4 functions)" in out
    assert registry.model_names() == []


def test_unknown_ids_are_one_line_errors(registry: Registry, eaas_env: dict) -> None:
    _seed(registry)
    for args in (("describe", "nope"), ("remove", "nope"), ("drain", "nope"), ("functions", "--model", "nope")):
        p = eaas(eaas_env, "registry", *args, check=False)
        assert p.returncode == 1, args
        assert "Traceback" not in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and "nope" in p.stderr, p.stderr


def test_unreachable_redis_and_wrong_password(eaas_env: dict) -> None:
    env = dict(eaas_env, EAAS_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", EAAS_REDIS_TIMEOUT_S="0.5")
    p = eaas(env, "registry", "models", check=False)
    assert p.returncode == 1 and "cannot reach redis" in p.stderr and "Traceback" not in p.stderr
    with RedisServer(password="pw") as server:
        env = dict(eaas_env, EAAS_REDIS_URL=server.url.replace(":pw@", ":bad@"))
        p = eaas(env, "registry", "workers", check=False)
        assert p.returncode == 1 and "credentials" in p.stderr and "Traceback" not in p.stderr


def test_no_deployment_found_says_so(eaas_env: dict) -> None:
    env = {k: v for k, v in eaas_env.items() if k != "EAAS_REDIS_URL"}
    p = eaas(env, "registry", "models", check=False)
    assert p.returncode == 1 and "no EaaS deployment found" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_eaas_redis_is_found_by_admin_commands(eaas_env: dict) -> None:
    env = {k: v for k, v in eaas_env.items() if k != "EAAS_REDIS_URL"}
    proc = subprocess.Popen([sys.executable, "-m", "eaas.cli", "redis"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("redis://127.0.0.1:")
        assert json.loads(eaas(env, "registry", "models", "--json").stdout) == []
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
    p = eaas(env, "registry", "models", check=False)
    assert p.returncode == 1 and "no EaaS deployment found" in p.stderr


def test_a_bad_setting_names_its_variable_and_value_before_anything_starts(eaas_env: dict, tmp_path) -> None:
    """An invalid EAAS_* value or flag is one line naming the variable, the value and what is
    expected; ``eaas up`` refuses before it starts Redis or a worker (no state file written)."""
    env = {**eaas_env, "EAAS_STATE_DIR": str(tmp_path / "state")}
    p = eaas({**env, "EAAS_EXPERT_KERNEL": "bogus"}, "worker", "--model", "m", "--shard", "all", check=False)
    assert p.returncode == 1
    assert "invalid setting: EAAS_EXPERT_KERNEL='bogus': Input should be 'eager' or 'onednn'" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    p = eaas(env, "up", "--torch-threads", "0", "--port", "0", check=False)
    assert p.returncode == 1
    assert "invalid setting: EAAS_TORCH_THREADS=0: Input should be greater than or equal to 1" in p.stderr, p.stderr
    assert "private Redis" not in p.stderr and not (tmp_path / "state" / "deployment.json").exists()
