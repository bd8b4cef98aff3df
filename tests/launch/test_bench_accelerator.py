"""launch/bench_accelerator.sh: its help, and its batch search played with a stand-in for the benchmark (no jax, no
GPU): the largest batch that runs is kept, OpenCLIP starts at jclip's batch, a failure that is not for memory
stops the search. (bash -n and shellcheck: tests/launch/test_shell_scripts.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from launch_testing import REPO

SCRIPT = REPO / "launch" / "bench_accelerator.sh"

# Plays `python -m jclip.tools.bench_step`: out of memory above $JCLIP_FITS (jclip) or $OPENCLIP_FITS
# (--openclip-only), a non-memory error at batch $FAIL_AT; else a report like the tool's.
FAKE_BENCH = '''
import json, os, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[3:] if a.startswith("--") and "=" in a)
name = "openclip" if "--openclip-only" in sys.argv else "jclip"
batch = int(args["batch"])
if batch == int(os.environ.get("FAIL_AT", 0)):
    sys.exit("ValueError: something else")
if batch > int(os.environ[name.upper() + "_FITS"]):
    sys.exit("RESOURCE_EXHAUSTED: Out of memory while trying to allocate" if name == "jclip"
             else "torch.OutOfMemoryError: CUDA out of memory.")
side = {"examples_per_second": 10.0 * batch, "median_step_seconds": 0.1, "mfu": 0.4, "memory": {}, "params": 149}
json.dump({"batch": batch, "device_kind": "fake", name: side}, open(args["json"], "w"))
'''


def run_script(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    fake = tmp_path / "fake_bench.py"
    fake.write_text(FAKE_BENCH)
    python = tmp_path / "python"
    python.write_text(f'#!/usr/bin/env bash\nif [ "$1" = -m ]; then exec {sys.executable} {fake} "$@"; fi\n'
                      f'exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    environment = {"PATH": "/usr/bin:/bin", "JCLIP_PYTHON": str(python), **env}
    return subprocess.run(["bash", str(SCRIPT), "--out", str(tmp_path / "out"), *args], env=environment,
                          capture_output=True, text=True, timeout=60)


def test_help_and_a_missing_out():
    done = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "usage: launch/bench_accelerator.sh --out DIR" in done.stdout
    assert "--openclip-python" in done.stdout and "B/16" in done.stdout
    missing = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert missing.returncode == 2 and "--out DIR is required" in missing.stderr


def test_largest_batch_that_fits_for_each_side(tmp_path):
    done = run_script(tmp_path, "--openclip-python", "/fake/openclip/python", JCLIP_FITS="512", OPENCLIP_FITS="384")
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["jclip"]["batch"] == 512 and summary["openclip"]["batch"] == 384
    logs = sorted(path.name for path in (tmp_path / "out").glob("*.log"))
    assert logs == ["jclip_b1024.log", "jclip_b512.log", "jclip_b768.log", "openclip_b384.log", "openclip_b512.log"]
    assert "out of memory" in done.stderr


def test_a_failure_not_for_memory_stops_the_search(tmp_path):
    done = run_script(tmp_path, JCLIP_FITS="512", OPENCLIP_FITS="512", FAIL_AT="768")
    assert done.returncode != 0
    assert "failed, not for memory" in done.stderr and "something else" in done.stderr
    assert not (tmp_path / "out" / "jclip_b512.log").exists()
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == {"jclip": None, "openclip": None}
