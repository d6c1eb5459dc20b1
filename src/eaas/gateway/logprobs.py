"""Token logprobs: computed from raw logits in the runner, shaped for OpenAI's two response formats.

Numbers follow vLLM's OpenAI server: logprobs are the log-softmax of the model's raw
logits (before logit bias, penalties and temperature; vLLM's default
``logprobs_mode="raw_logprobs"``), and ``-inf`` becomes ``-9999.0`` so every number is
valid JSON (``vllm/entrypoints/openai/serving_chat.py``, ``max(logprob, -9999.0)``).

Legend: ``V`` vocabulary size, ``P`` prompt tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

LOGPROB_FLOOR = -9999.0
MAX_LOGPROBS = 20
"""Alternatives per position at most (vLLM's default ``max_logprobs``; OpenAI allows 20 for chat)."""

TokenText = Callable[[int], str]
"""Token id -> its text (``tokenizer.decode([id])``)."""


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


def completion_logprobs(entries: Sequence[TokenLogprob | None], token_ids: Sequence[int], text: TokenText,
                        offset: int = 0) -> tuple[dict, int]:
    """The ``choices[i].logprobs`` object of ``/v1/completions`` for some positions.

    Args:
        entries: one per position (None for the prompt's first token: null logprob, null top).
        token_ids: the tokens at those positions.
        text: token id -> text.
        offset: ``text_offset`` of the first position (characters into the choice's text).

    Returns:
        ``({"tokens", "token_logprobs", "top_logprobs", "text_offset"}, offset after them)``.
        ``top_logprobs[i]`` maps token text to logprob for the top ``k`` and the chosen token
        (so up to ``k + 1`` entries, as OpenAI documents).
    """
    tokens, lps, tops, offsets = [], [], [], []
    for tid, entry in zip(token_ids, entries):
        s = text(tid)
        tokens.append(s)
        offsets.append(offset)
        offset += len(s)
        if entry is None:
            lps.append(None)
            tops.append(None)
            continue
        lps.append(entry.logprob)
        top = {text(i): lp for i, lp in entry.top}
        top.setdefault(s, entry.logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}, offset


def chat_logprobs(entries: Sequence[TokenLogprob], text: TokenText) -> dict:
    """The ``choices[i].logprobs`` object of ``/v1/chat/completions``: ``{"content": [...], "refusal": None}``.

    Each content item is ``{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}``
    (OpenAI's ``ChatCompletionTokenLogprob``); ``bytes`` is the UTF-8 encoding of the token text.
    """

    def item(tid: int, lp: float) -> dict:
        s = text(tid)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8", errors="replace"))}

    content = [{**item(e.token_id, e.logprob), "top_logprobs": [item(i, lp) for i, lp in e.top]} for e in entries]
    return {"content": content, "refusal": None}
