"""Runs a jclip command as N local processes joined by jax.distributed (multi-host, on one machine).

    python launch/local.py --processes=2 --devices_per_process=4 -- \
        python -m jclip.main --config=configs/clip.py --workdir=/tmp/run

Each process gets JCLIP_COORDINATOR_ADDRESS (127.0.0.1 and a free port), JCLIP_NUM_PROCESSES,
JCLIP_PROCESS_ID and, on CPU, XLA_FLAGS with its number of fake devices. Output lines are prefixed with
the process index; if one process fails, the others are stopped and the launcher exits with its code.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_environment(index: int, count: int, address: str, devices_per_process: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        JCLIP_COORDINATOR_ADDRESS=address,
        JCLIP_NUM_PROCESSES=str(count),
        JCLIP_PROCESS_ID=str(index),
    )
    if devices_per_process:
        env["JAX_PLATFORMS"] = env.get("JAX_PLATFORMS", "cpu")
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
    return env


def _relay(index: int, stream, sink) -> None:
    for line in iter(stream.readline, ""):
        sink.write(f"[{index}] {line}")
        sink.flush()


def launch(command: list[str], processes: int, devices_per_process: int | None) -> int:
    address = f"127.0.0.1:{free_port()}"
    children = []
    relays = []
    for index in range(processes):
        child = subprocess.Popen(
            command,
            env=process_environment(index, processes, address, devices_per_process),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        relay = threading.Thread(target=_relay, args=(index, child.stdout, sys.stdout), daemon=True)
        relay.start()
        children.append(child)
        relays.append(relay)
    exit_code = 0
    remaining = list(children)
    while remaining:
        for child in list(remaining):
            try:
                code = child.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue
            remaining.remove(child)
            if code != 0 and exit_code == 0:
                exit_code = code
                for other in remaining:
                    other.terminate()
    for relay in relays:
        relay.join(timeout=5)
    return exit_code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=None, help="fake CPU devices per process")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    sys.exit(launch(command, args.processes, args.devices_per_process))


if __name__ == "__main__":
    main()
