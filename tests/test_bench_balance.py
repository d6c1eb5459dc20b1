"""`eaas bench balance`'s bookkeeping (pure): rebalance events, balancedness before/after, token gaps."""

from __future__ import annotations

import pytest

from eaas.bench.balance import BalanceBenchConfig, _events, held_out_mixes, summarize

CFG = BalanceBenchConfig(phase_s=20.0, sample_s=2.0, tail_s=6.0, gap_window_s=1.0)


def _row(t, phase, bal, extras=None):  # type: ignore[no-untyped-def]
    return {"t_s": t, "phase": phase, "balancedness": bal, "balancedness_workers": bal, "extras": extras or {},
            "draining": [], "tokens_per_worker": {}, "top_experts": [], "ready": 4}


def test_summary_splits_before_and_after_and_times_gaps_around_rebalances() -> None:
    a, b = {"w1": ["m/2/3"]}, {"w1": ["m/2/3"], "w0": ["m/3/7"]}
    rows = [_row(2, "A", 0.50), _row(4, "A", 0.60), _row(6, "A", 0.62), _row(8, "A", 0.80, a),
            _row(14, "A", 0.90, a), _row(18, "A", 0.92, a),
            _row(22, "B", 0.55, a), _row(28, "B", 0.70, b),
            _row(32, "B", 0.88, {"w0": ["m/3/7"]}), _row(36, "B", 0.94, {"w0": ["m/3/7"]}),
            _row(40, "B", 0.96, {"w0": ["m/3/7"]})]
    events = _events(rows)
    assert [(e["t_s"], e["kind"], e["worker"], e["functions"]) for e in events] == [
        (8, "replicas added", "w1", ["m/2/3"]), (28, "replicas added", "w0", ["m/3/7"]),
        (32, "replicas removed", "w1", ["m/2/3"])]
    gaps = [(7.5, 0.05), (8.4, 0.31), (20.0, 0.9), (27.0, 0.04), (31.5, 0.12)]
    s = summarize(rows, events, gaps, CFG, failed=0, requests=50)
    assert s["balancedness_before"] == pytest.approx((0.60 + 0.62) / 2)  # the first sample is warm-up
    assert s["balancedness_after"] == pytest.approx((0.90 + 0.92) / 2)  # t >= 20 - 6
    assert s["balancedness_after_move"] == pytest.approx((0.94 + 0.96) / 2)
    # a rebalance seen at sample t happened in (t - sample_s, t]: gaps ending in [t - sample_s - window, t + window] count
    assert [e["max_token_gap_s"] for e in events] == [0.31, 0.04, 0.12]  # the 0.9 s gap at t=20 is no rebalance
    assert s["max_token_gap_s"] == 0.31 and s["itl_max_s"] == 0.9
    assert s["rebalances"] == 3 and s["failed_requests"] == 0


def test_prompts_come_from_the_shipped_models_held_out_text() -> None:
    from eaas.deploy import packaged_model_dir
    from eaas.training.corpus import load_corpus

    mix_a, mix_b = held_out_mixes(packaged_model_dir(), 200)
    corpus = load_corpus("topics+docstrings")
    assert mix_a and mix_b and all(len(p) <= 200 for p in mix_a + mix_b)
    held = corpus.held_out
    assert len(mix_a) >= 20 and len(mix_b) >= 300  # several pieces per held-out document
    assert all(any(p in doc for doc in held) for p in mix_a[:20] + mix_b[:20])
    assert not any(p in doc for p in mix_a[:5] for doc in corpus.train)


def test_window_balancedness_sums_tokens_before_dividing_as_eplb_does() -> None:
    # two samples, layer 0: worker a 300 then 100, b 100 then 300 -> summed 400 / 400 -> 1.0 (the mean of the
    # per-sample values would say 0.667); layer 1: only a takes part
    rows = [dict(_row(2, "A", 0.5), layer_tokens={"0": {"a": 300, "b": 100}, "1": {"a": 50}}),
            dict(_row(4, "A", 0.5), layer_tokens={"0": {"a": 100, "b": 300}, "1": {"a": 50}})]
    s = summarize([_row(1, "A", None)] + rows, [], [], CFG, failed=0, requests=1)  # the first sample is warm-up
    assert s["balancedness_before"] == pytest.approx((400 / 2 * 2 + 100) / (400 + 100))  # (mean 400 + 100) / (max 400 + 100)
