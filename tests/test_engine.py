"""The runner's engines against ``model.generate``, for all six families.

``slots`` (batched prefill, KV slots read and written in place) and ``padded`` (the previous
engine, kept selectable) must both give every request exactly what ``generate`` gives it alone:
mixed prompt lengths arriving together and while others decode, sliding windows shorter than
the sequences, ``n`` > 1 forks, and cancellations that free rows in the middle of the batch.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from gateway_ckpt import IdTokenizer

from eaas.gateway.runner import ModelRunner
from eaas.gateway.sampling import SamplingParams
from eaas.gateway.sequence import microbatch_split, prefill_batch
from eaas.gateway.slotcache import allowed

torch.set_num_threads(1)

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"]
SLIDING = {"mixtral": {"sliding_window": 5}, "gpt_oss": {"sliding_window": 4}}
PROMPTS = [[5, 6, 7], [11, 12, 13, 14, 15, 16, 17, 18, 19], [21], [31, 32, 33, 34, 35, 36]]
LATE = [[41, 42, 43, 44], [51, 52]]
NEW = 10


def _load(tiny_checkpoint, arch: str, sliding: bool):
    from transformers import AutoModelForCausalLM

    kw = SLIDING.get(arch, {}) if sliding else {}
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint(arch), **kw).eval()
    if sliding:
        assert model.config.sliding_window == kw["sliding_window"]
    return model


def _reference(model, prompt: list[int], n: int = NEW) -> list[int]:
    """``generate`` alone (stopping at EOS like the runner, not forced past it)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def _greedy(n: int = NEW) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0)


async def _tokens(handle) -> list[int]:
    async for event in handle:
        assert event.error is None, event.error
    return list(handle.token_ids)


CASES = [(arch, False) for arch in FAMILIES] + [(arch, True) for arch in SLIDING]


@pytest.mark.parametrize("engine", ["slots", "padded", "slots-microbatch"])
@pytest.mark.parametrize("arch,sliding", CASES, ids=[f"{a}{'-sliding' if s else ''}" for a, s in CASES])
def test_engine_matches_generate_for_every_request(tiny_checkpoint, arch, sliding, engine):
    model = _load(tiny_checkpoint, arch, sliding)
    want = {tuple(p): _reference(model, p) for p in PROMPTS + LATE}
    microbatch = engine == "slots-microbatch"  # every decode step of >= 2 rows as two concurrent halves
    runner = ModelRunner(model, IdTokenizer(100), name=arch, max_batch_size=8, engine=engine.split("-")[0],
                         microbatch_min_batch=2 if microbatch else 0)
    runner.start()

    async def run():
        first = [runner.submit(p, _greedy()) for p in PROMPTS]
        forked = runner.submit_all([PROMPTS[1]], _greedy(), n=2)  # one prefill, two rows
        doomed = runner.submit(PROMPTS[3], _greedy(40))  # cancelled mid-way: its row is refilled
        assert (await first[0].next_event()).error is None  # decoding: the late ones join a running batch
        late = [runner.submit(p, _greedy()) for p in LATE]
        for _ in range(3):
            event = await doomed.next_event()
            assert event.error is None and event.finish_reason is None, event
        doomed.cancel()
        results = [await _tokens(h) for h in first]
        return results, [await _tokens(h) for h in forked], [await _tokens(h) for h in late]

    try:
        results, forked, late = asyncio.run(run())
    finally:
        runner.stop()
    assert results == [want[tuple(p)] for p in PROMPTS]
    assert forked == [want[tuple(PROMPTS[1])]] * 2
    assert late == [want[tuple(p)] for p in LATE]
    if engine != "padded":
        assert runner._engine.rows == [] and runner._engine.cache.bytes_written > 0
        assert (runner._engine.overlapped_steps > 0) is microbatch
        assert (runner.health(60)[1]["microbatch_steps"] > 0) is microbatch  # /healthz shows it


def test_a_decode_step_copies_nothing_that_grows_with_context(tiny_checkpoint):
    """Slots engine: a decode step writes one position per row and layer, at any context length
    (the padded engine copied every cached position twice per step). The runner's steps are
    driven by hand here (no thread), so each step's bytes are read exactly."""
    model = _load(tiny_checkpoint, "mixtral", False)
    runner = ModelRunner(model, IdTokenizer(100), name="m", max_batch_size=4)
    loop = asyncio.new_event_loop()  # events are queued on it, never read
    try:
        runner.submit_all([list(range(1, 9))], SamplingParams(max_new_tokens=300, temperature=0, ignore_eos=True),
                          loop)
        slots = runner._engine.cache
        per_step = []
        with torch.inference_mode():
            for _ in range(200):
                before = (slots.bytes_written, slots.bytes_copied)
                assert runner._step()
                per_step.append((slots.bytes_written - before[0], slots.bytes_copied - before[1]))
    finally:
        loop.close()
    written = [w for w, _ in per_step[1:]]  # step 0 is the prefill
    copied = [c for _, c in per_step[1:]]
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    one_position = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 4  # keys + values, fp32
    assert written == [one_position] * len(written)  # at context 9 as at context 208
    # no copies, except the buffers doubling (64 -> 128 -> 256 columns) on two steps
    assert sum(1 for c in copied if c) == 2 and copied[:50] == [0] * 50


def test_prefill_batch_budget():
    assert prefill_batch([10, 10, 10], 30) == 3
    assert prefill_batch([10, 10, 10], 25) == 2
    assert prefill_batch([100, 5], 50) == 1  # a long prompt goes alone
    assert prefill_batch([5, 100], 50) == 1
    assert prefill_batch([], 50) == 0


def test_allowed_masks_are_causal_per_row_and_windowed():
    q = torch.tensor([[2], [4]])
    ok = allowed(q, torch.tensor([3, 5]), 5, None)[:, 0, 0]
    assert ok.tolist() == [[True, True, True, False, False], [True] * 5]
    ok = allowed(q, torch.tensor([3, 5]), 5, 2)[:, 0, 0]
    assert ok.tolist() == [[False, True, True, False, False], [False, False, False, True, True]]


def test_microbatch_split():
    assert microbatch_split(8, 0) == 0  # off
    assert microbatch_split(1, 1) == 0  # one row cannot overlap with itself
    assert microbatch_split(7, 8) == 0 and microbatch_split(8, 8) == 4 and microbatch_split(9, 2) == 4
