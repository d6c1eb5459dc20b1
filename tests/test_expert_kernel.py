"""The ``onednn`` expert kernel (EAAS_EXPERT_KERNEL): the same math as the eager body on
prepacked weights for 2+ rows, close to transformers but not its bits (single rows keep them);
shards it cannot run stay eager."""

from __future__ import annotations

import pytest
import torch

from eaas.functions import (
    SUPPORTED_MODEL_TYPES,
    experts_modules,
    inspect_checkpoint,
    load_shard,
    write_tiny_checkpoint,
)
from eaas.functions.expert_math import LINEAR_BODY_CLASSES
from eaas.platform.integration import load_model
from eaas.settings import get_settings
from eaas.testing import wait_workers_ready

torch.set_num_threads(1)

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def _reference(module: torch.nn.Module, x: torch.Tensor, expert: int) -> torch.Tensor:
    """The transformers module's own computation of one expert, weight 1."""
    n = x.shape[0]
    with torch.no_grad():
        return module(x, torch.full((n, 1), expert, dtype=torch.long), torch.ones((n, 1), dtype=x.dtype))


@pytest.fixture(scope="module", params=SUPPORTED_MODEL_TYPES)
def case(request, tmp_path_factory):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    arch = request.param
    path = write_tiny_checkpoint(arch, tmp_path_factory.mktemp(arch), dtype="float32", hidden=32, experts=8)
    spec, _ = inspect_checkpoint(path, checksums=False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager")
    return spec, experts_modules(model.eval())


@pytest.mark.parametrize("n", [1, 7, 64])
def test_onednn_shard_matches_transformers_within_rounding(case, n) -> None:  # type: ignore[no-untyped-def]
    spec, modules = case
    layer = spec.moe_layers[-1]
    pairs = [(layer, e) for e in range(spec.num_experts)]
    eager = load_shard(spec.checkpoint, pairs)
    shard = load_shard(spec.checkpoint, pairs, kernel="onednn")
    linear = type(modules[layer]).__name__ in LINEAR_BODY_CLASSES
    assert eager.kernel == "eager"
    assert shard.kernel == ("onednn" if linear else "eager")  # GPT-OSS (matmul + biases) stays eager
    assert shard.nbytes == (2 if linear else 1) * eager.nbytes  # the prepacked copy is a second one
    gen = torch.Generator().manual_seed(n)
    for e in range(spec.num_experts):
        x = torch.randn(n, spec.hidden_size, generator=gen)
        y = shard.forward(x, [((layer, e), n)])
        ref = _reference(modules[layer], x, e)
        assert y.shape == x.shape and y.dtype == torch.float32
        assert (y - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item()), (e, n)
        if not linear or n == 1:  # a single row stays on the eager body: transformers' bits
            assert torch.equal(y, eager.forward(x, [((layer, e), n)]))


def test_onednn_falls_back_to_eager_for_bf16_and_refuses_unknown_kernels(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = write_tiny_checkpoint("mixtral", tmp_path / "bf16", dtype="bfloat16", hidden=32, experts=4)
    spec, _ = inspect_checkpoint(path, checksums=False)
    pairs = [(spec.moe_layers[0], e) for e in range(4)]
    shard = load_shard(path, pairs, kernel="onednn")
    assert shard.kernel == "eager"
    x = torch.randn(5, spec.hidden_size).to(torch.bfloat16)
    assert torch.equal(shard.forward(x, [(pairs[2], 5)]), load_shard(path, pairs).forward(x, [(pairs[2], 5)]))
    with pytest.raises(ValueError, match="unknown expert kernel 'fast'"):
        load_shard(path, pairs, kernel="fast")


def test_worker_with_onednn_kernel_serves_transformers_tokens(registry, registered, tiny_checkpoint, workers,
                                                               eaas_env) -> None:  # type: ignore[no-untyped-def]
    """Real worker processes started with EAAS_EXPERT_KERNEL=onednn: logits within float32 rounding of
    transformers' and greedy tokens equal; the logits are not eager's bits (the kernel really ran)."""
    from transformers import AutoModelForCausalLM

    model = registered("mixtral")
    workers(model, ["all", "all"], env={**eaas_env, "EAAS_EXPERT_KERNEL": "onednn"})
    wait_workers_ready(registry, model, 2)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("mixtral"), experts_implementation="eager").eval()
    eaas_model, client = load_model(model, settings=get_settings(redis_url="unused", prefix=registry.prefix),
                                    registry=registry)
    try:
        ids = torch.randint(0, ref.config.vocab_size, (2, 12))
        with torch.no_grad():
            want = ref(ids).logits
            got = eaas_model(ids).logits
        assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())
        assert not torch.equal(got, want)
        prompt = ids[:1, :6]
        want_tokens = ref.generate(prompt, max_new_tokens=24, do_sample=False, min_new_tokens=24)
        got_tokens = eaas_model.generate(prompt, max_new_tokens=24, do_sample=False, min_new_tokens=24)
        assert torch.equal(got_tokens, want_tokens)
    finally:
        client.close()


def test_a_worker_that_cannot_run_onednn_says_it_runs_eager(registry, registered, workers, eaas_env,
                                                             tmp_path) -> None:  # type: ignore[no-untyped-def]
    """GPT-OSS experts (matmul + biases) cannot be prepacked: the worker's one start line says
    which kernel it runs and why it is not the one asked for."""
    from eaas.testing import wait_for

    model = registered("gpt_oss")
    workers(model, ["all"], env={**eaas_env, "EAAS_EXPERT_KERNEL": "onednn"})
    wait_workers_ready(registry, model, 1)
    log = tmp_path / "w0.log"
    wait_for(lambda: "experts at" in log.read_text(), 10, what="the worker's start line")
    line = next(ln for ln in log.read_text().splitlines() if "experts at" in ln)
    assert line.endswith("(eager kernel; EAAS_EXPERT_KERNEL=onednn needs float32 CPU linear experts)"), line
