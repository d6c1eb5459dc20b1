"""The `eaas` command: one typer app with a sub-app per component."""

from __future__ import annotations

import typer

from eaas.commands import autoscaler, bench, checkpoint, gateway, keys, redis_cmd, registry, up, worker
from eaas.commands.common import setup_logging

app = typer.Typer(
    name="eaas",
    help="Expert-as-a-Service: serve the routed experts of MoE models as stateless remote functions.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    redis_url: str = typer.Option(None, "--redis-url", envvar="EAAS_REDIS_URL", help="Redis of the deployment (default: the one `eaas up` recorded, or a private one)"),
    prefix: str = typer.Option(None, "--prefix", envvar="EAAS_PREFIX", help="registry key prefix (default: eaas)"),
    log_level: str = typer.Option("WARNING", "--log-level", envvar="EAAS_LOG_LEVEL", help="logging level"),
) -> None:
    """Shared options; they are exported as EAAS_* so every child process sees them."""
    import os

    if redis_url:
        os.environ["EAAS_REDIS_URL"] = redis_url
    if prefix:
        os.environ["EAAS_PREFIX"] = prefix
    os.environ["EAAS_LOG_LEVEL"] = log_level
    setup_logging(log_level)


app.command("up")(up.up)
app.add_typer(registry.app, name="registry")
app.command("redis")(redis_cmd.redis)
app.command("worker")(worker.worker)
app.command("autoscaler")(autoscaler.autoscaler)
app.add_typer(bench.app, name="bench")
app.command("gateway")(gateway.gateway)
app.add_typer(checkpoint.app, name="checkpoint")
app.command("keys")(keys.keys)


def main() -> None:  # pragma: no cover - entry point
    """Console entry point: run the ``eaas`` typer app."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
