"""launch/slurm.sbatch, its worker step and the H100 preset, on CPU: the real batch script runs 2 tasks through
a fake srun (tests/launch/fake_slurm), so JAX's own Slurm detection joins them; SIGTERM to one task saves the
same step on both, the job asks to be requeued, and the rerun resumes exactly."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from jclip.cli import free_port
from jclip_testing import REPO_ROOT, checkpoint_steps, cpu_env, micro_run_flags, read_losses, wait_for_checkpoint

FAKE_SLURM = pathlib.Path(__file__).parent / "fake_slurm"
SBATCH = REPO_ROOT / "launch" / "slurm.sbatch"
WORKER = REPO_ROOT / "launch" / "slurm_worker.sh"
STEPS = 20


def slurm_environment(tmp_path: pathlib.Path, job_id: int, ntasks: int = 2) -> dict[str, str]:
    """What sbatch gives the batch shell of a one-node, `ntasks`-task job (no SLURM_STEP_* there)."""
    env = {key: value for key, value in cpu_env(1).items() if not key.startswith("SLURM_")}
    env.update(
        PATH=f"{FAKE_SLURM}:{os.path.dirname(sys.executable)}:{env['PATH']}",
        SLURM_JOB_ID=str(job_id), SLURM_NTASKS=str(ntasks), SLURM_NNODES="1", SLURM_JOB_NODELIST="localhost",
        SLURM_NTASKS_PER_NODE=str(ntasks), SLURM_TASKS_PER_NODE=str(ntasks), SLURM_SUBMIT_DIR=str(REPO_ROOT),
        JAX_COORDINATOR_PORT=str(free_port()),
        JCLIP_PYTHON=sys.executable, JCLIP_HEARTBEAT_TIMEOUT_SECONDS="10",
        JCLIP_STATUS_FILE=str(tmp_path / f"status-{job_id}.json"), FAKE_SRUN_PIDS=str(tmp_path / f"pids-{job_id}"),
        FAKE_SCONTROL_LOG=str(tmp_path / "scontrol.log"),
    )
    return env


def sbatch(workdir: pathlib.Path, flags: list[str], env: dict[str, str], log: pathlib.Path) -> subprocess.Popen:
    """The batch script as Slurm runs it on the first node (a copy in a spool folder, cwd = submit folder)."""
    return subprocess.Popen(["bash", str(SBATCH), "configs/clip.py", str(workdir), *flags], cwd=REPO_ROOT, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait(process: subprocess.Popen, log: pathlib.Path, timeout: float = 600) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"the batch script did not end within {timeout} s:\n{log.read_text()[-5000:]}")


@pytest.mark.slow
def test_sigterm_to_one_task_saves_one_step_requeues_and_the_rerun_resumes_exactly(tmp_path, scenes_data_dir):
    flags = micro_run_flags(scenes_data_dir, total_steps=STEPS, checkpoint_every=5)
    reference, log = tmp_path / "uninterrupted", tmp_path / "uninterrupted.log"
    assert wait(sbatch(reference, flags, slurm_environment(tmp_path, 101), log), log) == 0, log.read_text()[-5000:]
    assert "2 process(es)" in log.read_text()
    assert "the run says: finished" in log.read_text()
    expected = read_losses(reference)

    run, log = tmp_path / "interrupted", tmp_path / "interrupted.log"
    env = slurm_environment(tmp_path, 102)
    job = sbatch(run, flags, env, log)
    assert wait_for_checkpoint(run, [job], 5), log.read_text()[-5000:]
    task_pids = [int(line) for line in pathlib.Path(env["FAKE_SRUN_PIDS"]).read_text().split()]
    assert len(task_pids) == 2
    os.kill(task_pids[1], signal.SIGTERM)  # the signal reaches one task only
    assert wait(job, log, timeout=120) == 0, log.read_text()[-5000:]
    status = json.loads(pathlib.Path(env["JCLIP_STATUS_FILE"]).read_text())
    stopped_at = status["step"]
    assert status == {"state": "preempted", "step": stopped_at, "exit_code": 0}
    assert max(read_losses(run)) == stopped_at < STEPS
    assert max(checkpoint_steps(run)) == stopped_at
    saved = sorted(p.name for p in (run / "checkpoints" / str(stopped_at) / "data").glob("process_*"))
    assert saved == ["process_0-of-2.json", "process_1-of-2.json"], "both processes saved the same step"
    assert (tmp_path / "scontrol.log").read_text().split("\n")[0] == "requeue 102"

    log = tmp_path / "requeued.log"  # Slurm reruns the same job
    assert wait(sbatch(run, flags, env, log), log) == 0, log.read_text()[-5000:]
    assert f"at step {stopped_at}" in log.read_text()
    got = read_losses(run)
    np.testing.assert_array_equal([got[s] for s in range(1, STEPS + 1)], [expected[s] for s in range(1, STEPS + 1)])
    assert (tmp_path / "scontrol.log").read_text().count("requeue") == 1, "a finished run is not requeued"


def run_worker(tmp_path: pathlib.Path, **variables: str) -> dict:
    """launch/slurm_worker.sh with a stub python that reports its argv and the binding variables."""
    stub = tmp_path / "python"
    stub.write_text(
        "#!/usr/bin/env bash\n"
        "printf '%s\\n' \"$@\" > \"$STUB_OUT.argv\"\n"
        "echo \"${JAX_LOCAL_DEVICE_IDS-unset} ${NCCL_LAUNCH_MODE-unset} $PWD\" > \"$STUB_OUT.env\"\n"
    )
    stub.chmod(0o755)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("SLURM_", "CUDA_", "JAX_LOCAL", "NCCL_"))}
    env.update(JCLIP_PYTHON=str(stub), STUB_OUT=str(tmp_path / "stub"), **variables)
    arguments = ["--config=configs/clip.py:model=B/16", "--workdir=/shared/runs/a b", "--config.note=$HOME; 'x'"]
    result = subprocess.run(["bash", str(WORKER), *arguments], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    argv = (tmp_path / "stub.argv").read_text().splitlines()
    device_ids, nccl_mode, cwd = (tmp_path / "stub.env").read_text().split()
    return {"argv": argv, "device_ids": device_ids, "nccl": nccl_mode, "cwd": cwd, "arguments": arguments}


@pytest.mark.parametrize(
    "variables, device_ids, nccl",
    [
        # One task per GPU, every GPU visible: JAX's Slurm detection picks GPU $SLURM_LOCALID itself.
        ({"SLURM_NTASKS_PER_NODE": "8", "SLURM_LOCALID": "3"}, "unset", "unset"),
        # The cluster bound one GPU to the task: it is device 0 of the task.
        ({"SLURM_NTASKS_PER_NODE": "8", "SLURM_LOCALID": "3", "CUDA_VISIBLE_DEVICES": "3"}, "0", "unset"),
        # One task per node drives every visible GPU.
        ({"SLURM_NTASKS_PER_NODE": "1", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, "0,1,2,3", "GROUP"),
        ({"SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_GPUS_ON_NODE": "8"}, "0,1,2,3,4,5,6,7", "GROUP"),
    ],
)
def test_the_worker_binds_gpus_as_jax_slurm_detection_expects(tmp_path, variables, device_ids, nccl):
    got = run_worker(tmp_path, **variables)
    assert (got["device_ids"], got["nccl"]) == (device_ids, nccl)
    assert got["argv"] == ["-m", "jclip.main", "--distributed=on", *got["arguments"]]  # quoting intact
    assert got["cwd"] == str(REPO_ROOT)


def test_the_batch_header_asks_for_what_jax_and_preemption_need():
    header = [line for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    options = {line.split()[1].split("=")[0]: line.split()[1] for line in header}
    assert "--gpus-per-task" not in options, "one GPU per task breaks JAX's device indexing (jax#23452, #28194)"
    assert options["--gpus-per-node"] == "--gpus-per-node=8" and options["--ntasks-per-node"] == "--ntasks-per-node=8"
    assert options["--requeue"] == "--requeue"
    assert re.fullmatch(r"--signal=TERM@\d+", options["--signal"]), "steps (not B:) get SIGTERM before the limit"
    assert "srun --kill-on-bad-exit=1" in SBATCH.read_text()


def test_the_h100_preset_parses_in_this_jax(tmp_path):
    """XLA rejects unknown XLA_FLAGS entries at start-up, even on CPU; a bogus one shows the check can fail."""
    def start_jax(extra: str = "") -> subprocess.CompletedProcess:
        script = f'. launch/env/h100.sh; export XLA_FLAGS="$XLA_FLAGS {extra}"; ' \
                 f'"{sys.executable}" -c "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"'
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
        return subprocess.run(["bash", "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)

    result = start_jax()
    assert result.returncode == 0 and result.stdout.strip() == "3.0", result.stderr[-3000:]
    bogus = start_jax("--xla_gpu_no_such_flag=true")
    assert bogus.returncode != 0 and "Unknown flag" in bogus.stderr
