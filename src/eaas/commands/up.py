"""`eaas up`: the whole system on this machine in one command (the main job)."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from eaas.commands.common import cli_errors, console, err_console
from eaas.errors import ConfigError, EaaSError
from eaas.settings import get_settings

_STEPS = {"redis": "private Redis", "model": "register model", "workers": "warm expert workers", "gateway": "gateway + attention client"}


def _check_port_free(host: str, port: int) -> None:
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot serve on {host}:{port}: {e.strerror}; choose another --port") from None


@cli_errors
def up(
    model: Optional[Path] = typer.Option(None, "--model", help="checkpoint directory (default: pydoc-mixtral, the small trained Mixtral shipped with eaas)"),
    name: Optional[str] = typer.Option(None, "--name", help="model name (default: the directory name)"),
    workers: int = typer.Option(2, "--workers", min=1, help="expert worker processes at start"),
    replicas: int = typer.Option(2, "--replicas", min=1, help="replicas of every expert (>= 2 survives a worker failure)"),
    host: Optional[str] = typer.Option(None, "--host", help="gateway address (default 127.0.0.1)"),
    port: Optional[int] = typer.Option(None, "--port", help="gateway port (default 8000)"),
    autoscale: bool = typer.Option(True, "--autoscale/--no-autoscale", help="grow and shrink the pool with queue depth"),
    max_replicas: int = typer.Option(4, "--max-replicas", min=1, help="autoscaler: most workers per shard group"),
    torch_threads: Optional[int] = typer.Option(None, "--torch-threads", help="torch threads per process (default 1)"),
    engine: Optional[str] = typer.Option(None, "--engine", help="the gateway's runner engine: slots (default; EAAS_ENGINE) or padded"),
) -> None:
    """Start Redis, register the model, start a warm worker pool, the autoscaler and the gateway.

    Prints the URL and a ready-to-paste curl line; Ctrl-C or SIGTERM stops
    everything cleanly (workers drain, no orphan processes, no leaked shared memory).
    """
    settings = get_settings(host=host, port=port, torch_threads=torch_threads, engine=engine)
    _check_port_free(settings.host, settings.port)
    from eaas.platform.curve import ensure_keys

    if ensure_keys(settings.curve_keys_dir):  # its workers and its gateway then share them
        err_console.print(f"made CURVE keys in {settings.curve_keys_dir}", highlight=False)
    if not settings.redis_url:
        from eaas.registry.server import find_redis_server

        find_redis_server(settings.redis_server)  # no Redis to start: say so now, before loading anything

    import uvicorn  # heavy imports only once the cheap checks passed

    from eaas.deploy import LocalDeployment, UpConfig
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeElapsedColumn(), console=err_console, transient=False)
    tasks: dict[str, int] = {}

    def report(step: str, done: int, total: int) -> None:
        if step not in tasks:
            tasks[step] = progress.add_task(_STEPS.get(step, step), total=total)
        progress.update(tasks[step], completed=done, total=total)
        if stop.is_set():
            raise KeyboardInterrupt

    failed: EaaSError | None = None
    dep = LocalDeployment(settings, UpConfig(model_dir=model, name=name, workers=workers, replicas=replicas,
                                             autoscale=autoscale, max_replicas=max_replicas), report)
    try:
        with progress:
            app = dep.start()
        server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                                               lifespan="on"))
        thread = threading.Thread(target=server.run, name="eaas-gateway", daemon=True)
        thread.start()
        while not server.started:
            if not thread.is_alive() or stop.is_set():
                raise ConfigError(f"the gateway did not start on {settings.host}:{settings.port}")
            time.sleep(0.05)
        bound_port = server.servers[0].sockets[0].getsockname()[1] if server.servers else settings.port
        url = f"http://{settings.host}:{bound_port}"
        recorded = dep.record_state(url)
        body = json.dumps({"model": dep.model_name, "prompt": "The expert said", "max_tokens": 16, "temperature": 0})
        console.print(f"EaaS is up: model [bold]{dep.model_name}[/bold], {workers} workers, gateway {url}", highlight=False)
        console.print(f"  curl -s {url}/v1/completions -H 'Content-Type: application/json' -d '{body}'",
                      highlight=False, soft_wrap=True)
        admin = "eaas registry workers" if recorded else (
            f"EAAS_REDIS_URL={dep.redis_url} EAAS_PREFIX={settings.prefix} eaas registry workers"
            "  (another deployment is recorded in the state file)")
        console.print(f"  admin: {admin}  — Ctrl-C stops everything", highlight=False, soft_wrap=True, style="dim")
        console.print(f"  worker logs: {dep.log_dir}", highlight=False, soft_wrap=True, style="dim")
        while not stop.wait(0.2):
            if not thread.is_alive():
                raise ConfigError("the gateway stopped unexpectedly")
        server.should_exit = True
        thread.join(timeout=15)
    except KeyboardInterrupt:
        pass
    except EaaSError as e:  # say what failed first, then clean up what had started
        failed = e
        _say(f"[red]error:[/red] {e}")
    finally:
        if dep.started_anything:
            _say("stopping: draining workers ..." if dep.pool is not None else "stopping ...")
            dep.stop()
            _say("stopped")
    if failed is not None:
        raise typer.Exit(1)


def _say(text: str) -> None:
    """Print a status line; a closed terminal or pipe must not prevent the shutdown."""
    try:
        err_console.print(text)
    except (OSError, ValueError):
        pass
