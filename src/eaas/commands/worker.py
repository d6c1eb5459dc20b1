"""`eaas worker`: run one expert worker (warm: loads its shard, then registers)."""

from __future__ import annotations

import functools
import logging
import sys
from typing import Optional

import typer

from eaas.commands.common import cli_errors, err_console
from eaas.settings import get_settings

log = logging.getLogger(__name__)


@cli_errors
def worker(
    model: str = typer.Option(..., "--model", "-m", help="registered model name"),
    shard: str = typer.Option("all", "--shard", "-s", help="functions to host: 'all', '*:0-3', '0:1,5;2-3:*'"),
    device: Optional[str] = typer.Option(None, "--device", help="torch device: cpu, cuda, cuda:N (EAAS_DEVICE)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="compute dtype (default: the checkpoint's)"),
    transport: Optional[str] = typer.Option(None, "--transport", help="offer only this transport (inline, shm, cuda_ipc, nixl)"),
    bind: Optional[str] = typer.Option(None, "--bind", help="ZeroMQ address to bind (default tcp://127.0.0.1:<free port>)"),
    advertise_host: Optional[str] = typer.Option(None, "--advertise-host", help="host clients should connect to (EAAS_ADVERTISE_HOST)"),
    worker_id: Optional[str] = typer.Option(None, "--id", help="worker id (default: POD_NAME, else host-pid-random)"),
    shard_name: str = typer.Option("", "--shard-name", help="shard group name used by the autoscaler"),
    torch_threads: Optional[int] = typer.Option(None, "--torch-threads", help="torch intra-op threads (EAAS_TORCH_THREADS)"),
) -> None:
    """Serve a shard of a registered model's experts until SIGTERM, then drain and exit 0."""
    import torch

    from eaas.functions import load_shard
    from eaas.platform.curve import ensure_keys, load_keys, require_keys_beyond_loopback, worker_bind_address
    from eaas.platform.shards import parse_shard_spec
    from eaas.platform.worker import ExpertWorker
    from eaas.registry.deployment import connect_registry

    settings = get_settings(device=device, torch_threads=torch_threads, advertise_host=advertise_host)
    if settings.worker_sched_batch:  # first, so that every thread of the worker (and its lease keeper) inherits it
        from eaas.procs import use_batch_scheduling

        use_batch_scheduling()
    if ensure_keys(settings.curve_keys_dir):
        err_console.print(f"made NEW CURVE keys in {settings.curve_keys_dir}: clients need its server.key and "
                          "client.key_secret", highlight=False)
    # refuse a bind beyond loopback without keys now, before connecting and loading anything
    require_keys_beyond_loopback(worker_bind_address(bind, settings.bind_host),
                                 load_keys(settings.curve_keys_dir) if settings.curve_keys_dir else None)
    torch.set_num_threads(settings.torch_threads)
    registry = connect_registry(settings, f"worker {worker_id or model}")
    spec = registry.model(model)
    pairs = parse_shard_spec(shard, spec["moe_layers"], int(spec["num_experts"]))
    load = functools.partial(load_shard, spec["checkpoint"], device=settings.device, dtype=dtype, model=model,
                             kernel=settings.expert_kernel)  # these pairs now, extra replicas' later
    with err_console.status(f"loading {len(pairs)} experts of {model} onto {settings.device}"):
        loaded = load(pairs)
    w = ExpertWorker(
        settings, registry, model, loaded, worker_id=worker_id, shard_name=shard_name or shard, bind=bind,
        advertise_host=settings.advertise_host, transports=[transport] if transport else None,
        reload=load,
    )
    kernel = f"{loaded.kernel} kernel"
    if loaded.kernel != settings.expert_kernel:  # onednn asked for, but these experts cannot run it
        kernel += f"; EAAS_EXPERT_KERNEL={settings.expert_kernel} needs float32 CPU linear experts"
    err_console.print(f"worker {w.id}: {len(pairs)} experts at {w.endpoint} ({kernel})", highlight=False,
                      soft_wrap=True)  # one line in log files, whatever the width
    sys.exit(w.serve())
