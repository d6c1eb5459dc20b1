"""`eaas checkpoint train`: the corpus split, the expert-load statistics, determinism, the shipped model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from eaas.errors import ConfigError
from eaas.training import TrainConfig, gini, hottest_fraction, layer_load, train
from eaas.training.corpus import load_corpus, pydoc_topics, split_held_out
from eaas.training.routing import ExpertLoad, measure_expert_load
from eaas.training.trainer import REPORT_JSON, REPORT_PNG, learning_rate

TINY = TrainConfig(layers=1, hidden=32, intermediate=32, experts=4, top_k=2, vocab_size=300, seq_len=32, batch_size=2,
                   steps=3, warmup_steps=1, eval_every=3, eval_windows=2, source="topics", max_documents=40)


@pytest.mark.parametrize("counts, expect_gini, expect_hot", [
    ([5, 5, 5, 5], 0.0, 0.25),
    ([0, 0, 0, 8], 0.75, 1.0),  # one of 4 takes all: (n - 1) / n
    ([1, 2, 3, 4], 0.25, 0.4),  # 2 * (1 + 4 + 9 + 16) / (4 * 10) - 5 / 4
    ([0, 0], 0.0, 0.0),
])
def test_gini_and_hottest_fraction_on_known_counts(counts, expect_gini, expect_hot) -> None:  # type: ignore[no-untyped-def]
    assert gini(counts) == pytest.approx(expect_gini)
    assert hottest_fraction(counts) == pytest.approx(expect_hot)


def test_statistics_refuse_bad_input() -> None:
    with pytest.raises(ConfigError):
        gini([])
    with pytest.raises(ConfigError):
        gini([1, -1])
    with pytest.raises(ConfigError):
        layer_load(torch.zeros(3), 1)
    with pytest.raises(ConfigError):
        layer_load(torch.zeros(3, 4), 5)


def test_layer_load_counts_top_k_choices_on_a_known_routing() -> None:
    # token 0 -> experts 2, 0; token 1 -> 2, 3; token 2 -> 1, 2
    logits = torch.tensor([[3.0, 1.0, 5.0, 0.0], [0.0, 1.0, 9.0, 2.0], [0.0, 4.0, 3.0, -1.0]])
    assert layer_load(logits, 2) == [1, 1, 3, 1]
    load = ExpertLoad.of(7, layer_load(logits, 2))
    assert load.layer == 7 and load.hottest_fraction == pytest.approx(0.5) and load.gini == pytest.approx(gini([1, 1, 3, 1]))


def test_measure_expert_load_adds_up_every_window_and_layer() -> None:
    from eaas.functions.checkpoint import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("mixtral", layers=2, hidden=32, intermediate=32, experts=4,
                                                         top_k=2, vocab_size=64, eos_token_id=0, pad_token_id=1)).eval()
    windows = torch.randint(0, 64, (5, 8), generator=torch.Generator().manual_seed(1))
    loads = measure_expert_load(model, windows, 2, [0, 1], batch_size=2)
    with torch.no_grad():
        logits = model(input_ids=windows, output_router_logits=True).router_logits
    assert [l.layer for l in loads] == [0, 1]
    for load, lg in zip(loads, logits):
        assert list(load.counts) == layer_load(lg.reshape(-1, 4), 2)
        assert sum(load.counts) == 5 * 8 * 2


def test_held_out_split_is_seeded_and_disjoint() -> None:
    docs = pydoc_topics()
    train_a, held_a = split_held_out(docs, 0.1, seed=0)
    train_b, held_b = split_held_out(docs, 0.1, seed=0)
    _, held_c = split_held_out(docs, 0.1, seed=1)
    assert (train_a, held_a) == (train_b, held_b)
    assert held_a != held_c
    assert not set(train_a) & set(held_a) and len(train_a) + len(held_a) == len(docs)
    assert 0.03 < len(held_a) / len(docs) < 0.2
    with pytest.raises(ConfigError):
        split_held_out(docs, 0.0, seed=0)


def test_learning_rate_warms_up_then_decays_to_the_floor() -> None:
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert learning_rate(0, cfg) == pytest.approx(1e-4)
    assert learning_rate(9, cfg) == pytest.approx(1e-3)
    assert learning_rate(99, cfg) == pytest.approx(1e-4, rel=0.01)
    assert learning_rate(40, cfg) > learning_rate(60, cfg)


def test_training_is_deterministic_on_a_tiny_budget(tmp_path: Path) -> None:
    corpus = load_corpus("topics", max_documents=40)
    a = train(TINY, tmp_path / "a", corpus=corpus)
    b = train(TINY, tmp_path / "b", corpus=corpus)
    c = train(dataclasses.replace(TINY, seed=1), tmp_path / "c", corpus=load_corpus("topics", max_documents=40, seed=1))
    weights = [(tmp_path / d / "model.safetensors").read_bytes() for d in "abc"]
    assert weights[0] == weights[1]
    assert weights[0] != weights[2]
    assert [p["train_loss"] for p in a.curve] == [p["train_loss"] for p in b.curve]
    report = json.loads((tmp_path / "a" / REPORT_JSON).read_text())
    assert report["held_out_loss"] == a.held_out_loss and len(report["expert_load"]) == 1
    assert sum(report["expert_load"][0]["counts"]) > 0
    assert (tmp_path / "a" / REPORT_PNG).stat().st_size > 0
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["dtype"] == "float32"
    assert (tmp_path / "a" / "tokenizer.json").is_file() and c.tokens["train"] > 0


def test_the_shipped_default_model_is_a_trained_checkpoint_under_20_mb() -> None:
    from eaas.deploy import packaged_model_dir
    from eaas.functions import inspect_checkpoint

    path = packaged_model_dir()
    total = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    assert total <= 20 * 1024 * 1024, total
    spec, fns = inspect_checkpoint(path, checksums=False)
    assert spec.model_type == "mixtral" and len(fns) == len(spec.moe_layers) * spec.num_experts
    report = json.loads((path / REPORT_JSON).read_text())
    first_held = next(p["held_out_loss"] for p in report["curve"] if "held_out_loss" in p)
    assert report["held_out_loss"] < first_held - 1.0  # it learned: the held-out loss fell by > 1 nat/token
    assert report["config"]["source"] == "topics+docstrings"
