"""`eaas redis`: run a private Redis server in the foreground."""

from __future__ import annotations

import signal
import threading

import typer

from eaas.commands.common import cli_errors, console
from eaas.settings import get_settings


@cli_errors
def redis(
    port: int = typer.Option(0, "--port", help="TCP port (0 = a free one)"),
    host: str = typer.Option("127.0.0.1", "--host", help="bind address (loopback unless told otherwise)"),
    no_state: bool = typer.Option(False, "--no-state", help="do not record it as the current deployment"),
) -> None:
    """Run a private Redis server (no persistence) in the foreground and print its URL.

    Unless --no-state, it is recorded in the state file so admin commands in
    other shells find it. Ctrl-C / SIGTERM stops it.
    """
    from eaas.registry.deployment import clear_state, write_state
    from eaas.registry.server import RedisServer

    settings = get_settings()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with RedisServer(port=port or None, host=host, die_with_parent=True) as server:
        if not no_state:
            write_state(settings, server.url)
        console.print(server.url, highlight=False)
        console.print(f"export EAAS_REDIS_URL={server.url}", highlight=False, style="dim")
        try:
            while not stop.wait(0.5):
                if server._proc is None or server._proc.poll() is not None:
                    raise typer.Exit(1)
        except KeyboardInterrupt:
            pass
        finally:
            if not no_state:
                clear_state(settings)
