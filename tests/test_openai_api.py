"""The OpenAI API as the official ``openai`` SDK sees it, against a real gateway process.

A real uvicorn gateway (``eaas gateway --monolithic``) serves the tiny Mixtral; the test
process loads the same checkpoint with transformers to compute the reference logits. Every
parameter is either honoured (values checked against that reference) or refused with a 400
that names it.
"""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
from gateway_ckpt import gateway_process, write_gateway_checkpoint
from prometheus_client.parser import text_string_to_metric_families

from eaas.gateway.schemas import UNSUPPORTED_CHAT, UNSUPPORTED_COMPLETION

torch.set_num_threads(1)

MODEL = "tiny"
PROMPT = "the quick brown fox"
CHAT = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_gateway_checkpoint(tmp_path_factory.mktemp("oai") / "tiny")


@pytest.fixture(scope="module")
def server(checkpoint):
    with gateway_process(checkpoint, name=MODEL) as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def loaded(checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(checkpoint).eval(), AutoTokenizer.from_pretrained(checkpoint)


def ref_logprobs(loaded, ids: list[int]) -> torch.Tensor:
    """``[len(ids), V]`` log-softmax of the reference model's logits at every position."""
    model, _ = loaded
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def prompt_ids(loaded, text: str = PROMPT) -> list[int]:
    return loaded[1](text)["input_ids"]


def chat_ids(loaded, messages=CHAT) -> list[int]:
    ids = loaded[1].apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def greedy_reference(loaded, ids: list[int], n: int, adjust=None) -> list[int]:
    """Greedy decoding by full forwards, with ``adjust(logits[V], output_so_far) -> logits`` applied."""
    model, _ = loaded
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids + out])).logits[0, -1].float()
            if adjust is not None:
                logits = adjust(logits, out)
            out.append(int(torch.argmax(logits)))
    return out


def token_name(tok, t: int) -> str:
    """OpenAI's naming: the token's text, or ``bytes:\\xNN..`` when it is not whole UTF-8."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    text = tok.decode([t])
    if "\ufffd" not in text:
        return text
    table = {c: b for b, c in bytes_to_unicode().items()}
    return "bytes:" + "".join(f"\\x{table[c]:02x}" for c in tok.convert_ids_to_tokens(t))


def _metric(url: str, name: str) -> float:
    return sum(s.value for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text)
               for s in fam.samples if s.name == name)


def _refused(exc: pytest.ExceptionInfo, param: str) -> None:
    assert exc.value.status_code == 400
    err = exc.value.body
    assert err["param"] == param, err
    assert param in err["message"], err


# --- logprobs ---------------------------------------------------------------------------------


def test_completion_logprobs_are_log_softmax_of_the_model_logits(client, loaded):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=5,
                                  extra_body={"ignore_eos": True})
    choice = r.choices[0]
    ids = prompt_ids(loaded)
    out = choice.token_ids if hasattr(choice, "token_ids") else choice.model_extra["token_ids"]
    ref = ref_logprobs(loaded, ids + out)
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    tok = loaded[1]
    for i, t in enumerate(out):
        row = ref[len(ids) - 1 + i]
        assert lp.tokens[i] == token_name(tok, t)
        assert lp.token_logprobs[i] == pytest.approx(float(row[t]), abs=1e-4)
        top_ids = torch.topk(row, 5).indices.tolist()
        expected = {token_name(tok, j): float(row[j]) for j in reversed(top_ids)}
        expected[token_name(tok, t)] = float(row[t])  # the sampled token is always listed, with its own logprob
        assert set(lp.top_logprobs[i]) == set(expected)
        for key, value in expected.items():
            assert lp.top_logprobs[i][key] == pytest.approx(value, abs=1e-4)
    # text_offset indexes the returned text: non-decreasing, and each whole token is found where it says
    text = choice.text
    assert lp.text_offset == sorted(lp.text_offset) and all(0 <= o <= len(text) for o in lp.text_offset)
    for name, offset in zip(lp.tokens, lp.text_offset):
        if not name.startswith("bytes:") and name not in tok.all_special_tokens:
            assert text[offset:].startswith(name), (name, offset, text)

    # streamed: the same numbers, chunk by chunk, offsets continuing
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=5,
                                            stream=True, extra_body={"ignore_eos": True}))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [x for s in streamed for x in s.token_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-6)
    assert [x for s in streamed for x in s.text_offset] == lp.text_offset


def test_logprobs_limits_are_refused_by_name(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, logprobs=21)
    _refused(e, "logprobs")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=2, top_logprobs=3)
    _refused(e, "top_logprobs")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=2, logprobs=True,
                                       top_logprobs=21)
    _refused(e, "top_logprobs")


def test_chat_logprobs_streamed_and_not(client, loaded):
    kw = dict(model=MODEL, messages=CHAT, max_completion_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
              extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    ids = chat_ids(loaded)
    tok = loaded[1]
    out = greedy_reference(loaded, ids, 6)
    ref = ref_logprobs(loaded, ids + out)
    for i, (entry, t) in enumerate(zip(content, out)):
        row = ref[len(ids) - 1 + i]
        assert entry.token == token_name(tok, t)
        assert entry.logprob == pytest.approx(float(row[t]), abs=1e-4)
        assert [a.token for a in entry.top_logprobs] == [token_name(tok, j) for j in torch.topk(row, 3).indices.tolist()]
        assert [a.logprob for a in entry.top_logprobs] == pytest.approx(torch.topk(row, 3).values.tolist(), abs=1e-4)
    # the tokens' raw bytes join into the UTF-8 of the content, even where a character spans tokens
    text = tok.decode(out, skip_special_tokens=True)
    assert r.choices[0].message.content == text
    joined = b"".join(bytes(e.bytes) for e in content if tok.decode([out[content.index(e)]]) not in tok.all_special_tokens)
    assert joined.decode("utf-8", errors="replace") == text
    stream = list(client.chat.completions.create(**kw, stream=True))
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-6)
    assert [e.token for e in streamed] == [e.token for e in content]


def test_echo_returns_the_prompt_and_its_logprobs(client, loaded):
    ids = prompt_ids(loaded)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, echo=True,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text.startswith(PROMPT)
    assert len(r.choices[0].text) > len(PROMPT)
    # scoring a prompt: echo, logprobs, max_tokens=0 -> no new tokens, the prompt's logprobs (first is null)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == PROMPT and r.usage.completion_tokens == 0
    assert len(lp.token_logprobs) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = ref_logprobs(loaded, ids)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-4)
        assert len(lp.top_logprobs[i]) >= 2 or len(set(loaded[1].decode([j]) for j in torch.topk(ref[i - 1], 2).indices)) < 2
    # echo + logprobs + generation, streamed: the prompt and its logprobs come first
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0, echo=True,
                                            logprobs=1, stream=True, extra_body={"ignore_eos": True}))
    first = chunks[0].choices[0]
    assert first.text.startswith(PROMPT)
    assert first.logprobs.token_logprobs[0] is None
    assert len(first.logprobs.token_logprobs) == len(ids) + 1
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0)
    _refused(e, "max_tokens")


# --- logit processing -------------------------------------------------------------------------


def test_logit_bias_bans_a_token_and_is_validated(client, loaded):
    ids = prompt_ids(loaded)
    free = greedy_reference(loaded, ids, 8)
    banned = free[0]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                  logit_bias={str(banned): -100}, extra_body={"ignore_eos": True})
    out = r.choices[0].model_extra["token_ids"]
    assert banned not in out

    def bias(logits, _):
        logits = logits.clone()
        logits[banned] -= 100
        return logits

    assert out == greedy_reference(loaded, ids, 8, bias)
    for bad in ({"999999": 1}, {"12": 101}, {"x": 1}, {" 7": 1}, {"07": 1}, {"\u0667": 1}, {"\u00b2": 1},
                {"--5": 1}, {"9" * 5000: 1}, {"7": "100"}, {"7": True}, {"-3": 1}):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, logit_bias=bad)
        assert e.value.body["param"].startswith("logit_bias")


@pytest.mark.parametrize("presence,frequency", [(2.0, 0.0), (0.0, 2.0), (-1.0, 1.5)])
def test_penalties_follow_openais_definition(client, loaded, presence, frequency):
    """mu[j] - c[j] * frequency - (c[j] > 0) * presence, over the generated tokens only."""
    ids = prompt_ids(loaded)

    def penalize(logits, out):
        counts = torch.zeros_like(logits)
        for t in out:
            counts[t] += 1
        return logits - counts * frequency - (counts > 0).float() * presence

    expected = greedy_reference(loaded, ids, 12, penalize)
    assert expected != greedy_reference(loaded, ids, 12), "the penalty must change this greedy output"
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                  presence_penalty=presence, frequency_penalty=frequency,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].model_extra["token_ids"] == expected


def test_vllm_extra_sampling_parameters_work(client, loaded):
    ids = prompt_ids(loaded)
    greedy = greedy_reference(loaded, ids, 8)
    # top_k=1 and min_p=1 keep only the most likely token: sampling equals greedy at any temperature
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.5, seed=3,
                                      extra_body={"ignore_eos": True, **extra})
        assert r.choices[0].model_extra["token_ids"] == greedy, extra

    def repetition(logits, out):
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[torch.tensor(ids + out)] = True
        return torch.where(seen, torch.where(logits > 0, logits / 1.8, logits * 1.8), logits)

    expected = greedy_reference(loaded, ids, 12, repetition)
    assert expected != greedy_reference(loaded, ids, 12)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True, "repetition_penalty": 1.8})
    assert r.choices[0].model_extra["token_ids"] == expected


# --- lengths, choices, seeds ------------------------------------------------------------------


def test_max_completion_tokens_wins_over_max_tokens(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=5, max_tokens=20,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3
    assert r.usage.prompt_tokens_details.cached_tokens == 0


def test_n_choices_share_one_prefill_and_are_reproducible(client, server):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=1.0, n=3, seed=1234,
              extra_body={"ignore_eos": True})
    prefills = _metric(server, "eaas_gateway_prefills_total")
    a = client.completions.create(**kw)
    assert _metric(server, "eaas_gateway_prefills_total") - prefills == 1  # one prefill, three decodes
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    texts = [c.model_extra["token_ids"] for c in a.choices]
    assert texts == [c.model_extra["token_ids"] for c in b.choices]
    assert len({tuple(t) for t in texts}) == 3, "the choices of one seeded request must differ"
    # choice 0 is what n=1 with the same seed gives
    one = client.completions.create(**{**kw, "n": 1})
    assert one.choices[0].model_extra["token_ids"] == texts[0]
    assert a.usage.completion_tokens == 30 and a.usage.prompt_tokens == one.usage.prompt_tokens
    # streamed: every choice under its own index, the same tokens
    streamed: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.model_extra["token_ids"] or []
    assert [streamed[i] for i in range(3)] == texts
    # chat too
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=6, n=2, seed=5,
                                          temperature=1.0, extra_body={"ignore_eos": True})
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content != chat.choices[1].message.content
    # two prompts, n=2: prompt-major indices
    multi = client.completions.create(model=MODEL, prompt=[PROMPT, "hello"], max_tokens=3, n=2, seed=9,
                                      temperature=1.0, extra_body={"ignore_eos": True})
    assert [c.index for c in multi.choices] == [0, 1, 2, 3]


def test_best_of_returns_the_candidate_with_the_best_logprob_per_token(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=77, extra_body={"ignore_eos": True})
    candidates = client.completions.create(**kw, n=4, logprobs=0).choices
    scores = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in candidates]
    best = candidates[max(range(4), key=lambda i: scores[i])]
    r = client.completions.create(**kw, n=1, best_of=4)
    assert len(r.choices) == 1
    assert r.choices[0].model_extra["token_ids"] == best.model_extra["token_ids"]
    assert r.choices[0].logprobs is None  # ranked by logprobs, but not asked to return them
    assert r.usage.completion_tokens == 24
    two = client.completions.create(**kw, n=2, best_of=4)
    ranked = sorted(range(4), key=lambda i: -scores[i])[:2]
    assert [c.model_extra["token_ids"] for c in two.choices] == [candidates[i].model_extra["token_ids"] for i in ranked]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**kw, n=3, best_of=2)
    _refused(e, "best_of")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**kw, n=1, best_of=2, stream=True)
    _refused(e, "best_of")


def test_a_tiny_temperature_is_greedy(client, loaded):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1e-39,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].model_extra["token_ids"] == greedy_reference(loaded, prompt_ids(loaded), 6)


def test_more_sequences_than_ever_queue_is_a_400_not_a_429(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=["hi"] * 64, n=5, max_tokens=1)
    _refused(e, "n")


def test_seed_takes_any_signed_64_bit_integer(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1.0, extra_body={"ignore_eos": True})
    for seed in (-1, -(2**63), 2**63 - 1):
        a = client.completions.create(**kw, seed=seed)
        b = client.completions.create(**kw, seed=seed)
        assert a.choices[0].model_extra["token_ids"] == b.choices[0].model_extra["token_ids"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**kw, seed=2**63)
    _refused(e, "seed")


def test_stream_options_only_with_stream(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, stream_options={"include_usage": True})
    _refused(e, "stream_options")
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=3, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 3 and chunks[-1].choices == []


# --- models, messages, unknown and refused fields ---------------------------------------------


def test_retrieve_model(client):
    m = client.models.retrieve(MODEL)
    assert m.id == MODEL and m.object == "model"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.body["code"] == "model_not_found" and "no-such-model" in e.value.body["message"]


def test_an_unknown_model_is_model_not_found_on_every_endpoint(client):
    """OpenAI answers an unknown model with 404 ``model_not_found`` wherever a model is named
    (docs/openai-api.md says so); the generation endpoints used to answer ``not_found``."""
    calls = {
        "completions": lambda: client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2),
        "chat": lambda: client.chat.completions.create(model="no-such-model", messages=CHAT, max_completion_tokens=2),
        "retrieve": lambda: client.models.retrieve("no-such-model"),
    }
    for name, call in calls.items():
        with pytest.raises(openai.NotFoundError) as e:
            call()
        body = e.value.body
        assert (body["code"], body["type"], body["param"]) == ("model_not_found", "invalid_request_error", "model"), name
        assert "no-such-model" in body["message"] and MODEL in body["message"], name


def test_chat_content_as_text_parts(client):
    kw = dict(model=MODEL, max_completion_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    plain = client.chat.completions.create(messages=[{"role": "user", "content": "hello there"}], **kw)
    parts = client.chat.completions.create(
        messages=[{"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "there"}]}],
        **kw)
    joined = client.chat.completions.create(messages=[{"role": "user", "content": "hello\nthere"}], **kw)
    assert parts.choices[0].message.content == joined.choices[0].message.content
    assert parts.usage.prompt_tokens == joined.usage.prompt_tokens != plain.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
            **kw)
    assert e.value.body["param"].startswith("messages.0.content") and "image_url" in e.value.body["message"]


def test_unknown_field_is_refused_by_name(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, extra_body={"foo": 1})
    _refused(e, "foo")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=2, extra_body={"bar": 1})
    _refused(e, "bar")


REFUSED_VALUES = {
    "suffix": "and then", "audio": {"voice": "alloy", "format": "wav"}, "function_call": "auto",
    "functions": [{"name": "f", "parameters": {}}], "metadata": {"k": "v"}, "modalities": ["text", "audio"],
    "parallel_tool_calls": False, "prediction": {"type": "content", "content": "x"}, "prompt_cache_key": "k",
    "reasoning_effort": "low", "response_format": {"type": "json_object"}, "safety_identifier": "u1",
    "service_tier": "flex", "store": True, "tool_choice": "auto",
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "verbosity": "low",
    "web_search_options": {},
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED_COMPLETION) + sorted(UNSUPPORTED_CHAT))
def test_unsupported_parameters_are_refused_by_name(client, name):
    if name in UNSUPPORTED_COMPLETION:
        call = lambda: client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2,  # noqa: E731
                                                 extra_body={name: REFUSED_VALUES[name]})
    else:
        call = lambda: client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=2,  # noqa: E731
                                                      extra_body={name: REFUSED_VALUES[name]})
    with pytest.raises(openai.BadRequestError) as e:
        call()
    _refused(e, name)
    assert e.value.body["code"] == "unsupported_parameter"


def test_harmless_values_of_unsupported_parameters_are_accepted(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=2, tools=[],
                                       response_format={"type": "text"}, store=False, tool_choice="none",
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 2
