"""gs:// end to end against a Cloud Storage emulator on 127.0.0.1 (fake-gcs-server, from a wheel): a run reads
tar shards from a bucket and writes its workdir there, is SIGKILLed, and resumes from the bucket with the same
per-step losses; a missing bucket or unusable credentials stop it at start-up, naming the path."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from gcs_emulator import BUCKET
from jclip_testing import REPO_ROOT, finish_processes, micro_run_flags, read_logs, start_processes

SHARDS, PER_SHARD = 2, 48

def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def upload_shards(prefix: str) -> None:
    from etils import epath

    for shard in range(SHARDS):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            for index in range(PER_SHARD):
                key = f"{shard:05d}{index:04d}"
                for name, data in ((f"{key}.jpg", jpeg(shard * 1000 + index)),
                                   (f"{key}.txt", f"a photo {index} of shard {shard}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        epath.Path(f"{prefix}/{shard:05d}.tar").write_bytes(buffer.getvalue())


def gcs_losses(workdir: str) -> dict[int, float]:
    from etils import epath

    losses = {}
    for line in (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss/total" in record:
            losses[record["step"]] = record["loss/total"]
    return losses


def gcs_checkpoint_steps(workdir: str) -> list[int]:
    """The committed checkpoint steps under a gs:// workdir (on GCS Orbax marks a finished step folder with
    commit_success.txt, as it cannot rename), listed afresh by one glob."""
    import gcsfs

    fs = gcsfs.GCSFileSystem(token="anon", project="test", skip_instance_cache=True)
    markers = fs.glob(f"{workdir.removeprefix('gs://')}/checkpoints/*/commit_success.txt")
    return sorted(int(marker.split("/")[-2]) for marker in markers if marker.split("/")[-2].isdigit())


def main_command(workdir: str, flags: list[str]) -> list[str]:
    return [sys.executable, "-m", "jclip.main", "--config=configs/clip.py", f"--workdir={workdir}", *flags]


def run_main(workdir: str, flags: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(main_command(workdir, flags), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                          env=env)


def test_shard_globs_and_brace_ranges_find_objects_in_a_bucket(gcs):
    from jclip.data.sources import webdataset

    upload_shards(f"gs://{BUCKET}/globbed")
    expected = [f"gs://{BUCKET}/globbed/{shard:05d}.tar" for shard in range(SHARDS)]
    assert webdataset.find_shards(f"gs://{BUCKET}/globbed/*.tar") == (expected, [])
    assert webdataset.find_shards(f"gs://{BUCKET}/globbed/{{00000..00002}}.tar") == (
        expected, [f"gs://{BUCKET}/globbed/00002.tar"])
    keys = list(webdataset.shard_keys(expected[1]))
    assert keys == [f"00001{index:04d}" for index in range(PER_SHARD)]


@pytest.mark.slow
def test_a_run_on_gcs_is_killed_and_resumes_from_the_bucket_exactly(gcs, scenes_data_dir):
    upload_shards(f"gs://{BUCKET}/shards")
    steps = 24
    flags = micro_run_flags(scenes_data_dir, total_steps=steps, checkpoint_every=4) + [
        f"--config.data.source=wds:gs://{BUCKET}/shards/{{00000..{SHARDS - 1:05d}}}.tar",
        "--config.data.shuffle_buffer=16",
        "--config.evals.retrieval.source=embedded", "--config.evals.zeroshot.source=embedded",
        "--config.evals.compositional.source=embedded",
    ]
    reference = f"gs://{BUCKET}/uninterrupted"
    result = run_main(reference, flags)
    assert result.returncode == 0, result.stderr[-5000:]
    expected = gcs_losses(reference)
    assert sorted(expected) == list(range(1, steps + 1))
    from etils import epath

    written = {p.name for p in epath.Path(reference).iterdir()}
    assert {"config.json", "metrics.jsonl", "checkpoints", "tensorboard"} <= written, written
    assert any(epath.Path(reference, "tensorboard").iterdir()), "no TensorBoard event file in the bucket"
    assert not (REPO_ROOT / "gs:").exists(), "a gs:// workdir became a local folder"

    run = f"gs://{BUCKET}/interrupted"
    process = subprocess.Popen(main_command(run, flags), cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not any(s >= 8 for s in gcs_checkpoint_steps(run)):
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = max(gcs_checkpoint_steps(run))
    assert saved < steps

    result = run_main(run, flags)
    assert result.returncode == 0, result.stderr[-5000:]
    resumed_at = int(result.stdout.split("at step ")[1].split()[0])
    assert 8 <= resumed_at <= saved
    got = gcs_losses(run)
    assert sorted(got) == list(range(1, steps + 1))
    np.testing.assert_array_equal([got[s] for s in range(1, steps + 1)], [expected[s] for s in range(1, steps + 1)])


def test_a_missing_bucket_stops_at_start_up_naming_the_path(gcs, tmp_path):
    result = run_main("gs://no-such-bucket/run", ["--config.total_steps=1"])
    assert result.returncode == 2, result.stderr[-3000:]
    assert "cannot write the workdir gs://no-such-bucket/run" in result.stderr
    assert "Traceback" not in result.stderr


def test_unusable_credentials_stop_at_start_up_naming_the_path(tmp_path):
    """Without an emulator: a malformed key file is refused before any request (nothing reaches the network)."""
    key = tmp_path / "key.json"
    key.write_text(json.dumps({"type": "service_account"}))
    env = {k: v for k, v in os.environ.items() if k not in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}
    env["GOOGLE_APPLICATION_CREDENTIALS"] = str(key)
    result = run_main("gs://some-bucket/run", ["--config.total_steps=1"], env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "cannot write the workdir gs://some-bucket/run: no usable Google credentials" in result.stderr
    assert str(key) in result.stderr


def test_a_run_in_the_bucket_is_a_teacher_an_init_from_source_and_converts_to_and_from_the_bucket(
        gcs, scenes_data_dir, tmp_path):
    """Teacher, init_from and every `jclip.convert` command read and write gs:// and give exactly what they give
    for a local copy of the same run."""
    import gcsfs
    import jax
    import ml_collections

    from jclip import parallel
    from jclip.build import TrainSetup
    from jclip.convert import params_io
    from jclip.convert.__main__ import main as convert_main
    from jclip.init_from import initial_params
    from jclip.teacher import load_teacher

    run = f"gs://{BUCKET}/trained"
    result = run_main(run, micro_run_flags(scenes_data_dir, total_steps=3, checkpoint_every=3))
    assert result.returncode == 0, result.stderr[-5000:]
    local = tmp_path / "trained"
    gcsfs.GCSFileSystem(token="anon", project="test").get(f"{BUCKET}/trained/", str(local), recursive=True)
    reference = params_io.read(local)

    mesh = parallel.make_mesh({"data": -1})
    config = ml_collections.ConfigDict(json.loads((local / "config.json").read_text()))
    config.teacher = {"checkpoint": run, "step": None}
    teacher = params_io.flatten(jax.device_get(load_teacher(config, mesh).params))
    assert teacher.keys() == reference.params.keys()
    for path, value in reference.params.items():
        np.testing.assert_array_equal(teacher[path], value)

    export, openclip, reimported = (f"gs://{BUCKET}/{name}" for name in ("export", "openclip", "reimported"))
    assert convert_main(["params", "--checkpoint", run, "--output", export]) == 0
    assert convert_main(["openclip", "--checkpoint", export, "--output", openclip]) == 0
    assert convert_main(["openclip", "--checkpoint", str(local), "--output", str(tmp_path / "openclip")]) == 0
    assert convert_main(["import", "--source", openclip, "--output", reimported]) == 0
    from etils import epath

    for name in ("open_clip_model.safetensors", "open_clip_config.json"):
        assert epath.Path(openclip, name).read_bytes() == (tmp_path / "openclip" / name).read_bytes(), name
    assert convert_main(["openclip", "--checkpoint", export, "--output", openclip]) == 2  # not empty: refused

    for source in (run, export, reimported):
        config.init_from = source
        setup = TrainSetup.create(config, mesh)
        params, kept = initial_params(config, setup, setup.init_state()["params"])
        assert kept == [], source
        flat = params_io.flatten(jax.device_get(params))
        for path, value in reference.params.items():
            np.testing.assert_array_equal(flat[path], value, err_msg=f"{source}: {path}")


@pytest.mark.slow
def test_two_processes_save_one_step_to_the_bucket_on_sigterm_and_resume_from_it(gcs, scenes_data_dir, tmp_path):
    """A pod's hosts: both processes write their parts of each checkpoint (and their own data positions) to the
    bucket; SIGTERM to one makes both save the same step there, and the rerun resumes from it."""
    run, logs = f"gs://{BUCKET}/two-processes", tmp_path / "logs"
    steps = 16
    flags = micro_run_flags(scenes_data_dir, total_steps=steps, checkpoint_every=5) + ["--config.mesh.data=2"]
    processes = start_processes(run, flags, logs, processes=2)
    deadline = time.time() + 300
    while time.time() < deadline and all(p.poll() is None for p in processes) and not gcs_checkpoint_steps(run):
        time.sleep(0.05)
    assert all(p.poll() is None for p in processes), read_logs(logs)
    processes[1].send_signal(signal.SIGTERM)
    assert finish_processes(processes, logs, timeout=180) == [0, 0], read_logs(logs)
    stopped_at = max(gcs_checkpoint_steps(run))
    assert stopped_at < steps and f"saved step {stopped_at}" in read_logs(logs), read_logs(logs)
    from etils import epath

    data_states = sorted(p.name for p in epath.Path(run, "checkpoints", str(stopped_at), "data").glob("process_*"))
    assert data_states == ["process_0-of-2.json", "process_1-of-2.json"]

    rerun_logs = tmp_path / "rerun_logs"
    assert finish_processes(start_processes(run, flags, rerun_logs, processes=2), rerun_logs) == [0, 0], (
        read_logs(rerun_logs))
    assert f"resumed from {run}/checkpoints at step {stopped_at}" in (rerun_logs / "process_0.log").read_text()
    assert sorted(gcs_losses(run)) == list(range(1, steps + 1))
