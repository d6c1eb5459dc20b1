"""Tiny checkpoints: deterministic bytes, real format, working tokenizer, CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import torch

from eaas.functions import inspect_checkpoint, write_tiny_checkpoint

torch.set_num_threads(1)


def file_hashes(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def run_cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "eaas.cli", *args], capture_output=True, text=True, env=env, timeout=120)


def test_same_seed_same_bytes_across_processes(tmp_path):
    a = write_tiny_checkpoint("mixtral", tmp_path / "a", seed=5)
    b = write_tiny_checkpoint("mixtral", tmp_path / "b", seed=5)
    r = run_cli("checkpoint", "tiny", "--arch", "mixtral", "--out", str(tmp_path / "c"), "--seed", "5")
    assert r.returncode == 0, r.stderr
    ha, hb, hc = file_hashes(a), file_hashes(b), file_hashes(tmp_path / "c")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= ha.keys()
    assert ha == hb == hc
    d = write_tiny_checkpoint("mixtral", tmp_path / "d", seed=6)
    assert file_hashes(d)["model.safetensors"] != ha["model.safetensors"]
    assert file_hashes(d)["tokenizer.json"] == ha["tokenizer.json"]


def test_tokenizer_and_model_agree(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = write_tiny_checkpoint("qwen2_moe", tmp_path, hidden=32, experts=4)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert len(tok) == model.config.vocab_size
    ids = tok("The river rose slowly.", return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == "The river rose slowly."
    assert tok.eos_token_id == model.config.eos_token_id
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3)


def test_deepseek_keeps_dense_first_layer(tmp_path):
    spec, fns = inspect_checkpoint(write_tiny_checkpoint("deepseek_v3", tmp_path, hidden=32, experts=4), checksums=False)
    assert spec.num_layers == 3 and spec.moe_layers == [1, 2]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["first_k_dense_replace"] == 1 and cfg["n_shared_experts"] == 1
    assert len(fns) == 8


def test_default_size_is_small(tmp_path):
    path = write_tiny_checkpoint("gpt_oss", tmp_path)
    assert (path / "model.safetensors").stat().st_size < 4 << 20


def test_cli_inspect_json_and_errors(tmp_path):
    from typer.testing import CliRunner

    from eaas.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["checkpoint", "tiny", "--arch", "olmoe", "--out", str(tmp_path / "o"), "--hidden", "32", "--experts", "4", "--dtype", "bfloat16"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["checkpoint", "inspect", str(tmp_path / "o"), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["model"]["dtype"] == "bfloat16" and len(doc["functions"]) == 8
    r = runner.invoke(app, ["checkpoint", "inspect", str(tmp_path / "o"), "--functions"])
    assert r.exit_code == 0 and "olmoe" in r.stdout and "o/1/3" in r.stdout
    r = runner.invoke(app, ["checkpoint", "inspect", str(tmp_path / "missing")])
    assert r.exit_code == 1 and "not a directory" in r.output


def test_cli_error_is_one_line_exit_1(tmp_path):
    r = run_cli("checkpoint", "tiny", "--arch", "llama", "--out", str(tmp_path / "l"))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "unsupported architecture 'llama'" in r.stderr
