"""`eaas gateway`: serve one model over HTTP (OpenAI-compatible + raw tensor API)."""

from __future__ import annotations

from pathlib import Path

import typer

from eaas.commands.common import cli_errors


@cli_errors
def gateway(
    model: Path = typer.Option(..., "--model", help="checkpoint directory (config.json, safetensors, tokenizer)"),
    host: str = typer.Option(None, "--host", help="bind address (default: EAAS_HOST or 127.0.0.1)"),
    port: int = typer.Option(None, "--port", help="port (default: EAAS_PORT or 8000; 0 = any free port)"),
    monolithic: bool = typer.Option(False, "--monolithic", help="load the plain transformers model (no expert workers)"),
    name: str = typer.Option(None, "--name", help="model id clients use (default: the directory name)"),
    torch_threads: int = typer.Option(None, "--torch-threads", help="torch intra-op threads (default: EAAS_TORCH_THREADS or 1)"),
    max_batch_size: int = typer.Option(None, "--max-batch-size", help="sequences decoded together at most"),
    engine: str = typer.Option(None, "--engine", help="runner engine: slots (default; EAAS_ENGINE) or padded (the previous one)"),
    experts_implementation: str = typer.Option(
        None, "--experts-implementation",
        help="with --monolithic: transformers experts implementation (eager, grouped_mm, batched_mm;"
             " default: EAAS_EXPERTS_IMPLEMENTATION or transformers' default)"),
) -> None:
    """Serve MODEL's completions, chat and layer API with continuous batching.

    SIGTERM or Ctrl-C: uvicorn stops accepting, finishes the requests in flight,
    stops the model runner, and the command exits 0.
    """
    import signal

    import uvicorn

    from eaas.gateway.serve import build_gateway
    from eaas.settings import get_settings

    if experts_implementation and not monolithic:
        from eaas.errors import ConfigError

        raise ConfigError("--experts-implementation applies to --monolithic only (the attention client calls workers)")
    settings = get_settings(host=host, port=port, torch_threads=torch_threads, max_batch_size=max_batch_size,
                            experts_implementation=experts_implementation, engine=engine)
    app = build_gateway(model, settings, monolithic=monolithic, name=name)
    what = f" (engine {settings.engine})"
    if monolithic and app.state.runners:
        loaded = next(iter(app.state.runners.values())).model
        what = (f" (monolithic, experts_implementation={getattr(loaded.config, '_experts_implementation', None)},"
                f" engine {settings.engine})")
    typer.echo(f"eaas gateway: serving {app.state.runners and next(iter(app.state.runners))}{what} "
               f"on http://{settings.host}:{settings.port}", err=True)
    # uvicorn handles SIGTERM/SIGINT while it serves, then restores these handlers
    # and raises the signal again; with the defaults that re-raise would kill the
    # process after a clean shutdown (exit 143) or print a KeyboardInterrupt.
    stopped: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stopped.append(signum))
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    if stopped:
        typer.echo(f"eaas gateway: stopped ({signal.Signals(stopped[0]).name})", err=True)
