"""The `eaas` command: one typer app with a sub-app per component."""

from __future__ import annotations

import typer

from eaas.commands import bench

app = typer.Typer(
    name="eaas",
    help="Expert-as-a-Service: serve the routed experts of MoE models as stateless remote functions.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(bench.app, name="bench")


def main() -> None:  # pragma: no cover - entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
