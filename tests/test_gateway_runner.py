"""ModelRunner on a family transformers' paged continuous batching cannot run (DeepSeek-V3)."""

from __future__ import annotations

import asyncio

import torch
from gateway_ckpt import IdTokenizer

from eaas.gateway.runner import ModelRunner
from eaas.gateway.sampling import SamplingParams
from eaas.gateway.sequence import groups_to_admit

torch.set_num_threads(1)


def test_groups_to_admit():
    assert groups_to_admit([1] * 10, 0, 32, 4) == 4
    assert groups_to_admit([1] * 10, 30, 32, 4) == 2
    assert groups_to_admit([], 3, 32, 4) == 0
    assert groups_to_admit([1] * 5, 40, 32, 4) == 0
    # n > 1: a prompt starts n sequences, and a large group at the front is not overtaken
    assert groups_to_admit([3, 3, 1], 26, 32, 4) == 2
    assert groups_to_admit([8, 1], 26, 32, 4) == 0
    assert groups_to_admit([2, 2, 2], 0, 32, 2) == 2


def test_deepseek_v3_batched_matches_generate():
    model = _tiny_deepseek(seed=0)
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16]]
    with torch.no_grad():
        refs = [model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None)[0, len(p):].tolist()
                for p in prompts]
    runner = ModelRunner(model, IdTokenizer(), name="ds")
    runner.start()

    async def run():
        handles = [runner.submit(p, SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)) for p in prompts]
        for h in handles:
            async for event in h:
                assert event.error is None, event.error
        return [h.token_ids for h in handles]

    try:
        assert asyncio.run(run()) == refs
    finally:
        runner.stop()


def _tiny_deepseek(seed: int):
    """A tiny DeepSeek-V3 (MLA, 4 routed experts, first layer dense) with weights drawn from N(0, 0.2)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    cfg = DeepseekV3Config(
        vocab_size=300, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=128,
    )
    model = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    return model


def test_n_choices_fork_one_prefill_into_independent_caches():
    """n > 1 copies one prefill's (MLA) cache per choice: greedy choices all equal generate, and a
    seeded fork j equals a lone request seeded with seed + j (so the forks never share a cache)."""
    model = _tiny_deepseek(seed=1)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None)[0, 8:].tolist()
    runner = ModelRunner(model, IdTokenizer(), name="ds")
    runner.start()

    async def finish(handles):
        for h in handles:
            async for event in h:
                assert event.error is None, event.error
        return [h.token_ids for h in handles]

    async def run():
        greedy = await finish(runner.submit_all([prompt], SamplingParams(max_new_tokens=10, temperature=0,
                                                                         ignore_eos=True), n=3))
        seeded = SamplingParams(max_new_tokens=10, temperature=1.0, seed=42, ignore_eos=True, logprobs=2)
        forks = runner.submit_all([prompt], seeded, n=3)
        alone = [runner.submit(prompt, seeded.for_choice(j)) for j in range(3)]
        return greedy, await finish(forks), await finish(alone), forks

    try:
        greedy, forked, alone, forks = asyncio.run(run())
    finally:
        runner.stop()
    assert greedy == [ref] * 3
    assert forked == alone
    assert len({tuple(t) for t in forked}) == 3
    assert all(len(h.logprobs) == 10 and len(h.logprobs[0].top) == 2 for h in forks)
