"""Tiny checkpoint for the gateway tests: the project's own seeded tiny Mixtral plus a chat template."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_gateway_checkpoint(out: Path, *, seed: int = 0) -> Path:
    """Write a tiny Mixtral (fp32, 2 layers, 4 experts, top-2) with a chat-capable tokenizer to ``out``."""
    from transformers import AutoTokenizer

    from eaas.functions.checkpoint import write_tiny_checkpoint

    write_tiny_checkpoint("mixtral", out, layers=2, hidden=64, experts=4, top_k=2, dtype="float32", seed=seed)
    tok = AutoTokenizer.from_pretrained(out)
    if not getattr(tok, "chat_template", None):
        tok.chat_template = CHAT_TEMPLATE
        tok.save_pretrained(out)
    return out
