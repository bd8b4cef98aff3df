"""Preemption and dead peers, end to end through `python -m jclip.main`: SIGTERM saves the step every process
stops at and exits 0, the rerun resumes with identical losses; a SIGKILLed peer stops the others quickly."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np

from jclip_testing import REPO_ROOT, micro_run_flags, read_losses

STEPS = 60


def command(workdir: pathlib.Path, flags: list[str]) -> list[str]:
    return [sys.executable, "-m", "jclip.main", "--config=configs/clip.py", f"--workdir={workdir}", *flags]


def environment(process: int | None = None, processes: int = 1, port: int | None = None) -> dict[str, str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    if process is not None:
        env.update(JCLIP_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JCLIP_NUM_PROCESSES=str(processes),
                   JCLIP_PROCESS_ID=str(process), JCLIP_HEARTBEAT_TIMEOUT_SECONDS="10")
    return env


def start(workdir: pathlib.Path, flags: list[str], logs: pathlib.Path, processes: int = 1) -> list[subprocess.Popen]:
    """`processes` jclip.main processes of one job (joined over 127.0.0.1 when more than one)."""
    port = free_port()
    started = []
    for index in range(processes):
        log = open(logs / f"process_{index}.log", "w")
        env = environment(index, processes, port) if processes > 1 else environment()
        started.append(subprocess.Popen(command(workdir, flags), cwd=REPO_ROOT, env=env, stdout=log,
                                        stderr=subprocess.STDOUT))
    return started


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def finish(processes: list[subprocess.Popen], logs: pathlib.Path, timeout: float = 600) -> list[int]:
    codes = []
    for process in processes:
        try:
            codes.append(process.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            process.kill()
            raise AssertionError(f"a process did not exit within {timeout} s:\n{read_logs(logs)}")
    return codes


def read_logs(logs: pathlib.Path) -> str:
    return "\n".join(f"--- {path.name}\n{path.read_text()[-3000:]}" for path in sorted(logs.glob("*.log")))


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    directory = workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def wait_for_checkpoint(workdir: pathlib.Path, processes: list[subprocess.Popen], logs: pathlib.Path, step: int) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and all(p.poll() is None for p in processes):
        if any(s >= step for s in checkpoint_steps(workdir)):
            return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at step >= {step} while the run was alive:\n{read_logs(logs)}")


def logs_dir(tmp_path: pathlib.Path, name: str) -> pathlib.Path:
    path = tmp_path / f"logs_{name}"
    path.mkdir()
    return path


def run_to_end(workdir: pathlib.Path, flags: list[str], tmp_path: pathlib.Path, name: str, processes: int) -> str:
    logs = logs_dir(tmp_path, name)
    codes = finish(start(workdir, flags, logs, processes), logs)
    assert codes == [0] * processes, read_logs(logs)
    return (logs / "process_0.log").read_text()


def interrupt(workdir, flags, tmp_path, processes: int, target: int, sig: signal.Signals):
    """Starts the job, waits for its step-10 checkpoint, sends `sig` to process `target`; returns (codes, logs,
    seconds from the signal to the last exit)."""
    logs = logs_dir(tmp_path, f"interrupted_{sig.name}")
    running = start(workdir, flags, logs, processes)
    wait_for_checkpoint(workdir, running, logs, 10)
    assert all(p.poll() is None for p in running), "the run ended before the signal"
    sent = time.time()
    os.kill(running[target].pid, sig)
    codes = finish(running, logs, timeout=120)
    return codes, logs, time.time() - sent


def assert_preempted_and_resumed_exactly(tmp_path: pathlib.Path, data_dir: pathlib.Path, processes: int,
                                         target: int) -> None:
    flags = micro_run_flags(data_dir, total_steps=STEPS, checkpoint_every=5)
    run_to_end(tmp_path / "uninterrupted", flags, tmp_path, "uninterrupted", processes)
    expected = read_losses(tmp_path / "uninterrupted")

    interrupted = tmp_path / "interrupted"
    codes, logs, _ = interrupt(interrupted, flags, tmp_path, processes, target, signal.SIGTERM)
    assert codes == [0] * processes, f"SIGTERM should end every process with exit 0:\n{read_logs(logs)}"
    stopped_at = max(read_losses(interrupted))
    assert stopped_at < STEPS, "the run finished before SIGTERM took effect"
    # Every process stopped after the same step, and that step was saved (one checkpoint holds all processes).
    assert max(checkpoint_steps(interrupted)) == stopped_at, (checkpoint_steps(interrupted), stopped_at)
    data_states = sorted(p.name for p in (interrupted / "checkpoints" / str(stopped_at) / "data").glob("process_*"))
    assert data_states == [f"process_{i}-of-{processes}.json" for i in range(processes)], data_states
    assert f"preempted (SIGTERM): saved step {stopped_at}" in (logs / "process_0.log").read_text()

    resumed = run_to_end(interrupted, flags, tmp_path, "resumed", processes)
    assert f"at step {stopped_at}" in resumed
    got = read_losses(interrupted)
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_array_equal([got[s] for s in range(1, STEPS + 1)], [expected[s] for s in range(1, STEPS + 1)])


def test_sigterm_saves_and_exits_0_and_the_rerun_resumes_exactly(tmp_path, scenes_data_dir):
    """One process without jax.distributed: jclip's own SIGTERM handler."""
    assert_preempted_and_resumed_exactly(tmp_path, scenes_data_dir, processes=1, target=0)


def test_sigterm_to_one_of_two_processes_saves_the_same_step_on_both(tmp_path, scenes_data_dir):
    """Two processes joined by jax.distributed: JAX's preemption service agrees on the step."""
    assert_preempted_and_resumed_exactly(tmp_path, scenes_data_dir, processes=2, target=1)


def test_a_sigkilled_peer_stops_the_other_process_within_60_s(tmp_path, scenes_data_dir):
    flags = micro_run_flags(scenes_data_dir, total_steps=100_000, checkpoint_every=5)
    codes, logs, seconds = interrupt(tmp_path / "run", flags, tmp_path, 2, 1, signal.SIGKILL)
    assert codes[1] == -signal.SIGKILL
    assert codes[0] != 0, f"the survivor exited 0:\n{read_logs(logs)}"
    assert seconds < 60, f"the survivor took {seconds:.0f} s to stop"
    survivor = (logs / "process_0.log").read_text()
    assert "lost contact with the others" in survivor or "heartbeat timeout" in survivor, survivor[-3000:]
