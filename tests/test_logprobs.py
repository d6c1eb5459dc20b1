"""Pure logprob helpers: finite numbers, prompt positions, the two OpenAI response shapes."""

from __future__ import annotations

import math

import pytest
import torch

from eaas.gateway.logprobs import (
    LOGPROB_FLOOR,
    chat_logprobs,
    completion_logprobs,
    prompt_logprobs,
    token_bytes,
    token_logprob,
    token_name,
)
from eaas.gateway.sampling import SamplingParams, TokenCounts, process_logits

TEXT = {0: "a", 1: "bb", 2: "ccc", 3: "é"}.__getitem__


def test_minus_infinity_becomes_a_finite_floor():
    logits = torch.tensor([0.0, -math.inf, 1.0, 0.5])
    entry = token_logprob(logits, 1, 4)
    assert entry.logprob == LOGPROB_FLOOR
    assert all(math.isfinite(lp) for _, lp in entry.top)
    assert entry.top[0][0] == 2 and entry.top[-1] == (1, LOGPROB_FLOOR)
    assert token_logprob(logits, 2, 0).top == ()


def test_prompt_logprobs_first_is_none_and_rows_predict_the_next_token():
    logits = torch.randn(4, 4)
    out = prompt_logprobs(logits, [3, 0, 2, 1], 2)
    assert out[0] is None and len(out) == 4
    rows = torch.log_softmax(logits, dim=-1)
    assert [e.logprob for e in out[1:]] == pytest.approx([float(rows[0, 0]), float(rows[1, 2]), float(rows[2, 1])])
    assert all(len(e.top) == 2 for e in out[1:])
    assert prompt_logprobs(logits[:1], [3], 2) == (None,)


def test_completion_shape_lists_the_chosen_token_and_offsets():
    entries = [None, token_logprob(torch.tensor([3.0, 0.0, 0.0, 0.0]), 2, 1)]
    body = completion_logprobs(entries, [3, 2], TEXT, [5, 6])
    assert body["tokens"] == ["é", "ccc"] and body["text_offset"] == [5, 6]
    assert body["token_logprobs"][0] is None and body["top_logprobs"][0] is None
    assert set(body["top_logprobs"][1]) == {"a", "ccc"}  # top-1 plus the chosen token


def test_the_chosen_token_keeps_its_own_logprob_when_names_collide():
    same = {0: "x", 1: "x", 2: "y", 3: "z"}.__getitem__
    entry = token_logprob(torch.tensor([2.0, 1.0, 0.0, 0.0]), 1, 2)
    top = completion_logprobs([entry], [1], same, [0])["top_logprobs"][0]
    assert top == {"x": entry.logprob}


def test_token_names_and_bytes():
    assert token_name("\ufffd", b"\xc3") == "bytes:\\xc3"
    assert token_name("\ufffd", "\ufffd".encode()) == "\ufffd"  # the replacement character itself
    assert token_name("ab", b"ab") == "ab"

    class ByteLevel:
        def convert_ids_to_tokens(self, i):
            return {0: "Ã", 1: "<0xA9>", 2: "<s>"}[i]

        def decode(self, ids):
            return "<s>"

    tok = ByteLevel()
    assert token_bytes(tok, 0) == b"\xc3" and token_bytes(tok, 1) == b"\xa9" and token_bytes(tok, 2) == b"<s>"


def test_chat_shape_has_bytes():
    body = chat_logprobs([token_logprob(torch.zeros(4), 3, 2)], TEXT, lambda i: TEXT(i).encode())
    item = body["content"][0]
    assert item["token"] == "é" and item["bytes"] == [0xC3, 0xA9] and len(item["top_logprobs"]) == 2
    assert body["refusal"] is None


def test_penalties_count_output_only_and_forks_copy_counts():
    params = SamplingParams(presence_penalty=1.0, frequency_penalty=0.5, repetition_penalty=2.0)
    counts = TokenCounts([0])
    counts.add(2)
    counts.add(2)
    fork = counts.copy()
    fork.add(3)
    scores = process_logits(torch.tensor([1.0, 1.0, 1.0, -1.0]), params, counts)
    # token 0: prompt only -> repetition 1/2; token 2: 1/2 - 2*0.5 - 1; token 3 untouched in the parent
    assert scores.tolist() == pytest.approx([0.5, 1.0, 0.5 - 1.0 - 1.0, -1.0])
    assert process_logits(torch.tensor([1.0, 1.0, 1.0, -1.0]), params, fork)[3] == pytest.approx(-2.0 - 0.5 - 1.0)
