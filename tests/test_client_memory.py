"""The attention client never materialises routed-expert weights: measured RSS."""

from __future__ import annotations

import json
import subprocess
import sys

_MEASURE = r"""
import json, sys, psutil, torch
torch.set_num_threads(1)
import transformers  # imported before the baseline: its import is not the model's memory
from eaas.platform.integration import load_client_model
from eaas.functions import experts_modules
proc = psutil.Process()
warm = load_client_model(sys.argv[2])  # same family, tiny experts: imports and lazy init happen here
del warm
before = proc.memory_info().rss
model = load_client_model(sys.argv[1])
after = proc.memory_info().rss
params = sum(p.numel() * p.element_size() for p in model.parameters())
buffers = sum(b.numel() * b.element_size() for b in model.buffers())
held = sum(p.numel() for m in experts_modules(model).values() for p in m.parameters(recurse=False))
print(json.dumps({"growth": after - before, "params": params + buffers, "expert_params_held": held}))
"""


def test_client_rss_stays_within_non_expert_parameters(tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    from eaas.functions import inspect_checkpoint

    ckpt = tiny_checkpoint("mixtral", hidden=256, intermediate=2048, experts=16, layers=2)
    _, fns = inspect_checkpoint(ckpt, checksums=False)
    expert_bytes = sum(f.nbytes for f in fns)
    assert expert_bytes > 180e6  # the experts dominate this checkpoint
    warm = tiny_checkpoint("mixtral", hidden=256, intermediate=16, experts=16, layers=2)
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(ckpt), str(warm)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["expert_params_held"] == 0
    margin = 32 << 20  # allocator and transformers bookkeeping
    assert m["growth"] <= m["params"] + margin, (m, expert_bytes)
    assert m["growth"] < 0.2 * expert_bytes, (m, expert_bytes)
