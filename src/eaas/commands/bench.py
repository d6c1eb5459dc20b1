"""`eaas bench ...`: benchmarks that print a table, write JSON and a PNG.

Each benchmark measures its baseline in the same run and reports ratios
against it. The measuring code lives next to what it measures; this module
only declares the commands.
"""

from __future__ import annotations

import typer

app = typer.Typer(help="Benchmarks: a table, --json, and a PNG plot, with ratios against a baseline measured in the same run.", no_args_is_help=True)
