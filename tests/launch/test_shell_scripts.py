"""The launcher's shell scripts parse (bash -n) and pass shellcheck (skipped where shellcheck is absent; on
Debian: apt-get install shellcheck, which .ci/run does)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from launch_testing import REPO

SCRIPTS = sorted((REPO / "launch").glob("*.sh"))


def test_there_are_scripts_to_check() -> None:
    assert {path.name for path in SCRIPTS} >= {"tpu_worker.sh", "tpu_setup_worker.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_bash_parses(script) -> None:
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (apt-get install shellcheck)")
def test_shellcheck_is_clean() -> None:
    done = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
