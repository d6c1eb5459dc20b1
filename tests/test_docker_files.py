"""docker/: what can be checked without a container engine.

- every ``eaas ...`` command line the images, the compose file and the manifests run
  parses with the real CLI (known subcommands, known flags, valid values, required
  options present) — parsed with the click command object, nothing is run;
- compose and manifests are valid YAML and set only EAAS_* variables the settings
  object (or the autoscaler's config) defines;
- the URL every KEDA trigger reads is served by ``eaas autoscaler --publish-only``,
  started with the manifest's own arguments and env against a real Redis with a real
  worker registered, and holds the desired replicas where ``valueLocation`` says;
- a worker binds one address and advertises another (loopback aliases), its id comes
  from POD_NAME, and the readiness / preStop commands of the manifests behave.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import torch
import typer
import yaml

from eaas.cli import app
from eaas.platform.autoscale.config import ENV_PREFIX as AUTOSCALER_ENV_PREFIX
from eaas.platform.autoscale import AutoscalerConfig
from eaas.settings import Settings
from eaas.testing import start_worker, wait_for, wait_workers_ready

try:  # typer >= 0.25 carries its own copy of click
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover - older typer on plain click
    from click import ClickException, UsageError  # type: ignore[assignment]

DOCKER = Path(__file__).resolve().parents[1] / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"]
COMPOSE = DOCKER / "compose.yaml"
K8S = sorted((DOCKER / "k8s").glob("*.yaml"))
OUR_IMAGES = ("eaas:", "eaas")  # image names of our own image (compose tag / k8s name)


# --- collecting command lines ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CommandLine:
    where: str
    argv: tuple[str, ...]  # starts with "eaas"


_SPLIT = {"&&", "||", ";", "|", "&", "(", ")", "\n"}
_REDIRECT = {">", ">>", "<", ">&", "<&", "&>", ">|"}
_KEYWORDS = {"exec", "until", "while", "do", "then", "else", "if", "!", "time"}


def _shell_eaas_commands(script: str) -> list[list[str]]:
    """The ``eaas ...`` simple commands of a POSIX shell snippet (quoting respected)."""
    lex = shlex.shlex(script, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    tokens = list(lex)
    commands: list[list[str]] = [[]]
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok in _SPLIT or set(tok) <= set("&|;()"):
            commands.append([])
        elif tok in _REDIRECT:
            i += 1  # skip the target
        elif tok.isdigit() and i + 1 < len(tokens) and tokens[i + 1] in _REDIRECT:
            pass  # "2>&1": the fd number
        else:
            commands[-1].append(tok)
        i += 1
    out = []
    for cmd in commands:
        while cmd and cmd[0] in _KEYWORDS:
            cmd = cmd[1:]
        if cmd and cmd[0] == "eaas":
            out.append(cmd)
    return out


def _argv_commands(argv: list[str], where: str) -> list[CommandLine]:
    """Command lines of an exec-form argv: ``eaas ...`` directly, or inside ``sh -c``."""
    argv = [str(a) for a in argv]
    if not argv:
        return []
    if argv[0] in ("sh", "/bin/sh", "bash", "/bin/bash") and "-c" in argv:
        script = argv[argv.index("-c") + 1]
        return [CommandLine(where, tuple(c)) for c in _shell_eaas_commands(script)]
    if argv[0] == "eaas":
        return [CommandLine(where, tuple(argv))]
    return []


def _dockerfile_commands(path: Path) -> list[CommandLine]:
    text = path.read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, re.M).group(1))  # type: ignore[union-attr]
    cmd = json.loads(re.search(r"^CMD\s+(\[.*\])\s*$", text, re.M).group(1))  # type: ignore[union-attr]
    return _argv_commands(entry + cmd, f"{path.name}: ENTRYPOINT+CMD")


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _compose_commands() -> list[CommandLine]:
    out: list[CommandLine] = []
    for name, svc in _compose()["services"].items():
        if not str(svc.get("image", "")).startswith(OUR_IMAGES) or svc.get("entrypoint") == ["locust"]:
            continue
        entry = svc.get("entrypoint", ["eaas"])
        command = svc.get("command", [])
        entry = shlex.split(entry) if isinstance(entry, str) else entry
        command = shlex.split(command) if isinstance(command, str) else command
        # compose turns "$$" into "$" before the container sees it
        argv = [str(a).replace("$$", "$") for a in [*entry, *command]]
        out += _argv_commands(argv, f"compose {name}")
        test = (svc.get("healthcheck") or {}).get("test")
        if isinstance(test, list) and test and test[0] == "CMD-SHELL":
            out += _argv_commands(["sh", "-c", test[1].replace("$$", "$")], f"compose {name} healthcheck")
    return out


def _k8s_docs() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in K8S for d in yaml.safe_load_all(p.read_text()) if d]


def _pod_spec(doc: dict) -> dict | None:
    spec = doc.get("spec") or {}
    tmpl = spec.get("template") or spec.get("jobTemplate", {}).get("spec", {}).get("template")
    return (tmpl or {}).get("spec")


def _containers(doc: dict) -> list[dict]:
    pod = _pod_spec(doc)
    return [] if pod is None else [*pod.get("initContainers", []), *pod.get("containers", [])]


def _k8s_commands() -> list[CommandLine]:
    out: list[CommandLine] = []
    for fname, doc in _k8s_docs():
        for c in _containers(doc):
            where = f"{fname} {doc['metadata']['name']}/{c['name']}"
            if not str(c.get("image", "")).startswith(OUR_IMAGES):
                continue
            # our image's ENTRYPOINT is ["eaas"]: args alone run eaas
            argv = c["command"] + c.get("args", []) if "command" in c else ["eaas", *c.get("args", [])]
            out += _argv_commands(argv, where)
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                if "exec" in c.get(probe, {}):
                    out += _argv_commands(c[probe]["exec"]["command"], f"{where} {probe}")
            pre = c.get("lifecycle", {}).get("preStop", {})
            if "exec" in pre:
                out += _argv_commands(pre["exec"]["command"], f"{where} preStop")
    return out


ALL_COMMANDS = [
    *[c for p in DOCKERFILES for c in _dockerfile_commands(p)],
    *_compose_commands(),
    *_k8s_commands(),
]


# --- parsing with the real CLI --------------------------------------------------------------


def _parse(argv: tuple[str, ...]) -> tuple[str, dict]:
    """Parse ``argv`` with the eaas click command tree (nothing runs); return (path, params).

    Raises:
        ClickException: unknown command or option, bad value, missing required option.
    """
    cmd = typer.main.get_command(app)
    args = list(argv[1:])
    if args == ["--help"]:  # the images' default CMD: eager, would print and exit
        return "eaas --help", {}
    ctx = None
    names = ["eaas"]
    while True:
        ctx = cmd.make_context(names[-1], args, parent=ctx, resilient_parsing=False)
        if not hasattr(cmd, "resolve_command"):  # a leaf command
            return " ".join(names), dict(ctx.params)
        rest = [*getattr(ctx, "_protected_args", getattr(ctx, "protected_args", [])), *ctx.args]
        if not rest:
            raise UsageError(f"{' '.join(names)}: no subcommand")
        sub_name, sub, args = cmd.resolve_command(ctx, rest)
        if sub is None:
            raise UsageError(f"no such command {rest[0]!r}")
        cmd = sub
        names.append(sub_name or rest[0])


def test_command_lines_were_found() -> None:
    """The collector sees every role's command (a parser that finds nothing proves nothing)."""
    paths = {_parse(c.argv)[0] for c in ALL_COMMANDS}
    for expected in ("eaas worker", "eaas gateway", "eaas autoscaler", "eaas checkpoint tiny",
                     "eaas registry register", "eaas registry describe", "eaas registry drain"):  # fmt: skip
        assert expected in paths, f"no {expected!r} command found in docker/ (found {sorted(paths)})"
    assert len(ALL_COMMANDS) >= 15


@pytest.mark.parametrize("cmd", ALL_COMMANDS, ids=lambda c: c.where)
def test_every_eaas_command_line_parses(cmd: CommandLine) -> None:
    try:
        path, params = _parse(cmd.argv)
    except ClickException as e:
        pytest.fail(f"{cmd.where}: {shlex.join(cmd.argv)!r} does not parse: {e.format_message()}")
    if path == "eaas --help":  # the images' default CMD
        return
    if path == "eaas worker" and any(str(b).startswith("tcp://0.0.0.0") for b in [params.get("bind")]):
        # a wildcard bind must come with an address clients can reach
        assert params.get("advertise_host") or "EAAS_ADVERTISE_HOST" in _env_of(cmd.where), cmd.where


def test_help_runs_for_every_subcommand_used() -> None:
    """``eaas <sub> --help`` exits 0 for each distinct subcommand (the CLI imports cleanly)."""
    from typer.testing import CliRunner

    runner = CliRunner()
    for path in sorted({_parse(c.argv)[0] for c in ALL_COMMANDS}):
        res = runner.invoke(app, [*path.split()[1:], "--help"])
        assert res.exit_code == 0, f"{path} --help: {res.output}"


# --- YAML and environment variables ------------------------------------------------------------


def _allowed_env() -> set[str]:
    settings = {f"EAAS_{name.upper()}" for name in Settings.model_fields}
    scaler = {AUTOSCALER_ENV_PREFIX + f.name.upper() for f in dataclasses.fields(AutoscalerConfig)}
    return settings | scaler


def _compose_env() -> dict[str, set[str]]:
    out = {}
    for name, svc in _compose()["services"].items():
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
        out[f"compose {name}"] = set(env)
    return out


def _k8s_env() -> dict[str, set[str]]:
    configmaps = {d["metadata"]["name"]: set(d.get("data", {})) for _, d in _k8s_docs() if d["kind"] == "ConfigMap"}
    out: dict[str, set[str]] = {}
    for fname, doc in _k8s_docs():
        if doc["kind"] == "ConfigMap":
            out[f"{fname} {doc['metadata']['name']}"] = configmaps[doc["metadata"]["name"]]
        for c in _containers(doc):
            names = {e["name"] for e in c.get("env", [])}
            for src in c.get("envFrom", []):
                ref = src.get("configMapRef", {}).get("name")
                if ref is not None:
                    assert ref in configmaps, f"{fname}: envFrom unknown ConfigMap {ref!r}"
                    names |= configmaps[ref]
            out[f"{fname} {doc['metadata']['name']}/{c['name']}"] = names
    return out


def _dockerfile_env() -> dict[str, set[str]]:
    out = {}
    for p in DOCKERFILES:
        text = p.read_text().replace("\\\n", " ")
        names = set()
        for line in re.findall(r"^ENV\s+(.*)$", text, re.M):
            names |= set(re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", line))
        out[p.name] = names
    return out


def _env_of(where: str) -> set[str]:
    envs = {**_compose_env(), **_k8s_env()}
    return next((v for k, v in envs.items() if where.startswith(k)), set())


def test_compose_and_manifests_are_yaml() -> None:
    compose = _compose()
    assert {"redis", "model", "gateway", "worker", "autoscaler", "locust"} <= set(compose["services"])
    docs = _k8s_docs()
    kinds = [(d["kind"], d["metadata"].get("name")) for _, d in docs if d["kind"] != "Kustomization"]
    assert ("Deployment", "eaas-gateway") in kinds and ("Service", "eaas-gateway") in kinds
    assert ("Deployment", "eaas-autoscaler") in kinds and ("Service", "eaas-autoscaler") in kinds
    assert sum(k == "ScaledObject" for k, _ in kinds) >= 2
    listed = next(d for _, d in docs if d["kind"] == "Kustomization")["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S if p.name != "kustomization.yaml")


def test_every_eaas_env_var_is_a_setting() -> None:
    allowed = _allowed_env()
    seen = 0
    for where, names in {**_dockerfile_env(), **_compose_env(), **_k8s_env()}.items():
        for name in names:
            if name.upper().startswith("EAAS_"):
                seen += 1
                assert name in allowed, f"{where}: {name} is not a Settings field or {AUTOSCALER_ENV_PREFIX}<FIELD>"
    assert seen >= 10
    # and the values parse: the settings object accepts the shared ConfigMap and compose env
    cm = next(d for _, d in _k8s_docs() if d["kind"] == "ConfigMap")
    Settings(**{k[len("EAAS_"):].lower(): v for k, v in cm["data"].items()})
    Settings(**{k[len("EAAS_"):].lower(): v for k, v in _compose()["x-eaas-env"].items()})


# --- KEDA triggers against a real publish-only autoscaler ------------------------------------------


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _deployment(name: str) -> dict:
    return next(d for _, d in _k8s_docs() if d["kind"] == "Deployment" and d["metadata"]["name"] == name)


def _container_args(dep: dict, name: str) -> list[str]:
    c = next(c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == name)
    return [str(a) for a in c.get("args", [])]


def _option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_keda_triggers_read_what_the_publish_only_autoscaler_serves(registry, registered, eaas_env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = registered("mixtral")
    scaled = [d for _, d in _k8s_docs() if d["kind"] == "ScaledObject"]
    scaler_dep = _deployment("eaas-autoscaler")
    scaler_args = _container_args(scaler_dep, "autoscaler")
    assert _option(scaler_args, "--model") == model and "--publish-only" in scaler_args
    scaler_env = {e["name"]: str(e["value"]) for e in scaler_dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    cfg = AutoscalerConfig.from_mapping({
        f.name: type(getattr(AutoscalerConfig(), f.name))(scaler_env[AUTOSCALER_ENV_PREFIX + f.name.upper()])
        for f in dataclasses.fields(AutoscalerConfig) if AUTOSCALER_ENV_PREFIX + f.name.upper() in scaler_env
    })  # fmt: skip

    # one real worker of the first scaled Deployment's shard, started with that Deployment's arguments
    first = _deployment(scaled[0]["spec"]["scaleTargetRef"]["name"])
    wargs = _container_args(first, "worker")
    worker = start_worker(eaas_env, model, _option(wargs, "--shard"), "--shard-name", _option(wargs, "--shard-name"),
                          log_path=str(tmp_path / "worker.log"))  # fmt: skip
    port = _free_port()
    argv = list(scaler_args)
    argv[argv.index("--host") + 1] = "127.0.0.1"
    argv[argv.index("--port") + 1] = str(port)
    env = {**eaas_env, **scaler_env}
    with open(tmp_path / "autoscaler.log", "wb") as log:
        scaler = subprocess.Popen([sys.executable, "-m", "eaas.cli", *argv], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_workers_ready(registry, model, 1)
        base = f"http://127.0.0.1:{port}"

        def published() -> dict | None:
            try:
                r = httpx.get(base + "/desired", timeout=2)
            except httpx.HTTPError:
                return None
            return r.json() if r.status_code == 200 and r.json() else None

        wait_for(published, 30, 0.1, "the autoscaler's /desired")
        for so in scaled:
            target = _deployment(so["spec"]["scaleTargetRef"]["name"])
            shard = _option(_container_args(target, "worker"), "--shard-name")
            (trigger,) = so["spec"]["triggers"]
            assert trigger["type"] == "metrics-api" and trigger.get("metricType", "AverageValue") == "AverageValue"
            meta = trigger["metadata"]
            assert meta["targetValue"] == "1" and meta.get("format", "json") == "json"
            url = urlsplit(meta["url"])
            assert url.hostname.split(".")[0] == "eaas-autoscaler" and url.port == int(_option(scaler_args, "--port"))
            assert url.path == f"/desired/{shard}", f"{so['metadata']['name']} reads {url.path}, its Deployment is {shard}"
            assert so["spec"]["minReplicaCount"] == cfg.min_replicas and so["spec"]["maxReplicaCount"] == cfg.max_replicas
            r = httpx.get(base + url.path, timeout=5)
            assert r.status_code == 200, r.text
            value = r.json()[meta["valueLocation"]]
            # idle shards (one with a real idle worker, one with none yet) want exactly min_replicas
            assert isinstance(value, int) and value == cfg.min_replicas, (url.path, r.json())
        text = httpx.get(base + "/metrics", timeout=5).text
        assert f'eaas_desired_replicas{{shard="{shard}"}} {float(cfg.min_replicas)}' in text
    finally:
        scaler.send_signal(signal.SIGTERM)
        worker.send_signal(signal.SIGTERM)
        assert scaler.wait(15) == 0, (tmp_path / "autoscaler.log").read_text()
        assert worker.wait(30) == 0, (tmp_path / "worker.log").read_text()


# --- bind one address, advertise another --------------------------------------------------------


def _connectable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _eaas(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "eaas.cli", *args], env=env, capture_output=True, text=True, timeout=60)


def _worker_hook(kind: str) -> list[str]:
    """The worker manifest's readiness or preStop exec command."""
    c = next(c for c in _deployment("eaas-worker-shard-0")["spec"]["template"]["spec"]["containers"] if c["name"] == "worker")
    return c["readinessProbe"]["exec"]["command"] if kind == "readiness" else c["lifecycle"]["preStop"]["exec"]["command"]


def test_worker_binds_one_address_and_advertises_another(registry, registered, eaas_env, tiny_checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from eaas.functions import load_shard
    from eaas.platform.client import ExpertClient
    from eaas.settings import get_settings

    model = registered("mixtral")
    # 1. bound on 127.0.0.3, advertised as 127.0.0.4: the registry carries the advertised host with the
    #    bound port; the socket really listens on the bound address only.
    port = _free_port("127.0.0.3")
    env = {**eaas_env, "POD_NAME": "eaas-worker-shard-0-abc12"}
    w1 = start_worker(env, model, "*:0-3", "--bind", f"tcp://127.0.0.3:{port}", "--advertise-host", "127.0.0.4",
                      log_path=str(tmp_path / "w1.log"))  # fmt: skip
    try:
        (rec,) = wait_workers_ready(registry, model, 1)
        assert rec.id == "eaas-worker-shard-0-abc12"  # identity from the pod name
        assert rec.endpoint == f"tcp://127.0.0.4:{port}"
        assert _connectable("127.0.0.3", port) and not _connectable("127.0.0.4", port)
        # the readiness probe of the manifests: exit 0 while registered
        probe = _worker_hook("readiness")
        assert subprocess.run(probe, env=env, timeout=60).returncode == 0
    finally:
        w1.send_signal(signal.SIGTERM)  # graceful: drains, deregisters, exits 0
        assert w1.wait(30) == 0, (tmp_path / "w1.log").read_text()
    assert registry.workers(model) == []
    assert subprocess.run(_worker_hook("readiness"), env=env, timeout=60).returncode == 1
    assert _eaas(env, "registry", "describe", "no-such-worker").returncode == 1

    # 2. the Kubernetes way: advertised host from EAAS_ADVERTISE_HOST (downward API), bound elsewhere
    #    by --bind; a client reaches it through the registry and gets the right numbers.
    port = _free_port("127.0.0.2")
    env2 = {**eaas_env, "POD_NAME": "eaas-worker-shard-0-def34", "EAAS_ADVERTISE_HOST": "127.0.0.2"}
    w2 = start_worker(env2, model, "*:0-3", "--bind", f"tcp://127.0.0.2:{port}", log_path=str(tmp_path / "w2.log"))
    client = None
    try:
        (rec,) = wait_workers_ready(registry, model, 1)
        assert rec.endpoint == f"tcp://127.0.0.2:{port}" and rec.id == "eaas-worker-shard-0-def34"
        assert not _connectable("127.0.0.1", port)
        client = ExpertClient(registry, model, get_settings(redis_url="unused", prefix=registry.prefix), transport="inline")
        x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
        y = client.invoke(f"{model}/1/2", x)
        ref = load_shard(tiny_checkpoint("mixtral"), [(1, 2)])
        with torch.inference_mode():
            expected = ref.forward(x, [((1, 2), 5)])
        assert torch.allclose(y, expected, atol=1e-5), (y - expected).abs().max()
        # the preStop hook: drain through the registry and wait until deregistered; the worker exits 0
        res = subprocess.run(_worker_hook("prestop"), env=env2, capture_output=True, text=True, timeout=90)
        assert res.returncode == 0 and "gone" in res.stdout, res.stdout + res.stderr
        assert w2.wait(30) == 0, (tmp_path / "w2.log").read_text()
    finally:
        if client is not None:
            client.close()
        if w2.poll() is None:
            w2.kill()
            w2.wait(10)


def test_worker_deployments_are_the_autoscalers_shard_plan(tiny_checkpoint) -> None:
    """Each worker Deployment hosts exactly the experts the autoscaler plans for its shard name."""
    from eaas.commands.autoscaler import plan_shards
    from eaas.functions import inspect_checkpoint
    from eaas.platform.shards import parse_shard_spec

    spec, _ = inspect_checkpoint(tiny_checkpoint("mixtral"))
    layers, experts = list(spec.moe_layers), int(spec.num_experts)
    scaler_args = _container_args(_deployment("eaas-autoscaler"), "autoscaler")
    env = {e["name"]: e["value"] for e in _deployment("eaas-autoscaler")["spec"]["template"]["spec"]["containers"][0]["env"]}
    plan = plan_shards(experts, int(_option(scaler_args, "--shards")), int(env[AUTOSCALER_ENV_PREFIX + "MIN_REPLICAS"]))
    deployed = {}
    for _, doc in _k8s_docs():
        if doc["kind"] == "Deployment" and doc["metadata"]["name"].startswith("eaas-worker-"):
            args = _container_args(doc, "worker")
            deployed[_option(args, "--shard-name")] = parse_shard_spec(_option(args, "--shard"), layers, experts)
    assert deployed == {name: parse_shard_spec(s, layers, experts) for name, s in plan.items()}
    scaled = {d["spec"]["scaleTargetRef"]["name"] for _, d in _k8s_docs() if d["kind"] == "ScaledObject"}
    assert scaled == {f"eaas-worker-{name}" for name in deployed}
    # compose: one worker service, the autoscaler's single shard
    svc = _compose()["services"]
    (worker,) = [c for c in _compose_commands() if c.where == "compose worker"]
    (scaler,) = [c for c in _compose_commands() if c.where == "compose autoscaler"]
    plan = plan_shards(experts, int(_option(list(scaler.argv), "--shards")),
                       int(svc["autoscaler"]["environment"][AUTOSCALER_ENV_PREFIX + "MIN_REPLICAS"]))  # fmt: skip
    argv = list(worker.argv)
    assert {_option(argv, "--shard-name"): parse_shard_spec(_option(argv, "--shard"), layers, experts)} == {
        name: parse_shard_spec(s, layers, experts) for name, s in plan.items()
    }
