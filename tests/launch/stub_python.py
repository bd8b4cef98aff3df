"""A stand-in for python on the fake TPU workers of the launcher tests: it makes venvs, answers pip and plays
`python -m jclip.main` without jax, so that the real worker scripts run end to end on this machine.

- `-m venv DIR`: DIR/bin/python (this stub again) and DIR/bin/activate.
- `-m pip install ...` is logged in $STUB_VENV/pip.log; `jax[tpu]==V` marks jax, jaxlib and libtpu installed;
  `-m pip show NAME...` prints their Name/Version blocks like pip does.
- `-m jclip.main ARGS` writes {argv, cwd, env, pid} to $HOME/stub-runs/PID.json, sleeps STUB_JCLIP_SLEEP
  seconds and exits STUB_JCLIP_EXIT (with STUB_JCLIP_FAIL_ONCE=1: exits 1 the first time in this HOME, then 0);
  on SIGTERM it writes $HOME/stub-runs/PID.term and exits 0, or ignores the
  signal when STUB_JCLIP_IGNORE_TERM=1. Like jclip.main it records how it ended in $JCLIP_STATUS_FILE.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def wrapper(venv: Path | None) -> str:
    """The bash script that runs this stub as `python` (in a venv: with STUB_VENV pointing at it)."""
    export = f"export STUB_VENV={venv}\n" if venv else ""
    return f"#!/usr/bin/env bash\n{export}exec {sys.executable} {HERE} \"$@\"\n"


def make_venv(folder: Path) -> None:
    folder = folder.resolve()
    (folder / "bin").mkdir(parents=True, exist_ok=True)
    python = folder / "bin" / "python"
    python.write_text(wrapper(folder))
    python.chmod(0o755)
    (folder / "bin" / "activate").write_text(f'export VIRTUAL_ENV={folder}\nexport PATH="{folder}/bin:$PATH"\n')


def packages(venv: Path) -> dict[str, str]:
    path = venv / "packages.json"
    return json.loads(path.read_text()) if path.exists() else {}


def pip(args: list[str]) -> int:
    venv = Path(os.environ["STUB_VENV"])
    installed = packages(venv)
    if args[0] == "install":
        with open(venv / "pip.log", "a") as log:
            log.write(json.dumps(args) + "\n")
        for arg in args:
            if arg.startswith("jax[tpu]=="):
                version = arg.split("==", 1)[1]
                installed.update(jax=version, jaxlib=version, libtpu="0.0.42")
        (venv / "packages.json").write_text(json.dumps(installed))
        return 0
    if args[0] == "show":
        blocks = [f"Name: {name}\nVersion: {installed[name]}" for name in args[1:] if name in installed]
        print("\n---\n".join(blocks))
        if len(blocks) < len(args) - 1:
            print("WARNING: Package(s) not found", file=sys.stderr)
            return 1
        return 0
    print(f"stub pip: unsupported {args}", file=sys.stderr)
    return 2


def jclip_main(args: list[str]) -> int:
    runs = Path(os.environ["HOME"]) / "stub-runs"
    runs.mkdir(exist_ok=True)
    pid = os.getpid()

    def write_status(state: str, code: int) -> None:  # as jclip.main's --status_file (JCLIP_STATUS_FILE)
        if os.environ.get("JCLIP_STATUS_FILE"):
            Path(os.environ["JCLIP_STATUS_FILE"]).write_text(json.dumps({"state": state, "step": 7, "exit_code": code}))

    def on_term(signum, frame) -> None:
        (runs / f"{pid}.term").write_text("SIGTERM\n")
        write_status("preempted", 0)
        sys.exit(0)

    signal.signal(signal.SIGTERM, signal.SIG_IGN if os.environ.get("STUB_JCLIP_IGNORE_TERM") == "1" else on_term)
    record = {"argv": args, "cwd": os.getcwd(), "env": dict(os.environ), "pid": pid}
    (runs / f"{pid}.json.tmp").write_text(json.dumps(record))
    (runs / f"{pid}.json.tmp").rename(runs / f"{pid}.json")
    print(f"stub jclip.main {pid}: {args}", flush=True)
    time.sleep(float(os.environ.get("STUB_JCLIP_SLEEP", "0")))
    if os.environ.get("STUB_JCLIP_FAIL_ONCE") == "1" and not (runs / "failed-once").exists():
        (runs / "failed-once").write_text("")
        return 1
    code = int(os.environ.get("STUB_JCLIP_EXIT", "0"))
    write_status("finished" if code == 0 else "failed", code)
    return code


def main(argv: list[str]) -> int:
    if argv[:1] in (["-V"], ["--version"]):
        print(f"Python {platform.python_version()}")
        return 0
    if argv[:2] == ["-m", "venv"]:
        make_venv(Path(argv[2]))
        return 0
    if argv[:2] == ["-m", "pip"]:
        return pip(argv[2:])
    if argv[:2] == ["-m", "jclip.main"]:
        return jclip_main(argv[2:])
    print(f"stub python: unsupported {argv}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
