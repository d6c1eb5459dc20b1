"""Tiny checkpoint for the gateway tests: the project's own seeded tiny Mixtral (its
tokenizer carries a chat template)."""

from __future__ import annotations

from pathlib import Path


def write_gateway_checkpoint(out: Path, *, seed: int = 0) -> Path:
    """Write a tiny Mixtral (fp32, 2 layers, 4 experts, top-2) with a chat-capable tokenizer to ``out``."""
    from eaas.functions.checkpoint import write_tiny_checkpoint

    write_tiny_checkpoint("mixtral", out, layers=2, hidden=64, experts=4, top_k=2, dtype="float32", seed=seed)
    return out
