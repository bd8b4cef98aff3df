"""The real gcloud as a syntax checker of every gcloud command launch/tpu.py prints in its golden --dry-run files.

With an empty configuration folder and no metadata server, gcloud 528 parses a command line before it needs an
account: a well-formed command exits 1 with "You do not currently have an active account selected", a bad flag
exits 2, and nothing reaches the network. One call per distinct command shape (gcloud takes about a second).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parent / "golden"
pytestmark = pytest.mark.skipif(shutil.which("gcloud") is None, reason="gcloud is not on PATH (Google Cloud SDK)")


def shape(argv: list[str]) -> tuple:
    """The command group and verb, how many positionals, and which flags (values aside)."""
    flags = tuple(sorted(arg.split("=", 1)[0] for arg in argv if arg.startswith("--")))
    return (*argv[:5], sum(not arg.startswith("--") for arg in argv[5:]), flags)


def golden_commands() -> list[list[str]]:
    commands: dict[tuple, list[str]] = {}
    for path in sorted(GOLDEN.glob("*.txt")):
        for line in path.read_text().splitlines():
            if line.startswith("+ gcloud "):
                argv = shlex.split(line[2:])
                commands.setdefault(shape(argv), argv)
    return list(commands.values())


def offline_gcloud(argv: list[str], config: Path) -> subprocess.CompletedProcess:
    config.mkdir()
    env = dict(os.environ, CLOUDSDK_CONFIG=str(config), CLOUDSDK_CORE_CHECK_GCE_METADATA="false",
               CLOUDSDK_CORE_DISABLE_PROMPTS="1")
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)


def test_every_generated_gcloud_command_is_well_formed(tmp_path: Path) -> None:
    commands = golden_commands()
    # create: 3 capacities x (queued, direct) + slices; describe, delete, scp and ssh: x 2.
    assert len(commands) == 15
    ssh = next(argv for argv in commands if argv[4] == "ssh")
    broken = [arg.replace("--worker=", "--workers=") for arg in ssh]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda pair: offline_gcloud(pair[1], tmp_path / str(pair[0])),
                                enumerate([*commands, broken])))
    for argv, result in zip(commands, results):
        assert result.returncode == 1 and "active account" in result.stderr, (shlex.join(argv), result.stderr)
    assert results[-1].returncode == 2, results[-1].stderr
    assert "unrecognized arguments: --workers=" in results[-1].stderr
