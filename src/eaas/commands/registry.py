"""`eaas registry ...`: inspect and administer the registry of a deployment."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.table import Table

from eaas.commands.common import cli_errors, console, print_json
from eaas.errors import NotFound
from eaas.settings import get_settings

if TYPE_CHECKING:
    from eaas.registry.store import Registry

app = typer.Typer(help="Inspect and administer the registry (models, functions, workers).", no_args_is_help=True)

JsonOpt = typer.Option(False, "--json", help="print JSON instead of a table")


def _registry() -> Registry:
    # Imported here, not at the top: `eaas --help` and every other command load this
    # module, and redis-py alone costs ~0.2 s of start-up (issue 13: admin commands < 1 s).
    from eaas.registry.deployment import open_registry

    reg, _ = open_registry(get_settings())
    reg.ping()
    reg.reap_expired()
    return reg


@app.command()
@cli_errors
def models(as_json: bool = JsonOpt) -> None:
    """List registered models."""
    rows = _registry().models()
    if as_json:
        return print_json(rows)
    t = Table("model", "type", "layers", "moe layers", "experts", "top-k", "hidden", "dtype", "functions", "checkpoint")
    for m in rows:
        t.add_row(
            m["name"], str(m.get("model_type", "")), str(m.get("num_layers", "")), str(len(m.get("moe_layers", []))),
            str(m.get("num_experts", "")), str(m.get("top_k", "")), str(m.get("hidden_size", "")),
            str(m.get("dtype", "")), str(m["num_functions"]), str(m.get("checkpoint", "")),
        )  # fmt: skip
    console.print(t)


@app.command()
@cli_errors
def functions(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="only this model"),
    as_json: bool = JsonOpt,
) -> None:
    """List functions (one per routed expert) and their replicas."""
    rows = _registry().functions(model)
    if as_json:
        return print_json(rows)
    t = Table("function", "layer", "expert", "dtype", "bytes", "replicas")
    for f in rows:
        t.add_row(f["id"], str(f.get("layer", "")), str(f.get("expert", "")), str(f.get("dtype", "")),
                  str(f.get("nbytes", "")), ", ".join(f["replicas"]) or "[yellow]none[/yellow]")
    console.print(t)


def _worker_row(w) -> dict:  # type: ignore[no-untyped-def]
    return {
        "id": w.id, "model": w.model, "state": w.state.value, "endpoint": w.endpoint, "device": w.device,
        "shard_name": w.shard_name, "shard": list(w.shard), "queue_tokens": w.queue_tokens,
        "queue_requests": w.queue_requests, "tokens_served": w.tokens_served, "requests_served": w.requests_served,
        "replies_dropped": w.replies_dropped, "epoch": w.epoch, "warmup_ms": round(w.warmup_ms, 3), "batches": w.batches, "busy_fraction": w.busy_fraction, "lease_age_s": round(w.lease_age_s(), 3),
        "lease_ttl_s": w.lease_ttl_s, "pid": w.pid, "host_id": w.host_id,
        "transports": w.capabilities.get("transports", []),
    }  # fmt: skip


def _shard_summary(shard: tuple[str, ...]) -> str:
    if len(shard) <= 3:
        return ", ".join(shard)
    return f"{len(shard)} functions ({shard[0]} .. {shard[-1]})"


@app.command()
@cli_errors
def workers(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="only this model"),
    as_json: bool = JsonOpt,
) -> None:
    """List live workers: state, endpoint, shard, queue depth, lease age."""
    rows = _registry().workers(model)
    if as_json:
        return print_json([_worker_row(w) for w in rows])
    t = Table("worker", "state", "endpoint", "shard", "queue (tokens/reqs)", "tokens_served", "busy", "lease age")
    for w in rows:
        t.add_row(w.id, w.state.value, w.endpoint, _shard_summary(w.shard), f"{w.queue_tokens}/{w.queue_requests}",
                  str(w.tokens_served), f"{w.busy_fraction:.0%}", f"{w.lease_age_s():.1f}s / {w.lease_ttl_s:g}s")
    console.print(t)


@app.command()
@cli_errors
def describe(ident: str = typer.Argument(..., metavar="ID", help="a model name, function id or worker id"),
             as_json: bool = typer.Option(True, "--json/--no-json", help="JSON (default)")) -> None:
    """Show everything the registry holds about a model, function or worker."""
    reg = _registry()
    for getter, kind in ((reg.model, "model"), (reg.function, "function"), (reg.worker, "worker")):
        try:
            obj = getter(ident)
        except NotFound:
            continue
        except Exception as e:  # an id that is not even valid for this kind
            if type(e).__name__ == "ConfigError":
                continue
            raise
        data = _worker_row(obj) if kind == "worker" else obj
        if kind == "model":
            data = dict(data, num_functions=len(reg.function_ids(ident)))
        return print_json({"kind": kind, kind: data})
    raise NotFound(f"no model, function or worker with id {ident!r}")


@app.command()
@cli_errors
def remove(model: str = typer.Argument(..., help="model name")) -> None:
    """Remove a model and all its functions (its workers keep running until drained)."""
    n = _registry().remove_model(model)
    console.print(f"removed model {model} ({n} functions)")


@app.command()
@cli_errors
def drain(worker: str = typer.Argument(..., help="worker id"),
          wait: bool = typer.Option(False, "--wait", help="wait until the worker has deregistered"),
          timeout_s: float = typer.Option(60.0, "--timeout-s", help="how long --wait waits")) -> None:
    """Ask a worker to drain: it stops taking new work, finishes its queue, deregisters and exits."""
    from eaas.registry.records import WorkerState

    reg = _registry()
    reg.set_worker_state(worker, WorkerState.DRAINING)
    console.print(f"worker {worker}: draining")
    if wait:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if worker not in reg.worker_ids():
                console.print(f"worker {worker}: gone")
                return
            time.sleep(0.1)
        raise NotFound(f"worker {worker} still registered after {timeout_s:g}s")


@app.command()
@cli_errors
def register(
    checkpoint: Path = typer.Argument(..., help="checkpoint directory (config.json + safetensors)"),
    name: Optional[str] = typer.Option(None, "--name", help="model name (default: the directory name)"),
    as_json: bool = JsonOpt,
) -> None:
    """Register a model and all its functions from a checkpoint directory."""
    from eaas.functions import inspect_checkpoint

    spec, fns = inspect_checkpoint(checkpoint, name=name)
    reg = _registry()
    n = reg.register_model(spec.to_dict(), [f.to_dict() for f in fns])
    if as_json:
        return print_json({"model": spec.name, "functions": n})
    console.print(f"registered model {spec.name}: {n} functions ({spec.model_type}, {len(spec.moe_layers)} MoE layers x {spec.num_experts} experts)")
