"""One command: a headless Locust load test against a fresh ``eaas up``, with worker kills, and a plot.

    python loadtest/run.py --out loadtest-report          # 60 s, 10 users, a SIGKILL every 15 s (3 at most)

Steps: start ``eaas up`` in the background (private Redis, tiny Mixtral, 3 workers
with every expert on >= 2 replicas, autoscaler) on a free port with its own state
directory under ``--out``; wait for ``/readyz``; run Locust headless for
``--duration-s`` (``--csv``, ``--csv-full-history``, ``--html``) while the fault
companion kills a random worker every ``--kill-interval-s``; wait (bounded) for the
pool to get back to its size; write ``throughput_p99.png`` (requests/s and p99
latency over time from Locust's ``*_stats_history.csv``, kills marked) and
``kills.csv``; stop ``eaas up`` with SIGTERM. Exit code 0 only if no request failed.

``--attach STATE_DIR`` uses a running deployment instead of starting one.
Every other ``EAAS_LT_*`` variable of ``locustfile.py`` / ``shapes.py`` is passed through.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
HTTP_TYPES = {"GET", "POST", "PUT", "DELETE", "PATCH"}


def read_history(path: Path) -> dict[str, list[tuple[float, float, float]]]:
    """Locust's ``*_stats_history.csv`` -> ``{name: [(unix s, requests/s, p99 ms)]}`` for HTTP rows only.

    Custom metrics (TTFT, ITL) and the Aggregated row (which includes them) are left out.
    """
    out: dict[str, list[tuple[float, float, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("Type") not in HTTP_TYPES:
                continue
            p99 = row.get("99%", "N/A")
            out.setdefault(row["Name"], []).append(
                (float(row["Timestamp"]), float(row["Requests/s"]), float(p99) if p99 not in ("N/A", "") else math.nan))
    return out


def plot(history_csv: Path, kill_times_s: list[float], png: Path) -> None:
    """Requests/s (all HTTP requests) and p99 latency per request name over time, kills as red lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = read_history(history_csv)
    t0 = min((rows[0][0] for rows in hist.values() if rows), default=time.time())
    total: dict[float, float] = {}
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for name, rows in sorted(hist.items()):
        for ts, rps, _ in rows:
            total[ts] = total.get(ts, 0.0) + rps
        ax2.plot([r[0] - t0 for r in rows], [r[2] for r in rows], label=name)
    ts_sorted = sorted(total)
    ax1.plot([t - t0 for t in ts_sorted], [total[t] for t in ts_sorted], color="black", label="all requests")
    for k in kill_times_s:
        for ax in (ax1, ax2):
            ax.axvline(k - t0, color="red", linestyle="--", alpha=0.7)
    ax1.set_ylabel("requests/s")
    ax1.set_title(f"EaaS load test: throughput and p99 latency ({len(kill_times_s)} worker SIGKILLs, red)")
    ax1.legend(loc="lower right")
    ax2.set_ylabel("p99 latency (ms)")
    ax2.set_xlabel("time since start (s)")
    ax2.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def summarize(stats_csv: Path) -> dict[str, dict[str, float]]:
    """``{name: {requests, failures, p99_ms}}`` from Locust's ``*_stats.csv``."""
    out = {}
    with open(stats_csv, newline="") as f:
        for row in csv.DictReader(f):
            out[f"{row['Type']} {row['Name']}".strip()] = {
                "requests": int(row["Request Count"]), "failures": int(row["Failure Count"]),
                "p99_ms": float(row["99%"]) if row["99%"] not in ("N/A", "") else math.nan}
    return out


def main(argv: list[str] | None = None) -> int:
    from eaas.bench.harness import FaultInjector, UpProcess, ready_workers, wait_pool_size
    from eaas.registry import Registry

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("loadtest-report"), help="report directory")
    ap.add_argument("--duration-s", type=int, default=60, help="Locust run time (s)")
    ap.add_argument("--users", type=int, default=10, help="Locust users (without EAAS_LT_SHAPE)")
    ap.add_argument("--spawn-rate", type=float, default=5.0, help="users started per second")
    ap.add_argument("--kill-interval-s", type=float, default=15.0, help="seconds between worker SIGKILLs")
    ap.add_argument("--kills", type=int, default=3, help="SIGKILLs at most (0: no faults)")
    ap.add_argument("--workers", type=int, default=3, help="workers of the fresh eaas up (every expert on 2 replicas)")
    ap.add_argument("--user-classes", default="", help="Locust user classes, comma-separated (default: all)")
    ap.add_argument("--attach", type=Path, default=None, help="use the eaas up whose state dir this is")
    ap.add_argument("--recover-timeout-s", type=float, default=120.0, help="wait this long for the pool to recover")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    up = None
    if args.attach:
        state_dir = args.attach.resolve()
        st = json.loads((state_dir / "deployment.json").read_text())
        url, registry = st["gateway_url"], Registry.from_url(st["redis_url"], st["prefix"])
    else:
        print(f"starting eaas up ({args.workers} workers) in {out / 'deployment'} ...", flush=True)
        up = UpProcess(out / "deployment", workers=args.workers, replicas=2, autoscale=True).start()
        state_dir, url, registry = out / "deployment" / "state", up.url, up.registry()
    try:
        size = len(ready_workers(registry))
        print(f"gateway {url}, {size} ready workers; locust {args.users} users for {args.duration_s}s", flush=True)
        env = dict(os.environ, EAAS_STATE_DIR=str(state_dir))
        cmd = [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless", "--host", url,
               "-u", str(args.users), "-r", str(args.spawn_rate), "-t", f"{args.duration_s}s", "--stop-timeout", "30",
               "--csv", str(out / "locust"), "--csv-full-history", "--html", str(out / "locust.html"),
               "--only-summary", "--loglevel", "WARNING"]
        cmd += [c for c in args.user_classes.split(",") if c.strip()]
        inj = None
        if args.kills > 0:
            if size < 2:
                raise SystemExit(f"run: {size} ready worker(s): a kill would lose requests")
            inj = FaultInjector(registry, interval_s=args.kill_interval_s, max_kills=args.kills, min_ready=size)
            inj.start(until_s=time.time() + max(0.0, args.duration_s - 5.0))
        with open(out / "locust.log", "wb") as log:
            rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                timeout=args.duration_s + 120).returncode
        kills = inj.stop() if inj else []
        if inj:
            inj.write(out / "kills.csv")
        recovered_s = wait_pool_size(registry, size, args.recover_timeout_s) if kills else 0.0
        plot(out / "locust_stats_history.csv", [k.at_s for k in kills], out / "throughput_p99.png")
        stats = summarize(out / "locust_stats.csv")
        failures = sum(v["failures"] for v in stats.values())
        for name, v in stats.items():
            print(f"  {name:40s} {v['requests']:7d} requests  {v['failures']:4d} failed  p99 {v['p99_ms']:.0f} ms")
        print(f"kills: {len(kills)}; pool back to {size} ready workers after {recovered_s:.1f}s; "
              f"failed requests: {failures}; locust exit code {rc}")
        print(f"report: {out / 'locust.html'}, {out / 'locust_stats.csv'}, {out / 'throughput_p99.png'}")
        (out / "summary.json").write_text(json.dumps({"kills": len(kills), "failed_requests": failures,
                                                      "pool_size": size, "recovered_after_s": recovered_s,
                                                      "locust_exit_code": rc, "stats": stats}, indent=1))
        return 0 if failures == 0 and rc == 0 else 1
    finally:
        if up is not None:
            print("stopping eaas up ...", flush=True)
            up.stop()
        else:
            registry.close()


if __name__ == "__main__":
    sys.exit(main())
