"""Token logprobs: computed from raw logits in the runner, shaped for OpenAI's two response formats.

Numbers follow vLLM's OpenAI server: logprobs are the log-softmax of the model's raw
logits (before logit bias, penalties and temperature; vLLM's default
``logprobs_mode="raw_logprobs"``), and ``-inf`` becomes ``-9999.0`` so every number is
valid JSON (``vllm/entrypoints/openai/serving_chat.py``, ``max(logprob, -9999.0)``).

Legend: ``V`` vocabulary size, ``P`` prompt tokens.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

LOGPROB_FLOOR = -9999.0
MAX_LOGPROBS = 20
"""Alternatives per position at most (vLLM's default ``max_logprobs``; OpenAI allows 20 for chat)."""

TokenText = Callable[[int], str]
"""Token id -> its name in a response: its text, or ``bytes:\\xNN...`` when it is not whole UTF-8."""
TokenBytes = Callable[[int], bytes]
"""Token id -> its raw bytes."""

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The raw bytes of one token.

    Byte-level BPE vocabularies (GPT-2's byte-to-unicode alphabet, ``transformers.convert_slow_tokenizer``)
    map back character by character; SentencePiece byte-fallback pieces are ``<0xNN>``; any other
    token is its decoded text in UTF-8.
    """
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str):
        m = _BYTE_FALLBACK.match(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        table = _byte_decoder()
        if piece and all(c in table for c in piece):
            return bytes(table[c] for c in piece)
    return tokenizer.decode([token_id]).encode("utf-8", errors="replace")


def token_name(text: str, raw: bytes) -> str:
    """How a token is named in a response: its text, or ``bytes:\\xe2\\x80`` (OpenAI's form) when
    the token is not whole UTF-8 (its text would be U+FFFD, shared by many tokens)."""
    if "\ufffd" in text and "\ufffd".encode() not in raw:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
    return text


def _finite(x: float) -> float:
    return x if x >= LOGPROB_FLOOR else LOGPROB_FLOOR  # -inf (and NaN, which compares False) -> the floor


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One position: the chosen token's logprob and the ``k`` most likely alternatives.

    Attributes:
        token_id: the token at this position (sampled, or the prompt's).
        logprob: its natural-log probability (finite, >= -9999).
        top: ``(token_id, logprob)`` of the ``k`` most likely tokens, most likely first.
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def _top(row: torch.Tensor, k: int) -> tuple[tuple[int, float], ...]:
    if k <= 0:
        return ()
    values, ids = torch.topk(row, min(k, row.shape[-1]))
    return tuple((int(i), _finite(float(v))) for i, v in zip(ids.tolist(), values.tolist()))


def token_logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """The logprob of ``token`` under ``logits[V]`` (raw, any float dtype) and its top ``k``."""
    row = torch.log_softmax(logits.float(), dim=-1)
    return TokenLogprob(token, _finite(float(row[token])), _top(row, k))


def prompt_logprobs(logits: torch.Tensor, prompt_ids: Sequence[int], k: int) -> tuple[TokenLogprob | None, ...]:
    """Logprobs of each prompt token given the tokens before it.

    Args:
        logits: ``[P, V]`` raw logits of every prompt position (row ``i`` predicts token ``i + 1``).
        prompt_ids: the ``P`` prompt tokens.
        k: alternatives per position.

    Returns:
        ``P`` entries; the first is None (nothing predicts the first token), as in OpenAI's
        and vLLM's ``echo`` responses.
    """
    if len(prompt_ids) < 2:
        return (None,) * len(prompt_ids)
    rows = torch.log_softmax(logits[:-1].float(), dim=-1)  # [P-1, V]
    targets = torch.tensor(prompt_ids[1:], dtype=torch.long, device=rows.device)
    chosen = rows.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
    tops: list[tuple[tuple[int, float], ...]] = [()] * len(chosen)
    if k > 0:
        values, ids = torch.topk(rows, min(k, rows.shape[-1]), dim=-1)
        tops = [tuple((int(i), _finite(float(v))) for i, v in zip(ri, rv)) for ri, rv in zip(ids.tolist(), values.tolist())]
    out: list[TokenLogprob | None] = [None]
    out += [TokenLogprob(int(t), _finite(lp), top) for t, lp, top in zip(prompt_ids[1:], chosen, tops)]
    return tuple(out)


def completion_logprobs(entries: Sequence[TokenLogprob | None], token_ids: Sequence[int], name: TokenText,
                        offsets: Sequence[int]) -> dict:
    """The ``choices[i].logprobs`` object of ``/v1/completions`` for some positions.

    Args:
        entries: one per position (None for the prompt's first token: null logprob, null top).
        token_ids: the tokens at those positions.
        name: token id -> its name (:func:`token_name`).
        offsets: ``text_offset`` per position (characters into the choice's text).

    Returns:
        ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``. ``top_logprobs[i]``
        maps token name to logprob for the top ``k`` and the chosen token (so up to ``k + 1``
        entries, as OpenAI documents); the chosen token's own logprob always wins its key.
    """
    tokens, lps, tops = [], [], []
    for tid, entry in zip(token_ids, entries):
        s = name(tid)
        tokens.append(s)
        if entry is None:
            lps.append(None)
            tops.append(None)
            continue
        lps.append(entry.logprob)
        top = {name(i): lp for i, lp in reversed(entry.top)}  # on a shared name the likelier token wins
        top[s] = entry.logprob
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": list(offsets)}


def chat_logprobs(entries: Sequence[TokenLogprob], name: TokenText, raw: TokenBytes) -> dict:
    """The ``choices[i].logprobs`` object of ``/v1/chat/completions``: ``{"content": [...], "refusal": None}``.

    Each content item is ``{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}``
    (OpenAI's ``ChatCompletionTokenLogprob``); ``bytes`` are the token's raw bytes, so the bytes of
    consecutive tokens join into the UTF-8 of the content even where a character spans tokens.
    """

    def item(tid: int, lp: float) -> dict:
        return {"token": name(tid), "logprob": lp, "bytes": list(raw(tid))}

    content = [{**item(e.token_id, e.logprob), "top_logprobs": [item(i, lp) for i, lp in e.top]} for e in entries]
    return {"content": content, "refusal": None}
