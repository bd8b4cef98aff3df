"""Faults in a job of two processes (jax.distributed over 127.0.0.1, one CPU device each), through
`python -m jclip.main`: a damaged newest checkpoint makes both processes fall back to the same step, and the job
finishes with the uninterrupted job's losses; a non-finite loss halts both processes with exit status 5, soon
after one another, with nothing non-finite saved."""

from __future__ import annotations

import pathlib
import subprocess
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jclip.nonfinite import EXIT_CODE as NONFINITE_EXIT_CODE
from jclip_testing import (checkpoint_steps, copy_run_until, finish_processes as finish, micro_run_flags, read_logs,
                           read_losses, start_processes as start, truncate_array_file)

STEPS, EVERY = 8, 2


def flags(data_dir: pathlib.Path, **overrides) -> list[str]:
    return micro_run_flags(data_dir, total_steps=STEPS, checkpoint_every=EVERY, **overrides)


@pytest.fixture(scope="module")
def two_process_reference(scenes_data_dir, tmp_path_factory) -> pathlib.Path:
    """An uninterrupted 2-process job of 8 steps with checked checkpoints at 4, 6 and 8."""
    workdir = tmp_path_factory.mktemp("reference_2_processes")
    logs = workdir.parent / f"{workdir.name}_logs"
    assert finish(start(workdir, flags(scenes_data_dir), logs, processes=2), logs) == [0, 0], read_logs(logs)
    assert "2 process(es)" in (logs / "process_0.log").read_text()
    assert checkpoint_steps(workdir) == [4, 6, 8]
    assert all((workdir / "checkpoints" / str(s) / "jclip_manifest.json").is_file() for s in (4, 6, 8))
    return workdir


@pytest.mark.slow
def test_two_processes_train_the_losses_of_one(two_process_reference, scenes_data_dir, tmp_path):
    """The 2-process job trains the 1-process run's losses to float32 rounding (the processes' gradients are summed
    in another order), not bit for bit: the fault tests below compare 2-process jobs with a 2-process reference."""
    logs = tmp_path / "logs"
    assert finish(start(tmp_path / "one", flags(scenes_data_dir), logs), logs) == [0], read_logs(logs)
    one, two = read_losses(tmp_path / "one"), read_losses(two_process_reference)
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=1e-6, atol=0)


def truncate_checked_array_file(step_dir: pathlib.Path) -> None:
    """The step keeps its manifest: every process reads the damage from it before Orbax reads anything."""
    truncate_array_file(step_dir)


def unchecked_foreign_data_state(step_dir: pathlib.Path) -> None:
    """A step not checked yet (a job killed before its next save point wrote the manifest) whose data-iterator
    state of process 1 is JSON but no iterator state: only process 1 reads that file, only it fails to restore."""
    (step_dir / "jclip_manifest.json").unlink()
    (step_dir / "data" / "process_1-of-2.json").write_text("{}")


@pytest.mark.parametrize("damage", [truncate_checked_array_file, unchecked_foreign_data_state])
def test_a_damaged_newest_checkpoint_makes_both_processes_fall_back_to_the_same_step(
        damage, two_process_reference, scenes_data_dir, tmp_path):
    workdir = copy_run_until(two_process_reference, tmp_path / "run", 6)
    damage(workdir / "checkpoints" / "8")
    logs = tmp_path / "logs"
    assert finish(start(workdir, flags(scenes_data_dir), logs, processes=2), logs, timeout=300) == [0, 0], \
        read_logs(logs)
    main_log = (logs / "process_0.log").read_text()
    [warning] = [line for line in main_log.splitlines() if line.startswith("jclip: warning:")]
    assert "the checkpoint of step 8" in warning and "is damaged" in warning and "resuming from step 6" in warning
    assert f"resumed from {workdir / 'checkpoints'} at step 6" in main_log
    if damage is unchecked_foreign_data_state:  # process 1 found the damage, named it, and both fell back
        assert "it failed on process(es) [1] (see their logs)" in warning, warning
        [own] = [line for line in (logs / "process_1.log").read_text().splitlines() if line.startswith("jclip:")]
        assert own.startswith(f"jclip: warning: process 1 cannot restore the checkpoint of step 8 in "
                              f"{workdir / 'checkpoints'}: KeyError"), own
    [aside] = [p for p in (workdir / "checkpoints").iterdir() if p.name.startswith("8.damaged-")]
    assert (aside / "state").is_dir()
    assert checkpoint_steps(workdir) == [4, 6, 8]  # 8 saved again
    expected, got = read_losses(two_process_reference), read_losses(workdir)
    assert [got[s] for s in range(7, STEPS + 1)] == [expected[s] for s in range(7, STEPS + 1)]  # bit for bit


def exit_times(processes: list[subprocess.Popen], timeout: float) -> list[float]:
    """When each process exited (time.time()); every one is killed if one outlives `timeout`."""
    deadline, ended = time.time() + timeout, {}
    while len(ended) < len(processes) and time.time() < deadline:
        for index, process in enumerate(processes):
            if index not in ended and process.poll() is not None:
                ended[index] = time.time()
        time.sleep(0.05)
    for process in processes:
        if process.poll() is None:
            process.kill()
    assert len(ended) == len(processes), "a process did not exit"
    return [ended[index] for index in range(len(processes))]


def test_a_non_finite_loss_halts_both_processes_with_status_5(scenes_data_dir, tmp_path):
    """Learning rate 1e9 blows the micro model up at step 4 (tests/test_nonfinite.py): the flag is global, so both
    processes decide to halt at the same step, save nothing of it, and exit 5 within seconds of each other."""
    workdir, logs = tmp_path / "run", tmp_path / "logs"
    nan_flags = micro_run_flags(scenes_data_dir, total_steps=STEPS, checkpoint_every=3, log_every=3,
                                keep_checkpoints=20, **{"optim.learning_rate": 1e9})
    processes = start(workdir, nan_flags, logs, processes=2)
    times = exit_times(processes, timeout=300)
    assert [p.returncode for p in processes] == [NONFINITE_EXIT_CODE] * 2, read_logs(logs)
    assert abs(times[0] - times[1]) < 20, f"the processes exited {abs(times[0] - times[1]):.0f} s apart"
    for index in range(2):
        text = (logs / f"process_{index}.log").read_text()
        assert "Traceback" not in text, text[-3000:]
        [line] = [line for line in text.splitlines() if line.startswith("jclip: stopped:")]
        assert line.startswith("jclip: stopped: non-finite step 4 "), line
        assert "Batch example keys: 8 on this process: jclip_scenes/small:train:" in line, line
    assert checkpoint_steps(workdir) == [3]
    assert_finite_checkpoint(workdir / "checkpoints" / "3")


def assert_finite_checkpoint(step_dir: pathlib.Path) -> None:
    """Every array of a checkpoint's train state is finite (read onto this process's first device)."""
    checkpointer = ocp.StandardCheckpointer()
    metadata = checkpointer.metadata(step_dir / "state").item_metadata
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
    state = jax.device_get(checkpointer.restore(step_dir / "state", target))
    checkpointer.close()
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        assert np.all(np.isfinite(leaf)), f"{step_dir.name}: {jax.tree_util.keystr(path)} is not finite"
    assert int(state["step"]) == 3
