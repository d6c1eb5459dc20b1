"""Human-facing output of the autoscaling benchmark: a rich table and a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table


def summary_table(result: dict[str, Any]) -> Table:
    """Autoscaled vs static-peak pool, one row per measure."""
    s = result["summary"]
    trace = result["config"]["trace"]
    table = Table(title=f"autoscale ({result['mode']}, trace {trace['kind']}, {trace['duration_s']:.0f} s, "
                        f"{trace['num_shards']} shards, SLO {s['slo_ms']:.0f} ms)")
    table.add_column("measure")
    table.add_column("autoscaled", justify="right")
    table.add_column("static peak", justify="right")
    table.add_row("worker-seconds", f"{s['worker_seconds']:,.0f}", f"{s['static_worker_seconds']:,.0f}")
    table.add_row("saved", f"{s['saved_fraction']:.1%} (paper: up to {s['paper_saved_fraction']:.1%})", "-")
    table.add_row("replicas (peak / static)", f"{s['peak_replicas']}", f"{s['static_replicas']}")
    table.add_row("SLO attainment", f"{s['slo_attainment']:.3%}", f"{s['static_slo_attainment']:.3%}")
    table.add_row("p50 ms", f"{s['p50_ms']}", f"{s['static_p50_ms']}")
    table.add_row("p99 ms", f"{s['p99_ms']}", f"{s['static_p99_ms']}")
    table.add_row("failed requests", f"{s['failed_requests']}", f"{s['static_failed_requests']}")
    table.add_row("requests", f"{s['num_requests']:,}", f"{s['num_requests']:,}")
    return table


def plot_timeline(result: dict[str, Any], path: Path) -> Path:
    """Write load (in replicas at target utilisation) and replicas over time as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = result["timeline"]
    t_min = [p["t_s"] / 60 for p in tl]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(t_min, [p["ideal_replicas"] for p in tl], label="offered load (replicas at target utilisation)", color="0.5")
    ax.step(t_min, [p["replicas"] for p in tl], where="post", label="replicas (incl. starting/draining)")
    ax.step(t_min, [p["ready"] for p in tl], where="post", label="ready replicas", linestyle="--")
    ax.axhline(result["summary"]["static_replicas"], color="red", linestyle=":", label="static pool for the peak")
    s = result["summary"]
    ax.set_title(f"{result['config']['trace']['kind']}: saved {s['saved_fraction']:.1%} worker-seconds, "
                 f"SLO {s['slo_attainment']:.2%} < {s['slo_ms']:.0f} ms, {s['failed_requests']} failed")
    ax.set_xlabel("time (min)")
    ax.set_ylabel("workers")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
