"""Helpers shared by the CLI commands: error handling, output, logging."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from eaas.errors import EaaSError

F = TypeVar("F", bound=Callable[..., Any])

# Piped output is not cut to 80 columns (ids must stay copyable); terminals use their width.
console = Console(width=None if sys.stdout.isatty() else 240)
err_console = Console(stderr=True)


def fail(message: str, code: int = 1) -> None:
    """Print one line to stderr and exit with ``code`` (never a traceback)."""
    err_console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def cli_errors(fn: F) -> F:
    """Decorator: turn EaaSError / invalid settings / Ctrl-C into one line and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EaaSError as e:
            fail(str(e))
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None
        except Exception as e:  # pydantic ValidationError for EAAS_* values
            if type(e).__name__ == "ValidationError":
                fail(settings_error_line(e))
            raise

    return wrapper  # type: ignore[return-value]


def settings_error_line(exc: Any) -> str:
    """One line for a pydantic ``ValidationError`` of :class:`~eaas.settings.Settings`: each bad
    field with its ``EAAS_*`` variable, the value given and what is expected, e.g.
    ``invalid setting: EAAS_EXPERT_KERNEL='bogus': Input should be 'eager' or 'onednn'``."""
    parts = []
    for err in exc.errors():
        loc = err.get("loc") or ("?",)
        name = f"EAAS_{str(loc[0]).upper()}"
        given = f"={err['input']!r}" if "input" in err and not isinstance(err["input"], dict) else ""
        parts.append(f"{name}{given}: {err.get('msg', 'invalid')}")
    return "invalid setting: " + "; ".join(parts)


def print_json(obj: Any) -> None:
    """Write ``obj`` as JSON on stdout (no rich markup, one document)."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def setup_logging(level: str) -> None:
    """Configure the root logger once (stderr, ``level``)."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
