"""A stand-in for gcloud's TPU commands in the launcher tests (run through a `gcloud` script on PATH).

It logs every call's argv to $FAKE_GCLOUD_DIR/calls.jsonl and keeps the TPUs in $FAKE_GCLOUD_DIR/state.json.
Each node has FAKE_GCLOUD_WORKERS (2) workers, folders under $FAKE_GCLOUD_DIR/homes/NODE/wI: `ssh --command`
runs the command there with bash (HOME = that folder, TPU_WORKER_ID = I) and `scp` copies into it.
A queued resource goes WAITING_FOR_RESOURCES -> PROVISIONING -> ACTIVE over its first describes (a direct TPU
is READY at once), or FAILED with FAKE_GCLOUD_FAIL=1. FAKE_GCLOUD_PREEMPTIONS=N (-1: always) preempts the TPU at
the first describe after a run was started on it: SUSPENDED for a queued resource, PREEMPTED for a direct TPU.
Delete wipes the workers' folders; the next describe says DELETING, the one after NOT_FOUND.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(os.environ["FAKE_GCLOUD_DIR"])
STATE = ROOT / "state.json"
WORKERS = int(os.environ.get("FAKE_GCLOUD_WORKERS", "2"))


def load() -> dict:
    if STATE.exists():
        return json.loads(STATE.read_text())
    return {"tpus": {}, "preemptions": int(os.environ.get("FAKE_GCLOUD_PREEMPTIONS", "0"))}


def save(state: dict) -> None:
    STATE.write_text(json.dumps(state, indent=1))


def parse(args: list[str]) -> tuple[list[str], dict[str, str]]:
    positionals, flags = [], {}
    for arg in args:
        if arg.startswith("--"):
            key, _, value = arg[2:].partition("=")
            flags[key] = value
        else:
            positionals.append(arg)
    return positionals, flags


def homes(nodes: list[str], node: str, worker: str) -> list[tuple[Path, int]]:
    chosen = nodes if node == "all" else [nodes[int(node)]]
    indices = range(WORKERS) if worker == "all" else [int(worker)]
    return [(ROOT / "homes" / name / f"w{index}", index) for name in chosen for index in indices]


def power_off(tpu: dict) -> None:
    """Kills what the worker scripts started (by the PIDs in their files) and wipes the workers' disks."""
    for name in tpu["nodes"]:
        folder = ROOT / "homes" / name
        for pid_file in list(folder.glob("w*/jclip-logs/*/*pid")):
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (ValueError, ProcessLookupError, PermissionError, FileNotFoundError):
                pass
        shutil.rmtree(folder, ignore_errors=True)


def not_found(name: str) -> int:
    print(f"ERROR: (gcloud.compute.tpus) NOT_FOUND: Resource '{name}' was not found", file=sys.stderr)
    return 1


def find(state: dict, group: str, name: str) -> dict | None:
    """A queued resource by its name; with tpu-vm, the TPU that has a node of that name."""
    if group == "queued-resources":
        return state["tpus"].get(name)
    return next((tpu for tpu in state["tpus"].values() if name in tpu["nodes"]), None)


def create(state: dict, group: str, name: str, flags: dict[str, str]) -> int:
    if name in state["tpus"]:
        print(f"ERROR: (gcloud.compute.tpus) ALREADY_EXISTS: {name}", file=sys.stderr)
        return 1
    if "node-count" in flags:
        nodes = [f"{flags.get('node-prefix', name)}-{index}" for index in range(int(flags["node-count"]))]
    else:
        nodes = [flags.get("node-id", name)]
    first = "READY" if group == "tpu-vm" else "WAITING_FOR_RESOURCES"
    tpu = {"group": group, "state": first, "nodes": nodes, "run_started": False}
    state["tpus"][name] = tpu
    for home, _ in homes(nodes, "all", "all"):
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)
    return 0


def describe(state: dict, name: str) -> int:
    tpu = state["tpus"].get(name)
    if tpu is None:
        return not_found(name)
    if tpu["state"] == "DELETING":
        del state["tpus"][name]
        print("DELETING")
        return 0
    if tpu["run_started"] and state["preemptions"] != 0:
        state["preemptions"] -= 1 if state["preemptions"] > 0 else 0
        tpu["state"] = "SUSPENDED" if tpu["group"] == "queued-resources" else "PREEMPTED"
        power_off(tpu)
    following = {"WAITING_FOR_RESOURCES": "PROVISIONING", "PROVISIONING": "ACTIVE"}
    if os.environ.get("FAKE_GCLOUD_FAIL") == "1" and tpu["state"] == "PROVISIONING":
        following["PROVISIONING"] = "FAILED"
    print(tpu["state"])
    tpu["state"] = following.get(tpu["state"], tpu["state"])
    return 0


def delete(state: dict, name: str) -> int:
    tpu = state["tpus"].get(name)
    if tpu is None:
        return not_found(name)
    power_off(tpu)
    tpu["state"] = "DELETING"
    return 0


def usable(tpu: dict | None, name: str) -> bool:
    if tpu is None or tpu["state"] not in ("ACTIVE", "READY"):
        print(f"ERROR: (gcloud.compute.tpus) {name} is not reachable", file=sys.stderr)
        return False
    return True


def scp(state: dict, group: str, positionals: list[str], flags: dict[str, str]) -> int:
    *sources, destination = positionals
    name, _, remote = destination.partition(":")
    tpu = find(state, group, name)
    if not usable(tpu, name):
        return 1
    nodes = tpu["nodes"] if group == "queued-resources" else [name]
    for home, _ in homes(nodes, flags.get("node", "0"), flags.get("worker", "0")):
        for source in sources:
            shutil.copy(source, home / (remote or Path(source).name))
    return 0


def ssh(state: dict, group: str, name: str, flags: dict[str, str]) -> int:
    tpu = find(state, group, name)
    if not usable(tpu, name):
        return 255
    nodes = tpu["nodes"] if group == "queued-resources" else [name]
    status = 0
    for home, index in homes(nodes, flags.get("node", "0"), flags.get("worker", "0")):
        env = dict(os.environ, HOME=str(home), TPU_WORKER_ID=str(index))
        done = subprocess.run(["bash", "-c", flags["command"]], cwd=home, env=env)
        status = status or done.returncode
    if 'tpu_worker.sh" start' in flags["command"]:
        tpu["run_started"] = True
    return status


def main(argv: list[str]) -> int:
    ROOT.mkdir(parents=True, exist_ok=True)
    with open(ROOT / "calls.jsonl", "a") as log:
        log.write(json.dumps(argv) + "\n")
    if argv[:2] != ["compute", "tpus"] or len(argv) < 4:
        print(f"fake gcloud: unsupported {argv}", file=sys.stderr)
        return 2
    group, verb = argv[2], argv[3]
    positionals, flags = parse(argv[4:])
    state = load()
    try:
        if verb == "create":
            return create(state, group, positionals[0], flags)
        if verb == "describe":
            return describe(state, positionals[0])
        if verb == "delete":
            return delete(state, positionals[0])
        if verb == "scp":
            return scp(state, group, positionals, flags)
        if verb == "ssh":
            return ssh(state, group, positionals[0], flags)
        print(f"fake gcloud: unsupported {argv}", file=sys.stderr)
        return 2
    finally:
        save(state)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
