"""`eaas autoscaler`: grow and shrink a model's warm pool, or publish the desired replicas.

Config precedence: defaults (``AutoscalerConfig``) < ``EAAS_AUTOSCALER_<FIELD>``
environment variables (e.g. ``EAAS_AUTOSCALER_MIN_REPLICAS=2``) < flags.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Optional

import typer

from eaas.commands.common import cli_errors, err_console

log = logging.getLogger(__name__)



def plan_shards(num_experts: int, num_shards: int, replicas: int) -> dict[str, str]:
    """Shard name -> SPEC for ``num_shards`` groups (see :func:`eaas.platform.shards.plan_pool`)."""
    from eaas.platform.shards import plan_pool

    r = max(1, replicas)
    return {p.shard_name: p.spec for p in plan_pool(num_experts, workers=max(1, num_shards) * r, replicas=r)}


@cli_errors
def autoscaler(
    model: str = typer.Option(..., "--model", "-m", help="registered model name"),
    publish_only: bool = typer.Option(False, "--publish-only", help="no pool: serve desired replicas over HTTP (KEDA metrics-api)"),
    host: str = typer.Option("127.0.0.1", "--host", help="publish-only: bind address"),
    port: int = typer.Option(9100, "--port", help="publish-only: port (0 = a free one)"),
    shards: int = typer.Option(1, "--shards", help="shard groups to manage (each expert in exactly one group)"),
    tick_s: float = typer.Option(1.0, "--tick-s", help="control loop period (s)"),
    detach_workers: bool = typer.Option(False, "--detach-workers", help="workers outlive this process (a restart adopts them)"),
    min_replicas: Optional[int] = typer.Option(None, "--min-replicas", help="replicas per shard at least [2]"),
    max_replicas: Optional[int] = typer.Option(None, "--max-replicas", help="replicas per shard at most [8]"),
    target_queue_tokens: Optional[float] = typer.Option(None, "--target-queue-tokens", help="queued tokens per replica at full load [2048]"),
    target_busy_fraction: Optional[float] = typer.Option(None, "--target-busy-fraction", help="utilisation per replica (0-1] [0.7]"),
    upscale_delay_s: Optional[float] = typer.Option(None, "--upscale-delay-s", help="scale-up proposal must persist this long [10]"),
    downscale_delay_s: Optional[float] = typer.Option(None, "--downscale-delay-s", help="scale-down proposal must persist this long [60]"),
    look_back_s: Optional[float] = typer.Option(None, "--look-back-s", help="load smoothing time constant [10]"),
    panic_threshold: Optional[float] = typer.Option(None, "--panic-threshold", help="load/ready ratio that scales up at once [2]"),
    metrics_stale_s: Optional[float] = typer.Option(None, "--metrics-stale-s", help="ignore heartbeats older than this [3]"),
) -> None:
    """Run the autoscaler for one model until SIGTERM / Ctrl-C."""
    from eaas.platform.autoscale import AutoscalerConfig
    from eaas.platform.autoscale.config import config_from_env
    from eaas.platform.autoscale.mechanism import Autoscaler
    from eaas.platform.autoscale.publish import DesiredReplicasServer
    from eaas.platform.pool import LocalPool
    from eaas.registry.deployment import connect_registry
    from eaas.settings import get_settings

    flags = dict(min_replicas=min_replicas, max_replicas=max_replicas, target_queue_tokens_per_replica=target_queue_tokens,
                 target_busy_fraction=target_busy_fraction, upscale_delay_s=upscale_delay_s, downscale_delay_s=downscale_delay_s,
                 look_back_s=look_back_s, panic_threshold=panic_threshold, metrics_stale_s=metrics_stale_s)  # fmt: skip
    config = AutoscalerConfig.from_mapping({**config_from_env(), **{k: v for k, v in flags.items() if v is not None}})
    settings = get_settings()
    registry = connect_registry(settings, f"autoscaler {model}")
    spec = registry.model(model)
    plan = plan_shards(int(spec["num_experts"]), shards, config.min_replicas)
    pool = None if publish_only else LocalPool(registry, redis_url=settings.redis_url, die_with_parent=not detach_workers)
    scaler = Autoscaler(registry, model, config, pool=pool, shards=plan, tick_s=tick_s)
    stop = threading.Event()

    def on_signal(*_: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = None
    if publish_only:
        server = DesiredReplicasServer(scaler, host=host, port=port).start()
        err_console.print(f"autoscaler {model}: publish-only at {server.url}/desired", highlight=False)
    else:
        err_console.print(f"autoscaler {model}: local pool, shards {sorted(plan)}, logs in {pool.log_dir}", highlight=False)  # type: ignore[union-attr]
    try:
        scaler.run(stop)
    finally:
        if server is not None:
            server.stop()
        if pool is not None and not detach_workers:
            pool.stop_all(adopted=False)
