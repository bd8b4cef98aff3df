"""Preemption and dead peers through `python -m jclip.main`: SIGTERM saves the step the run stops at and exits
0, and the rerun resumes with identical losses; a SIGKILLed peer stops the other process quickly. (Two
processes stopping at one step after a SIGTERM are tested through the Slurm script: tests/launch/test_slurm.py.)"""

from __future__ import annotations

import json
import signal
import time

import numpy as np
import pytest

from jclip_testing import (checkpoint_steps, finish_processes as finish, micro_run_flags, read_losses, read_logs,
                           start_processes as start, wait_for_checkpoint)

STEPS = 30


def test_preempted_exit_code_makes_a_preemption_save_exit_non_zero(tmp_path, scenes_data_dir):
    """For Kubernetes, which reruns only failed pods: the save is the same, the exit status is the one asked for."""
    flags = micro_run_flags(scenes_data_dir, total_steps=STEPS, checkpoint_every=5)
    run, logs, status = tmp_path / "run", tmp_path / "logs", tmp_path / "status.json"
    process = start(run, [*flags, f"--status_file={status}", "--preempted_exit_code=143"], logs)
    assert wait_for_checkpoint(run, process, 5), read_logs(logs)
    process[0].send_signal(signal.SIGTERM)
    assert finish(process, logs, timeout=120) == [143], read_logs(logs)
    stopped_at = max(read_losses(run))
    assert stopped_at < STEPS and max(checkpoint_steps(run)) == stopped_at, read_logs(logs)
    assert json.loads(status.read_text()) == {"state": "preempted", "step": stopped_at, "exit_code": 143}


@pytest.mark.slow
def test_sigterm_saves_and_exits_0_and_the_rerun_resumes_exactly(tmp_path, scenes_data_dir):
    """One process without jax.distributed: jclip's own SIGTERM handler; --status_file says how it ended."""
    flags = micro_run_flags(scenes_data_dir, total_steps=STEPS, checkpoint_every=5)
    reference = tmp_path / "uninterrupted"
    assert finish(start(reference, flags, tmp_path / "logs_reference"), tmp_path / "logs_reference") == [0]
    expected = read_losses(reference)

    run, logs, status = tmp_path / "interrupted", tmp_path / "logs_interrupted", tmp_path / "status.json"
    process = start(run, [*flags, f"--status_file={status}"], logs)
    assert wait_for_checkpoint(run, process, 10), read_logs(logs)
    process[0].send_signal(signal.SIGTERM)
    assert finish(process, logs, timeout=120) == [0], read_logs(logs)
    stopped_at = max(read_losses(run))
    assert stopped_at < STEPS, "the run finished before SIGTERM took effect"
    assert max(checkpoint_steps(run)) == stopped_at, "the step the run stopped at was not saved"
    assert f"preempted (SIGTERM): saved step {stopped_at}" in read_logs(logs)
    assert json.loads(status.read_text()) == {"state": "preempted", "step": stopped_at, "exit_code": 0}

    rerun_logs = tmp_path / "logs_rerun"
    assert finish(start(run, [*flags, f"--status_file={status}"], rerun_logs), rerun_logs) == [0]
    assert f"at step {stopped_at}" in (rerun_logs / "process_0.log").read_text()
    assert json.loads(status.read_text()) == {"state": "finished", "step": STEPS, "exit_code": 0}
    got = read_losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_array_equal([got[s] for s in range(1, STEPS + 1)], [expected[s] for s in range(1, STEPS + 1)])


@pytest.mark.slow
def test_a_sigkilled_peer_stops_the_other_process_within_60_s(tmp_path, scenes_data_dir):
    """The survivor stops by one of two routes, whichever comes first: on CPU the dead peer's closed gloo connection
    fails the next collective (jclip's message, exit 1), or jax.distributed's heartbeat timeout aborts the process
    with its own message (SIGABRT; the route on TPU/GPU, and on CPU when a collective waits instead of failing)."""
    flags = micro_run_flags(scenes_data_dir, total_steps=100_000, checkpoint_every=5)
    run, logs = tmp_path / "run", tmp_path / "logs"
    processes = start(run, flags, logs, processes=2)
    assert wait_for_checkpoint(run, processes, 10), read_logs(logs)
    killed_at = time.time()
    processes[1].send_signal(signal.SIGKILL)
    codes = finish(processes, logs, timeout=120)
    seconds = time.time() - killed_at
    assert codes[1] == -signal.SIGKILL
    assert seconds < 60, f"the survivor took {seconds:.0f} s to stop"
    survivor = (logs / "process_0.log").read_text()
    if codes[0] == -signal.SIGABRT:
        assert "the JAX distributed service detected fatal errors" in survivor, survivor[-3000:]
        assert "stopped sending heartbeats" in survivor, survivor[-3000:]
    else:
        assert codes[0] == 1, f"the survivor exited {codes[0]}:\n{survivor[-3000:]}"
        assert "jclip: stopped: process 0 of 2 lost contact with the others" in survivor, survivor[-3000:]
