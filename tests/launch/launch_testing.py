"""Helpers of the launcher tests: run launch/tpu.py, small git trees to ship, and a fake cloud (fake_gcloud.py as
`gcloud` on PATH, stub_python.py as the workers' python; its fixture is in conftest.py). No jax runs here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TPU_PY = REPO / "launch" / "tpu.py"
WORKER_SH = REPO / "launch" / "tpu_worker.sh"
SETUP_SH = REPO / "launch" / "tpu_setup_worker.sh"
# Fixed identity and dates, and no user configuration, so that commits (and their hashes) are reproducible.
GIT_ENV = {
    "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "jclip tests", "GIT_AUTHOR_EMAIL": "tests@example.com", "GIT_AUTHOR_DATE": "2000-01-01T00:00:00Z",
    "GIT_COMMITTER_NAME": "jclip tests", "GIT_COMMITTER_EMAIL": "tests@example.com",
    "GIT_COMMITTER_DATE": "2000-01-01T00:00:00Z",
}


def run_tpu(args: list[str], *, cwd: Path = REPO, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    command = [sys.executable, str(TPU_PY), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def git_tree(folder: Path, files: dict[str, str], *, commit: bool = True, untracked: dict[str, str] | None = None) -> Path:
    """A git repository holding `files` (committed, *.sh executable) plus `untracked` files and an ignored one."""
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **GIT_ENV)
    subprocess.run(["git", "-c", "init.defaultBranch=main", "init", "-q"], cwd=folder, env=env, check=True)
    for name, text in {**files, ".gitignore": "ignored.txt\n"}.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755 if name.endswith(".sh") else 0o644)
    if commit:
        subprocess.run(["git", "add", "-A"], cwd=folder, env=env, check=True)
        subprocess.run(["git", "commit", "-q", "-m", "fixed tree"], cwd=folder, env=env, check=True)
    for name, text in {**(untracked or {}), "ignored.txt": "not shipped\n"}.items():
        (folder / name).write_text(text)
    return folder


def wait_for(condition: Callable[[], object], timeout: float = 20, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def stub_wrapper(path: Path) -> Path:
    """An executable `python` that is tests/launch/stub_python.py (a base interpreter, outside any venv)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/usr/bin/env bash\nexec {sys.executable} {HERE / "stub_python.py"} "$@"\n')
    path.chmod(0o755)
    return path


def kill_recorded_processes(root: Path) -> None:
    """Ends what the worker scripts of a test started (by the PIDs they recorded), if still there."""
    for pid_file in root.rglob("*pid"):
        try:
            pid = int(pid_file.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (ValueError, OSError):
            continue
        if b"tpu_worker.sh" in cmdline or b"stub_python.py" in cmdline:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


class FakeCloud:
    """gcloud on PATH is tests/launch/fake_gcloud.py, with its state, worker folders and call log in `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "bin"
        self.bin.mkdir(parents=True)
        gcloud = self.bin / "gcloud"
        gcloud.write_text(f'#!/usr/bin/env bash\nexec {sys.executable} {HERE / "fake_gcloud.py"} "$@"\n')
        gcloud.chmod(0o755)
        self.python = stub_wrapper(root / "base" / "python3")
        self.env = dict(
            os.environ,
            PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            FAKE_GCLOUD_DIR=str(root / "cloud"),
            JCLIP_TPU_DEVICE_GLOB=f"{root}/no-such-device*",
            JCLIP_TPU_LOCKFILE=str(root / "libtpu_lockfile"),
            JCLIP_TPU_KILL_GRACE="1",
        )
        self.source = git_tree(root / "source", {
            "setup.py": "# stand-in for jclip's setup.py\n",
            "launch/tpu_worker.sh": WORKER_SH.read_text(),
            "launch/tpu_setup_worker.sh": SETUP_SH.read_text(),
        }, untracked={"notes.txt": "untracked, not ignored: shipped\n"})

    def tpu(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return run_tpu(list(args), cwd=self.source, env={**self.env, **(env or {})})

    def calls(self) -> list[list[str]]:
        log = self.root / "cloud" / "calls.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def steps(self) -> list[str]:
        """The calls as short words: create, describe, delete, scp, ssh:setup, ssh:start, ssh:status, ..."""
        words = []
        for argv in self.calls():
            verb = argv[3]
            if verb == "ssh":
                command = next(arg for arg in argv if arg.startswith("--command="))
                mode = command.split('tpu_worker.sh" ')[-1].split()[0]
                verb = "ssh:setup" if "tpu_setup_worker.sh" in command else f"ssh:{mode}"
            words.append(verb)
        return words

    def home(self, node: str, worker: int) -> Path:
        return self.root / "cloud" / "homes" / node / f"w{worker}"

    def stub_runs(self, node: str, worker: int) -> list[dict]:
        folder = self.home(node, worker) / "stub-runs"
        return [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))] if folder.exists() else []
