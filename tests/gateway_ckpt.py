"""Tiny checkpoints for the gateway tests.

Uses ``eaas.functions.checkpoint.write_tiny_checkpoint`` when it exists; otherwise
builds a tiny Mixtral with transformers' own ``save_pretrained`` and a small
byte-level BPE ``tokenizer.json`` (same on-disk format as a real checkpoint).
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "experts as a service serve the routed experts of mixture of experts models",
    "hello world, this is a tiny tokenizer for tests 0123456789",
    "attention clients call stateless expert workers over zeromq",
] * 20


def _write_tokenizer(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def write_gateway_checkpoint(out: Path, *, seed: int = 0) -> Path:
    """Write a tiny Mixtral (fp32, 2 layers, 4 experts, top-2) with a tokenizer to ``out``."""
    try:  # the project's own writer, when present
        from eaas.functions.checkpoint import write_tiny_checkpoint  # type: ignore

        write_tiny_checkpoint(
            "mixtral", out, layers=2, hidden=64, experts=4, top_k=2, dtype="float32", seed=seed
        )
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(out)
        if not getattr(tok, "chat_template", None):
            tok.chat_template = CHAT_TEMPLATE
            tok.save_pretrained(out)
        return out
    except ImportError:
        pass
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    vocab = 320
    config = MixtralConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        tie_word_embeddings=False,
    )
    model = MixtralForCausalLM(config).eval()
    # larger init so greedy text is not a single repeated token
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    _write_tokenizer(out, vocab_size=300)
    return out
