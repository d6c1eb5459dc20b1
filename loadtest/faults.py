"""Fault companion for a load test: SIGKILL a random ready worker every N seconds (bounded count).

Finds the deployment through the registry (``--redis-url``/``--prefix``, else the
state file ``eaas up`` writes under ``$EAAS_STATE_DIR``), kills only while at least
``--min-ready`` workers are ready (default: the pool size when it starts, so the
previous victim has been replaced by the autoscaler and every expert keeps a
replica), and records every kill (unix time, worker id, pid, ready workers
before) to ``--out`` (``.csv`` or ``.json``). Locust reports any failed request.

    python loadtest/faults.py --interval-s 15 --count 4 --duration-s 120 --out kills.csv

Exits after ``--count`` kills or ``--duration-s`` seconds, whichever comes first
(SIGTERM/SIGINT stop it early; the kills so far are written).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from eaas.bench.harness import FaultInjector, ready_workers
    from eaas.registry import Registry
    from eaas.registry.deployment import resolve
    from eaas.settings import get_settings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interval-s", type=float, default=15.0, help="seconds between kills")
    ap.add_argument("--count", type=int, default=3, help="kills at most")
    ap.add_argument("--duration-s", type=float, default=300.0, help="stop after this long in any case")
    ap.add_argument("--min-ready", type=int, default=0, help="ready workers needed before a kill (0: the pool size now)")
    ap.add_argument("--model", default=None, help="only this model's workers")
    ap.add_argument("--redis-url", default=None, help="the deployment's Redis (default: EAAS_REDIS_URL or the state file)")
    ap.add_argument("--prefix", default=None, help="its key prefix (default: EAAS_PREFIX or the state file)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the victim choice")
    ap.add_argument("--out", type=Path, default=Path("kills.csv"), help="where the kills are recorded (.csv or .json)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.redis_url:
        url, prefix = args.redis_url, args.prefix or get_settings().prefix
    else:
        found = resolve(get_settings())
        if found is None:
            print("faults: no running deployment (start `eaas up`, or give --redis-url)", file=sys.stderr)
            return 2
        url, prefix = found
        prefix = args.prefix or prefix
    registry = Registry.from_url(url, prefix)
    min_ready = args.min_ready or len(ready_workers(registry, args.model))
    if min_ready < 2:
        print(f"faults: only {min_ready} ready worker(s); killing one would lose requests", file=sys.stderr)
        return 2
    inj = FaultInjector(registry, interval_s=args.interval_s, max_kills=args.count, min_ready=min_ready,
                        model=args.model, seed=args.seed)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: inj.stop())
    inj.start(until_s=time.time() + args.duration_s)
    deadline = time.monotonic() + args.duration_s + 5
    while not inj.wait(0.2) and time.monotonic() < deadline:
        pass
    kills = inj.stop()
    inj.write(args.out)
    print(f"faults: {len(kills)} kill(s) recorded in {args.out}")
    registry.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
