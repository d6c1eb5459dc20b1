"""`eaas keys DIR`: make a deployment's CURVE key directory."""

from __future__ import annotations

import typer

from eaas.commands.common import cli_errors, console


@cli_errors
def keys(directory: str = typer.Argument(..., metavar="DIR", help="key directory to make (existing keys are kept)")) -> None:
    """Make the CURVE keys that authenticate and encrypt worker sockets across hosts.

    DIR gets server.key and server.key_secret (the workers' pair), client.key and client.key_secret (a client pair) and authorized/ (the client public keys workers accept).

    Point EAAS_CURVE_KEYS_DIR at it on every worker and client; give client hosts a copy without server.key_secret.
    """
    from eaas.platform.curve import generate_keys

    d = generate_keys(directory)
    console.print(f"CURVE keys in {d}", highlight=False)
    console.print(f"export EAAS_CURVE_KEYS_DIR={d.resolve()}", highlight=False, style="dim")
