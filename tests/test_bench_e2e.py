"""`eaas bench e2e`: a real tiny run (monolithic gateway and `eaas up`, both live), the pure
helpers, and the monolithic gateway's experts-implementation switch it relies on."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from eaas.bench.e2e import (
    RATIO_KEYS,
    SIDES,
    E2EBenchConfig,
    choose_implementation,
    plot,
    ratios,
    run_e2e_bench,
    summary_lines,
    summary_table,
)


def test_bench_e2e_tiny_real_run(tmp_path):
    cfg = E2EBenchConfig(concurrencies=(1, 2), max_tokens=4, requests_per_client=1, min_requests=1, layers=1,
                         hidden=64, intermediate=128, workers=2, replicas=1, torch_threads=1, impl_repeats=1)  # fmt: skip
    steps: list[tuple[str, float]] = []
    out = run_e2e_bench(cfg, workdir=tmp_path / "run", progress=lambda msg, frac: steps.append((msg, frac)))
    out = json.loads(json.dumps(out))  # one JSON object

    assert out["benchmark"] == "e2e"
    rows = out["rows"]
    assert [r["concurrency"] for r in rows] == [1, 2]
    assert [r["order"] for r in rows] == [["monolithic", "eaas"], ["eaas", "monolithic"]]  # alternating
    for r in rows:
        for side in SIDES:
            row = r[side]
            assert row["failed_requests"] == 0 and row["num_requests"] == r["concurrency"]
            assert row["output_tokens_per_s"] > 0 and row["ttft_p50_ms"] > 0 and row["itl_p99_ms"] > 0
            assert row["cpu_s"] >= 0 and row["other_side_cpu_s"] >= 0
        assert set(r["ratio"]) == set(RATIO_KEYS)
        for key in RATIO_KEYS:
            assert r["ratio"][key] == pytest.approx(r["eaas"][key] / r["monolithic"][key], rel=1e-12)

    c = out["config"]
    tb = c["thread_budget"]
    assert tb["monolithic_threads"] == tb["eaas_total_threads"] and tb["eaas_worker_threads"] == 1 and tb["eaas_gateway_threads"] == 1
    assert tb["eaas_total_threads"] == 3 and "(W+1)×t" in tb["note"]
    timings = c["experts_impl_timings"]["results"]
    assert set(timings) == {"eager", "grouped_mm", "batched_mm"} and timings["eager"]["ok"]
    assert c["monolithic_impl"] == choose_implementation(timings)
    assert c["monolithic_impl_source"] == "fastest measured"
    assert c["model"]["monolithic"] == c["model"]["eaas"] == "mixtral-e2e"
    assert c["written_checkpoint"]["hidden"] == 64 and c["wall_s"] > 0
    assert c["engine"] == "slots"
    floor = c["wave_prefill_floor"]["results"]
    assert set(floor) == {"1", "2"} and floor["2"]["tokens"] >= 2 * 18 and floor["1"]["ms"] > 0
    # the monolithic gateway really loaded the chosen implementation
    log = (tmp_path / "run" / "monolithic.log").read_text()
    assert f"experts_implementation={c['monolithic_impl']}" in log
    # the EaaS workers ran the expert kernel the config states (default: onednn, prepacked weights)
    assert c["eaas_expert_kernel"] == "onednn"
    worker_logs = [p.read_text() for p in (tmp_path / "run" / "eaas").rglob("*.log") if "shard" in p.name]
    assert len(worker_logs) == 2 and all("(onednn kernel)" in text for text in worker_logs), worker_logs
    assert steps and steps[-1][1] == 1.0 and all(0.0 <= f <= 1.0 for _, f in steps)

    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(summary_table(out))
    text = console.export_text()
    assert "eaas/mono" in text and "monolithic" in text
    assert any("wall time" in line for line in summary_lines(out))
    png = tmp_path / "e2e.png"
    plot(out, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ratios_are_eaas_over_monolithic():
    mono = {"output_tokens_per_s": 100.0, "ttft_p50_ms": 10.0, "ttft_p99_ms": 0.0, "itl_p50_ms": None,
            "itl_p99_ms": 4.0}  # fmt: skip
    eaas = {"output_tokens_per_s": 80.0, "ttft_p50_ms": 15.0, "ttft_p99_ms": 3.0, "itl_p50_ms": 2.0,
            "itl_p99_ms": 5.0}  # fmt: skip
    assert ratios(mono, eaas) == {"output_tokens_per_s": 0.8, "ttft_p50_ms": 1.5, "ttft_p99_ms": None,
                                  "itl_p50_ms": None, "itl_p99_ms": 1.25}  # fmt: skip


def test_choose_implementation():
    timings = {"eager": {"ok": True, "score_ms": 3.0}, "grouped_mm": {"ok": False, "error": "x"},
               "batched_mm": {"ok": True, "score_ms": 2.0}}  # fmt: skip
    assert choose_implementation(timings) == "batched_mm"
    assert choose_implementation(timings, forced="eager") == "eager"
    assert choose_implementation({"a": {"ok": True, "score_ms": 1.0}, "b": {"ok": True, "score_ms": 1.0}}) == "a"
    with pytest.raises(ValueError):
        choose_implementation({"grouped_mm": {"ok": False, "error": "x"}})


@pytest.mark.parametrize("kw", [{"concurrencies": ()}, {"concurrencies": (0,)}, {"max_tokens": 0},
                                {"top_k": 9}, {"replicas": 3, "workers": 2}, {"torch_threads": 0},
                                {"engine": "paged"}, {"expert_kernel": "fast"}])
def test_config_rejects_bad_arguments(kw):
    with pytest.raises(ValueError):
        E2EBenchConfig(**kw).validate()


def test_cli_bad_argument_is_one_line_exit_2():
    p = subprocess.run([sys.executable, "-m", "eaas.cli", "bench", "e2e", "--concurrency", "0", "--json"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == 2 and "eaas bench e2e:" in p.stderr and p.stdout == ""


def test_monolithic_loader_takes_the_experts_implementation(tiny_checkpoint, monkeypatch):
    from eaas.errors import CheckpointError
    from eaas.gateway.serve import load_monolithic
    from eaas.settings import get_settings

    ckpt = tiny_checkpoint("mixtral")
    default = load_monolithic(ckpt)
    assert load_monolithic(ckpt, "batched_mm").config._experts_implementation == "batched_mm"
    assert load_monolithic(ckpt, None).config._experts_implementation == default.config._experts_implementation
    with pytest.raises(CheckpointError):
        load_monolithic(ckpt, "no_such_impl")
    assert get_settings().experts_implementation is None
    monkeypatch.setenv("EAAS_EXPERTS_IMPLEMENTATION", "eager")
    assert get_settings().experts_implementation == "eager"


def test_gateway_experts_implementation_needs_monolithic(tiny_checkpoint):
    from typer.testing import CliRunner

    from eaas.cli import app

    r = CliRunner().invoke(app, ["gateway", "--model", str(tiny_checkpoint("mixtral")), "--experts-implementation",
                                 "eager"])  # fmt: skip
    assert r.exit_code == 1 and "--monolithic" in r.output
