"""ModelRunner on a family transformers' paged continuous batching cannot run (DeepSeek-V3)."""

from __future__ import annotations

import asyncio

import torch

from eaas.gateway.runner import ModelRunner, num_to_admit
from eaas.gateway.sampling import SamplingParams

torch.set_num_threads(1)


class _IdTokenizer:
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))

    def __len__(self):
        return 300


def test_num_to_admit():
    assert num_to_admit(10, 0, 32, 4) == 4
    assert num_to_admit(10, 30, 32, 4) == 2
    assert num_to_admit(0, 3, 32, 4) == 0
    assert num_to_admit(5, 40, 32, 4) == 0


def test_deepseek_v3_batched_matches_generate():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
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
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16]]
    with torch.no_grad():
        refs = [model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None)[0, len(p):].tolist()
                for p in prompts]
    runner = ModelRunner(model, _IdTokenizer(), name="ds")
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
