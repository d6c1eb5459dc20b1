"""`eaas checkpoint ...`: write tiny seeded checkpoints, inspect checkpoints."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from eaas.commands.common import cli_errors, console, print_json

app = typer.Typer(help="MoE checkpoints: write tiny seeded ones, inspect any.", no_args_is_help=True)


@app.command("tiny")
@cli_errors
def tiny(
    arch: str = typer.Option("mixtral", "--arch", help="model_type: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, gpt_oss"),
    out: Path = typer.Option(..., "--out", help="directory to write"),
    layers: int = typer.Option(2, "--layers", help="MoE layers (DeepSeek-V3 adds a dense first layer)"),
    hidden: int = typer.Option(64, "--hidden", help="hidden size D"),
    intermediate: int = typer.Option(None, "--intermediate", help="expert intermediate size I (default 2*D)"),
    experts: int = typer.Option(8, "--experts", help="routed experts per layer"),
    top_k: int = typer.Option(2, "--top-k", help="experts per token"),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16"),
    seed: int = typer.Option(0, "--seed", help="weight seed (same seed, same bytes)"),
    layout: str = typer.Option(None, "--layout", help="per_expert or fused (default: what transformers writes)"),
    max_shard_bytes: int = typer.Option(None, "--max-shard-bytes", help="shard the safetensors with an index"),
    as_json: bool = typer.Option(False, "--json", help="print the model spec as JSON"),
    force: bool = typer.Option(False, "--force", help="overwrite a non-empty --out directory"),
) -> None:
    """Write a small seeded MoE checkpoint (config.json, safetensors, tokenizer.json)."""
    from eaas.errors import ConfigError
    from eaas.functions import inspect_checkpoint, write_tiny_checkpoint

    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out} exists and is not empty (a registered model may point at it); use --force to overwrite")

    path = write_tiny_checkpoint(
        arch,
        out,
        layers=layers,
        hidden=hidden,
        intermediate=intermediate,
        experts=experts,
        top_k=top_k,
        dtype=dtype,
        seed=seed,
        layout=layout,
        max_shard_size=max_shard_bytes,
    )
    spec, _ = inspect_checkpoint(path, checksums=False)
    if as_json:
        print_json(spec.to_dict())
    else:
        console.print(
            f"wrote {spec.model_type} to {path}: {len(spec.moe_layers)} MoE layers x {spec.num_experts} experts, "
            f"top-{spec.top_k}, D={spec.hidden_size}, I={spec.intermediate_size}, {spec.dtype}",
            highlight=False,
        )


@app.command("inspect")
@cli_errors
def inspect(
    directory: Path = typer.Argument(..., help="checkpoint directory"),
    name: str = typer.Option(None, "--name", help="model name (default: directory name)"),
    functions: bool = typer.Option(False, "--functions", help="also list every expert function"),
    as_json: bool = typer.Option(False, "--json", help="print JSON: {model, functions}"),
) -> None:
    """Print a checkpoint's model spec (and its expert functions)."""
    from eaas.functions import inspect_checkpoint

    spec, fns = inspect_checkpoint(directory, name)
    if as_json:
        print_json({"model": spec.to_dict(), "functions": [f.to_dict() for f in fns]})
        return
    table = Table(title=f"model {spec.name}", show_header=False)
    for key, value in spec.to_dict().items():
        table.add_row(key, str(value))
    table.add_row("functions", str(len(fns)))
    table.add_row("expert bytes", str(sum(f.nbytes for f in fns)))
    console.print(table)
    if functions:
        ft = Table(title="functions")
        for col in ("id", "dtype", "nbytes", "checksum"):
            ft.add_column(col)
        for f in fns:
            ft.add_row(f.id, f.dtype, str(f.nbytes), f.checksum[:16])
        console.print(ft)
