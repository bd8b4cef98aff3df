"""Faults around checkpoints, end to end through `python -m jclip.main` (README, Failure handling): a damaged
latest checkpoint (a truncated array file, a missing data-iterator state, corrupt metadata) makes the rerun fall
back to the previous step with identical losses; no intact checkpoint stops with one message; a full disk or a
write error stops with one message (exit 4) or, with checkpoint_failure="continue", warns and trains on."""

from __future__ import annotations

import pathlib
import resource
import signal
import subprocess
import sys
import uuid

import pytest

from jclip_testing import (REPO_ROOT, checkpoint_steps, cpu_env, copy_run_until, micro_run_flags, read_losses,
                           truncate_array_file)

STEPS, EVERY = 8, 2


def main_command(workdir: pathlib.Path, flags: list[str]) -> list[str]:
    return [sys.executable, "-m", "jclip.main", "--config=configs/clip.py", f"--workdir={workdir}", *flags]


def run(workdir, flags, preexec_fn=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(main_command(workdir, flags), cwd=REPO_ROOT, env=cpu_env(1), capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec_fn)


@pytest.fixture(scope="module")
def reference_run(scenes_data_dir, tmp_path_factory) -> pathlib.Path:
    """An uninterrupted 8-step run with checkpoints at 4, 6 and 8 (keep 3), each checked (it has a manifest)."""
    workdir = tmp_path_factory.mktemp("reference")
    result = run(workdir, micro_run_flags(scenes_data_dir, total_steps=STEPS, checkpoint_every=EVERY))
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpoint_steps(workdir) == [4, 6, 8]
    assert all((workdir / "checkpoints" / str(s) / "jclip_manifest.json").is_file() for s in (4, 6, 8))
    return workdir


def delete_data_state(step_dir: pathlib.Path) -> str:
    (step_dir / "data" / "process_0-of-1.json").unlink()
    return "data/process_0-of-1.json is missing"


def corrupt_step_metadata(step_dir: pathlib.Path) -> str:
    (step_dir / "_CHECKPOINT_METADATA").write_text('{"item_handlers": ')
    return "_CHECKPOINT_METADATA"


def corrupt_config_json(step_dir: pathlib.Path) -> str:
    path = step_dir / "config" / "metadata"
    path.write_text(path.read_text().replace("{", "[", 1))
    return "config/metadata"


@pytest.mark.parametrize("damage", [truncate_array_file, delete_data_state, corrupt_step_metadata, corrupt_config_json])
def test_damaged_latest_checkpoint_falls_back_with_identical_losses(damage, reference_run, scenes_data_dir, tmp_path):
    workdir = copy_run_until(reference_run, tmp_path / "run", 6)
    expected_reason = damage(workdir / "checkpoints" / "8")
    (workdir / "checkpoints" / "10.orbax-checkpoint-tmp").mkdir()  # an interrupted save: removed and reported
    (workdir / "checkpoints" / "10.orbax-checkpoint-tmp" / "partial").write_bytes(b"x" * 100)
    # total_steps 8 again: the rerun resumes from 6 and retrains 7 and 8.
    result = run(workdir, micro_run_flags(scenes_data_dir, total_steps=STEPS, checkpoint_every=EVERY))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("jclip:")]
    assert len(warnings) == 2, result.stderr
    assert "removed 1 unfinished checkpoint save(s)" in warnings[0] and "10.orbax-checkpoint-tmp" in warnings[0]
    assert "the checkpoint of step 8" in warnings[1] and "is damaged" in warnings[1]
    assert expected_reason in warnings[1] and "resuming from step 6" in warnings[1]
    assert "resumed from" in result.stdout and "at step 6" in result.stdout
    [aside] = [p for p in (workdir / "checkpoints").iterdir() if p.name.startswith("8.damaged-")]
    assert (aside / "state").is_dir()  # moved aside, still on disk
    assert checkpoint_steps(workdir) == [4, 6, 8]  # 8 saved again
    expected, got = read_losses(reference_run), read_losses(workdir)
    assert [got[s] for s in range(7, STEPS + 1)] == [expected[s] for s in range(7, STEPS + 1)]


def test_no_intact_checkpoint_stops_with_one_message(reference_run, scenes_data_dir, tmp_path):
    workdir = copy_run_until(reference_run, tmp_path / "run", 8)
    for step in (4, 6, 8):
        corrupt_config_json(workdir / "checkpoints" / str(step))
    result = run(workdir, micro_run_flags(scenes_data_dir, total_steps=10, checkpoint_every=EVERY))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    [message] = [line for line in result.stderr.splitlines() if line.startswith("jclip:")]
    assert message.startswith("jclip: cannot resume: no checkpoint in")
    assert all(f"step {s}: config/metadata" in message for s in (4, 6, 8))
    assert checkpoint_steps(workdir) == [4, 6, 8]  # nothing moved


def _file_size_limit(limit_bytes: int):
    """For the child: writes past `limit_bytes` in any one file fail with EFBIG (RLIMIT_FSIZE; SIGXFSZ ignored),
    a real OS-level write error without root."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


def test_a_failing_write_stops_with_one_line_and_exit_4(scenes_data_dir, tmp_path):
    workdir = tmp_path / "run"
    flags = micro_run_flags(scenes_data_dir, total_steps=6, checkpoint_every=EVERY)
    result = run(workdir, flags, preexec_fn=_file_size_limit(1 << 20))  # the arrays' file is ~6 MB
    assert result.returncode == 4, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) < 20, result.stderr
    [message] = [line for line in result.stderr.splitlines() if line.startswith("jclip:")]
    assert message.startswith(f"jclip: stopped: saving the checkpoint of step 2 to {workdir / 'checkpoints' / '2'} failed")
    assert "File too large" in message and "free on its disk" in message and "last good checkpoint is none yet" in message
    assert not list((workdir / "checkpoints").iterdir())  # the unfinished save was removed


def test_continue_trains_on_and_warns_at_each_failed_save(scenes_data_dir, tmp_path):
    workdir = tmp_path / "run"
    flags = micro_run_flags(scenes_data_dir, total_steps=6, checkpoint_every=EVERY, checkpoint_failure="continue")
    result = run(workdir, flags, preexec_fn=_file_size_limit(1 << 20))
    assert sorted(read_losses(workdir)) == list(range(1, 7))  # training went on
    assert result.returncode == 4, result.stderr[-3000:]  # the final save failed too: nothing would retry it
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 3, result.stderr
    assert all("training goes on" in line for line in lines[:2])
    assert "step 2" in lines[0] and "step 4" in lines[1] and lines[2].startswith("jclip: stopped: saving the checkpoint of step 6")


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs (two micro checkpoints fit, a third does not); skips where mounting is not allowed."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"cannot mount a tmpfs: {error}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def test_full_disk_stops_with_step_path_free_space_and_last_good(small_disk, scenes_data_dir):
    workdir = small_disk / "run"
    result = run(workdir, micro_run_flags(scenes_data_dir, total_steps=10, checkpoint_every=EVERY))
    assert result.returncode == 4, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) < 20, result.stderr
    [message] = [line for line in result.stderr.splitlines() if line.startswith("jclip:")]
    steps = checkpoint_steps(workdir)
    failed = int(message.split("saving the checkpoint of step ")[1].split()[0])
    assert steps and failed == max(steps) + EVERY
    assert "No space left on device" in message and "free on its disk" in message
    assert f"the last good checkpoint is step {max(steps)} ({workdir / 'checkpoints' / str(max(steps))})" in message
    assert not [p for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]
