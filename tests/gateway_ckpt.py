"""Helpers of the gateway tests: the project's own seeded tiny Mixtral (its tokenizer carries
a chat template), a real gateway process on it, and a stand-in tokenizer for runner tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path


def write_gateway_checkpoint(out: Path, *, seed: int = 0) -> Path:
    """Write a tiny Mixtral (fp32, 2 layers, 4 experts, top-2) with a chat-capable tokenizer to ``out``."""
    from eaas.functions.checkpoint import write_tiny_checkpoint

    write_tiny_checkpoint("mixtral", out, layers=2, hidden=64, experts=4, top_k=2, dtype="float32", seed=seed)
    return out


class IdTokenizer:
    """A tokenizer stand-in for runner tests: token ids decode to their decimal numbers, no EOS."""

    eos_token_id = None

    def __init__(self, vocab_size: int = 300) -> None:
        self.vocab_size = vocab_size

    def decode(self, ids, skip_special_tokens=True):  # noqa: ANN001, ANN201
        return " ".join(map(str, ids))

    def __len__(self) -> int:
        return self.vocab_size


@contextlib.contextmanager
def gateway_process(checkpoint: Path, *extra_args: str, name: str | None = "tiny") -> Iterator[tuple[str, subprocess.Popen]]:
    """``eaas gateway --monolithic`` on ``checkpoint`` in a real subprocess on a free loopback port.

    Yields ``(url, process)`` once ``/readyz`` answers 200 (within 90 s); killed on exit if still running.

    Raises:
        WaitTimeout: not ready in time. AssertionError: the process exited first (with its output).
    """
    import httpx

    from eaas.testing import wait_for

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "eaas.cli", "gateway", "--model", str(checkpoint), "--monolithic", "--port", str(port)]
    cmd += ["--name", name] if name else []
    env = dict(os.environ, OMP_NUM_THREADS="1", EAAS_TORCH_THREADS="1")
    proc = subprocess.Popen([*cmd, *extra_args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, f"gateway exited: {proc.stdout.read()}"
        try:
            return httpx.get(url + "/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, 90, interval_s=0.2, what="gateway /readyz")
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def greedy_reference(checkpoint: Path):  # type: ignore[no-untyped-def]
    """``generate(prompt, n) -> n token ids``: transformers' own greedy continuation of ``prompt``
    on ``checkpoint``, monolithically, exactly ``n`` tokens (EOS not honoured)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()

    def generate(prompt: str, n: int) -> list[int]:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n)
        return out[0, ids.shape[1]:].tolist()

    return generate
