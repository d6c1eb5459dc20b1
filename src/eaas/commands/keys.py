"""`eaas keys DIR`: make a deployment's CURVE key directory."""

from __future__ import annotations

import typer

from eaas.commands.common import cli_errors, console


@cli_errors
def keys(directory: str = typer.Argument(..., help="key directory to make (existing keys are kept)")) -> None:
    """Make the CURVE keys that authenticate and encrypt worker sockets across hosts.

    DIR gets the workers' key pair (server.key_secret), a client key pair (client.key_secret)
    and authorized/ (client public keys workers accept). Point EAAS_CURVE_KEYS_DIR at it on
    every worker and client; give clients a copy without server.key_secret.
    """
    from eaas.platform.curve import generate_keys

    d = generate_keys(directory)
    console.print(f"CURVE keys in {d}", highlight=False)
    console.print(f"export EAAS_CURVE_KEYS_DIR={d.resolve()}", highlight=False, style="dim")
