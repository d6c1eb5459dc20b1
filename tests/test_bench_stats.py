"""The benchmarks' statistics: the median's distribution-free interval, stream gaps."""

from __future__ import annotations

import pytest

from eaas.bench.stats import max_token_gap, median_ci


def test_median_interval_uses_order_statistics_with_the_binomial_coverage():
    med, (lo, hi), cov = median_ci([5, 1, 4, 2, 3, 6, 7, 9, 8])  # n = 9: [x(2), x(8)], coverage 0.961
    assert med == 5 and (lo, hi) == (2, 8) and cov == pytest.approx(1 - 2 * 10 / 512)
    med, (lo, hi), cov = median_ci([0.01, -0.02, 0.03, 0.0, 0.015, 0.005])  # n = 6: the range, 0.969
    assert med == pytest.approx(0.0075) and (lo, hi) == (-0.02, 0.03) and cov == pytest.approx(62 / 64)
    med, (lo, hi), cov = median_ci([1.0, 3.0, 2.0])  # too few for 95 %: the range, and it says so
    assert med == 2.0 and (lo, hi) == (1.0, 3.0) and cov == pytest.approx(0.75)
    with pytest.raises(ValueError):
        median_ci([])


def test_max_token_gap_counts_the_wait_for_the_first_token():
    assert max_token_gap(0.0, [0.5, 0.6, 2.1, 2.2], 2.3) == pytest.approx(1.5)
    assert max_token_gap(0.0, [3.0, 3.1], 3.2) == pytest.approx(3.0)
    assert max_token_gap(1.0, [], 4.0) == pytest.approx(3.0)


def test_failover_windows_count_tokens_by_arrival_and_the_pause_at_the_kill():
    from eaas.bench.failover import FailoverBenchConfig, Sample, _result, _window

    # two streams; the second stalls 1.2 s around t=3 (the "kill")
    a = Sample(0.0, 4.0, True, 200, 8, tuple(0.5 * i for i in range(1, 9)))
    b = Sample(1.0, 5.0, True, 200, 4, (1.2, 1.4, 2.6, 3.8))
    w = _window([a, b], 0.0, 4.0, mark_s=3.0)
    assert w["tokens_per_s"] == (8 + 4) / 4 and w["max_token_gap_s"] == pytest.approx(1.2)
    assert _window([a, b], 0.0, 4.0, mark_s=0.2)["max_token_gap_s"] == pytest.approx(0.5)  # only `a` in flight
    cfg = FailoverBenchConfig(rounds=6, window_s=4.0, kill_at_s=3.0)
    rounds = [{"baseline": dict(w, tokens_per_s=100.0), "kills": dict(w, tokens_per_s=100.0 * (1 - x)), "loss": x}
              for x in (0.01, 0.02, -0.01, 0.03, 0.0, 0.015)]
    out = _result(cfg, rounds, [], {"baseline": [[(0.5, 1.0, 2.0)]] * 6, "kills": [[(0.5, 3.0, 4.0)]] * 6},
                  3, 1.0, 0, __import__("pathlib").Path("/tmp"))
    s = out["summary"]
    assert s["loss_median"] == pytest.approx(0.0125) and s["loss_ci95"] == [-0.01, 0.03]
    assert s["max_token_gap_s"] == pytest.approx(1.2) and s["rounds"] == 6
    assert set(out) >= {"benchmark", "config", "summary", "phases", "timelines", "kills", "rounds"}
    assert out["timelines"]["kills"] == [[0.5, 3.0, 4.0]]
