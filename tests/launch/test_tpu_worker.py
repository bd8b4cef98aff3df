"""launch/tpu_worker.sh on this machine: a stub venv and python (tests/launch/stub_python.py), temporary files as
the TPU's device files, and test-owned sleeping processes as stale TPU holders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from launch_testing import WORKER_SH, kill_recorded_processes, stub_wrapper, wait_for


class Worker:
    """One fake worker: HOME, source folder, venv, run folders and device files under a temporary folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.venv = root / "venv"
        subprocess.run([str(stub_wrapper(root / "base" / "python3")), "-m", "venv", str(self.venv)], check=True)
        self.devices = root / "dev"
        (self.devices / "vfio").mkdir(parents=True)
        (root / "home").mkdir()
        (root / "src").mkdir()
        self.lockfile = root / "libtpu_lockfile"
        self.env = dict(
            os.environ, HOME=str(root / "home"), TPU_WORKER_ID="0", JCLIP_SRC=str(root / "src"),
            JCLIP_VENV=str(self.venv), JCLIP_LOGS_DIR=str(root / "logs"), JCLIP_TPU_LOCKFILE=str(self.lockfile),
            JCLIP_TPU_DEVICE_GLOB=f"{self.devices}/accel* {self.devices}/vfio/[0-9]*", JCLIP_TPU_KILL_GRACE="2",
        )

    def command(self, *args: str) -> list[str]:
        return ["bash", str(WORKER_SH), *args]

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*args), env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout)

    def state(self, run: str = "r") -> str:
        path = self.root / "logs" / run / "state"
        return path.read_text().strip() if path.exists() else ""

    def stub_runs(self) -> list[dict]:
        folder = self.root / "home" / "stub-runs"
        return [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))] if folder.exists() else []

    def term_markers(self) -> list[Path]:
        return sorted((self.root / "home" / "stub-runs").glob("*.term"))


@pytest.fixture
def worker(tmp_path: Path):
    yield Worker(tmp_path)
    kill_recorded_processes(tmp_path / "logs")


def sleeper(holding: Path | None = None) -> subprocess.Popen:
    """A test-owned `sleep 60`, with `holding` open as its stdin (the parent's copy is closed at once)."""
    if holding is None:
        return subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
    with open(holding, "rb") as file:
        return subprocess.Popen(["sleep", "60"], stdin=file)


def test_exec_stops_only_the_processes_holding_the_device_files_and_removes_the_lockfile(worker: Worker) -> None:
    accel, vfio, other = worker.devices / "accel0", worker.devices / "vfio" / "0", worker.root / "other-file"
    for path in (accel, vfio, other, worker.lockfile):
        path.write_text("")
    holders = [sleeper(accel), sleeper(vfio)]
    bystanders = [sleeper(other), sleeper()]
    try:
        done = worker.run("exec", "--run-name", "r", "--", "--config=x")
        assert done.returncode == 0, done.stderr
        for holder in holders:
            assert holder.wait(timeout=10) == -signal.SIGTERM
        assert all(bystander.poll() is None for bystander in bystanders)
        assert not worker.lockfile.exists()
        assert f"hold the TPU: {' '.join(sorted(str(h.pid) for h in holders))}" in done.stdout
        assert worker.state() == "finished rc=0"
    finally:
        for process in holders + bystanders:
            process.kill()
            process.wait()


def test_exec_passes_argv_and_environment_through(worker: Worker) -> None:
    argv = ["--config=configs/clip.py:model=B/32", "--config.name=a b 'c' \"d\" $HOME ; echo x", "", "--x=`id`"]
    done = worker.run("exec", "--run-name", "r", "--coordinator-port", "8476", "--env", "TFDS_DATA_DIR=gs://b/t d",
                      "--env", "EXTRA=a=b", "--", *argv)
    assert done.returncode == 0, done.stderr
    [record] = worker.stub_runs()
    assert record["argv"] == argv
    assert record["cwd"] == str(worker.root / "src")
    env = record["env"]
    assert (env["JAX_PLATFORMS"], env["JCLIP_DISTRIBUTED"], env["JAX_COORDINATOR_PORT"]) == ("tpu", "on", "8476")
    assert (env["TFDS_DATA_DIR"], env["EXTRA"], env["VIRTUAL_ENV"]) == ("gs://b/t d", "a=b", str(worker.venv))
    assert (worker.root / "logs" / "r" / "pid").read_text().strip() == str(record["pid"])


def test_exec_records_a_failure_with_its_exit_status(worker: Worker) -> None:
    done = worker.run("exec", "--run-name", "r", "--", "--config=x", env={"STUB_JCLIP_EXIT": "3"})
    assert done.returncode == 3
    assert worker.state() == "failed rc=3"


def test_exec_without_a_venv_is_a_recorded_failure(worker: Worker) -> None:
    done = worker.run("exec", "--run-name", "r", "--", "--config=x", env={"JCLIP_VENV": str(worker.root / "none")})
    assert done.returncode != 0
    assert worker.state() == f"failed rc={done.returncode}"


def test_sigterm_is_forwarded_to_python_and_waited_for(worker: Worker) -> None:
    process = subprocess.Popen(worker.command("exec", "--run-name", "r", "--", "--config=x"),
                               env={**worker.env, "STUB_JCLIP_SLEEP": "60"}, stdout=subprocess.PIPE, text=True)
    try:
        wait_for(worker.stub_runs, what="the stub python to start")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        process.kill()
    assert len(worker.term_markers()) == 1
    assert worker.state() == "signalled rc=0"
    assert "forwarding it to python" in process.stdout.read()


def test_a_sigterm_straight_to_python_is_a_preemption_to_resume_not_a_finished_run(worker: Worker) -> None:
    """Maintenance events (autocheckpoint) signal the process holding the TPU: jclip saves, exits 0 and says so
    in its status file, and the state lets the babysitter rerun it."""
    process = subprocess.Popen(worker.command("exec", "--run-name", "r", "--", "--config=x"),
                               env={**worker.env, "STUB_JCLIP_SLEEP": "60"}, stdout=subprocess.PIPE, text=True)
    try:
        record = wait_for(worker.stub_runs, what="the stub python to start")[0]
        os.kill(record["pid"], signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        process.kill()
    assert worker.state() == "preempted rc=0"
    assert record["env"]["JCLIP_STATUS_FILE"] == str(worker.root / "logs" / "r" / "status.json")


def test_start_detaches_and_stop_lets_python_finish_its_save(worker: Worker) -> None:
    started = worker.run("start", "--run-name", "r", "--env", "STUB_JCLIP_SLEEP=60", "--", "--config=x")
    assert started.returncode == 0, started.stderr
    assert "started run r" in started.stdout
    wait_for(worker.stub_runs, what="the stub python to start")
    assert "state=running" in worker.run("status", "--run-name", "r").stdout
    again = worker.run("start", "--run-name", "r", "--", "--config=x")
    assert again.returncode == 1 and "still running" in again.stderr
    stopped = worker.run("stop", "--run-name", "r", "--timeout", "20")
    assert "exited after SIGTERM" in stopped.stdout
    assert len(worker.term_markers()) == 1
    assert worker.state() == "signalled rc=0"
    assert "state=signalled rc=0" in worker.run("status", "--run-name", "r").stdout
    log = worker.run("logs", "--run-name", "r", "--lines", "5").stdout
    assert "worker-0.log" in log and "python exited with status 0" in log


def test_stop_kills_python_that_outlives_the_timeout(worker: Worker) -> None:
    worker.run("start", "--run-name", "r", "--env", "STUB_JCLIP_SLEEP=60", "--env", "STUB_JCLIP_IGNORE_TERM=1", "--", "-x")
    wait_for(worker.stub_runs, what="the stub python to start")
    stopped = worker.run("stop", "--run-name", "r", "--timeout", "1")
    assert "SIGKILL" in stopped.stdout
    assert worker.state() == "signalled rc=137"
    assert not worker.term_markers()


def test_stop_and_status_without_a_live_run(worker: Worker) -> None:
    assert "state=none" in worker.run("status", "--run-name", "r").stdout
    assert "is not running" in worker.run("stop", "--run-name", "r").stdout
    folder = worker.root / "logs" / "r"
    folder.mkdir(parents=True)
    (folder / "state").write_text("running\n")
    dead = subprocess.Popen(["true"])
    dead.wait()
    (folder / "wrapper.pid").write_text(f"{dead.pid}\n")
    (folder / "pid").write_text(f"{os.getpid()}\n")  # a stale pid file must not aim stop at this process
    assert "state=lost (was running)" in worker.run("status", "--run-name", "r").stdout
    assert "is not running" in worker.run("stop", "--run-name", "r").stdout


def test_bad_arguments_exit_2(worker: Worker) -> None:
    assert worker.run("exec", "--run-name", "a/b", "--", "x").returncode == 2
    assert worker.run("exec", "--run-name", "r", "--env", "1X=y", "--", "x").returncode == 2
    assert worker.run("launch").returncode == 2
    assert worker.run("id").stdout.strip() == "0"
