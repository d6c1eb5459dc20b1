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


@app.command("train")
@cli_errors
def train_cmd(
    out: Path = typer.Option(..., "--out", help="directory to write the checkpoint and its report into"),
    arch: str = typer.Option("mixtral", "--arch", help="mixtral or qwen3_moe"),
    layers: int = typer.Option(4, "--layers", help="MoE decoder layers"),
    hidden: int = typer.Option(192, "--hidden", help="hidden size D"),
    intermediate: int = typer.Option(192, "--intermediate", help="expert intermediate size I"),
    experts: int = typer.Option(8, "--experts", help="routed experts per layer"),
    top_k: int = typer.Option(2, "--top-k", help="experts per token"),
    vocab_size: int = typer.Option(2048, "--vocab-size", help="BPE vocabulary size"),
    steps: int = typer.Option(1800, "--steps", help="optimiser steps"),
    batch_size: int = typer.Option(16, "--batch-size", help="windows per step"),
    seq_len: int = typer.Option(128, "--seq-len", help="tokens per window"),
    lr: float = typer.Option(2e-3, "--lr", help="peak learning rate (cosine decay after warm-up)"),
    warmup_steps: int = typer.Option(100, "--warmup-steps", help="linear warm-up steps before the peak learning rate"),
    aux_coef: float = typer.Option(0.01, "--router-aux-loss-coef", help="weight of transformers' load-balancing loss"),
    source: str = typer.Option("topics+docstrings", "--source", help="topics (pydoc_data) or topics+docstrings (with stdlib docstrings)"),
    held_out: float = typer.Option(0.05, "--held-out", help="share of documents held out"),
    max_documents: int = typer.Option(None, "--max-documents", help="only the first N documents (quick trials)"),
    seed: int = typer.Option(0, "--seed", help="seed of the split, the weights and the batches"),
    dtype: str = typer.Option("float32", "--dtype", help="dtype the checkpoint is saved in (training is float32)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    force: bool = typer.Option(False, "--force", help="overwrite a non-empty --out directory"),
) -> None:
    """Train a small MoE on Python's own documentation; write the checkpoint, a loss curve and expert-load report."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from eaas.errors import ConfigError
    from eaas.training import TrainConfig, train
    from eaas.training.trainer import REPORT_JSON, REPORT_PNG

    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out} exists and is not empty; use --force to overwrite")
    config = TrainConfig(arch=arch, layers=layers, hidden=hidden, intermediate=intermediate, experts=experts,
                         top_k=top_k, vocab_size=vocab_size, steps=steps, batch_size=batch_size, seq_len=seq_len,
                         lr=lr, warmup_steps=min(warmup_steps, steps), router_aux_loss_coef=aux_coef, source=source, held_out_fraction=held_out,
                         max_documents=max_documents, seed=seed, dtype=dtype)
    columns = (TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=as_json, transient=False) as bar:
        task = bar.add_task("train", total=steps, loss="-")
        result = train(config, out, progress=lambda step, _n, loss: bar.update(task, completed=step, loss=f"{loss:.3f}"))
    if as_json:
        import json

        print_json(json.loads((out / REPORT_JSON).read_text()))
        return
    console.print(f"trained {arch} in {result.seconds / 60:.1f} min; expert load on held-out text:", highlight=False)
    table = Table()
    for col in ("layer", "hottest expert share", "Gini"):
        table.add_column(col, justify="right")
    for e in result.expert_load:
        table.add_row(str(e.layer), f"{e.hottest_fraction:.3f}", f"{e.gini:.3f}")
    console.print(table)
    seen = steps * batch_size * seq_len
    console.print(f"wrote {out}: held-out loss {result.held_out_loss:.3f} nats/token (perplexity "
                  f"{result.held_out_perplexity:.1f}); {seen:,} tokens seen in {steps} steps "
                  f"({seen / result.tokens['train']:.2f} passes over the {result.tokens['train']:,} training tokens); "
                  f"report: {out / REPORT_JSON}, {out / REPORT_PNG}", highlight=False)
