"""End-to-end training: exact resume after SIGKILL, the same losses on every mesh and process count, and the
nCLIP configs' state and evaluation space through the loop."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jclip_testing import REPO_ROOT, checkpoint_steps, cpu_env, micro_run_flags, read_final_evaluation, read_losses


def main_command(workdir: pathlib.Path, flags: list[str], config: str = "configs/clip.py") -> list[str]:
    return [sys.executable, "-m", "jclip.main", f"--config={config}", f"--workdir={workdir}", *flags]


def run_main(workdir, flags, devices=1, timeout=600):
    result = subprocess.run(
        main_command(workdir, flags), cwd=REPO_ROOT, env=cpu_env(devices), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"jclip.main failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.mark.slow
def test_sigkill_then_rerun_continues_with_identical_losses(tmp_path, scenes_data_dir):
    steps = 40  # killed after the save at step 10: 30 steps of margin
    flags = micro_run_flags(scenes_data_dir, total_steps=steps, checkpoint_every=5)
    reference = tmp_path / "uninterrupted"
    run_main(reference, flags)
    expected = read_losses(reference)
    assert sorted(expected) == list(range(1, steps + 1))

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        main_command(interrupted, flags), cwd=REPO_ROOT, env=cpu_env(1),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if any(step >= 10 for step in checkpoint_steps(interrupted)):
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed mid-way"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = max(read_losses(interrupted))
    assert killed_at < steps

    result = run_main(interrupted, flags)
    assert "resumed from" in result.stdout
    resumed_step = int(result.stdout.split("at step ")[1].split()[0])
    assert 0 < resumed_step <= killed_at
    got = read_losses(interrupted)
    assert sorted(got) == list(range(1, steps + 1))
    np.testing.assert_array_equal([got[s] for s in range(1, steps + 1)], [expected[s] for s in range(1, steps + 1)])


@pytest.mark.slow
def test_losses_agree_on_one_device_eight_devices_and_two_processes(tmp_path, scenes_data_dir):
    steps = 4
    flags = micro_run_flags(scenes_data_dir, total_steps=steps, checkpoint_every=100)
    single = tmp_path / "single"
    run_main(single, flags + ["--config.mesh.data=1"], devices=1)

    sharded = tmp_path / "sharded"
    run_main(sharded, flags + ["--config.mesh.data=4", "--config.mesh.fsdp=2"], devices=8)

    multi = tmp_path / "multi"
    command = [
        sys.executable, str(REPO_ROOT / "launch" / "local.py"), "--processes=2", "--devices_per_process=4", "--",
        *main_command(multi, flags + ["--config.mesh.data=4", "--config.mesh.fsdp=2"]),
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, env=cpu_env(4), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-5000:]
    assert "2 process(es)" in result.stdout

    expected = [read_losses(single)[s] for s in range(1, steps + 1)]
    for workdir in (sharded, multi):
        got = [read_losses(workdir)[s] for s in range(1, steps + 1)]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert expected[-1] < expected[0], "the loss should fall over the first steps"

    # The final evaluations, gathered across devices and processes, read every example exactly once.
    reference = read_final_evaluation(single)
    for workdir in (sharded, multi):
        got = read_final_evaluation(workdir)
        assert got["eval/retrieval/num_images"] == got["eval/zeroshot/num_images"] == 64
        assert got["eval/compositional/num_items"] == 32 * 3
        for key, value in reference.items():  # parameters agree to ~1e-5: allow a near-tie to flip
            assert got[key] == pytest.approx(value, abs=2 / 64), key


NCLIP_HEAD_FLAGS = [
    "--config.model.prototype_heads.num_prototypes=64",
    "--config.model.prototype_heads.hidden_dim=32",
    "--config.model.prototype_heads.bottleneck_dim=16",
]


def test_nclip_centres_are_checkpointed_and_resume_exactly(tmp_path, scenes_data_dir):
    """xCLIP's EMA centres live in the train state: a resumed run continues with them, not from zero."""
    flags = micro_run_flags(scenes_data_dir, total_steps=4, checkpoint_every=2) + NCLIP_HEAD_FLAGS
    flags.append("--config.losses.nclip.collapse=centering")  # the variant with state, whatever the default
    workdir = tmp_path / "run"
    command = main_command(workdir, flags, config="configs/xclip.py")
    subprocess.run(command, cwd=REPO_ROOT, env=cpu_env(1), capture_output=True, text=True, timeout=600, check=True)
    first = read_losses(workdir)
    import shutil

    shutil.rmtree(workdir / "checkpoints" / "4")
    subprocess.run(command, cwd=REPO_ROOT, env=cpu_env(1), capture_output=True, text=True, timeout=600, check=True)
    second = read_losses(workdir)  # steps 3 and 4 were recomputed after restoring step 2
    np.testing.assert_allclose([second[3], second[4]], [first[3], first[4]], rtol=1e-6)
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert any("nclip/image_prototypes_used" in m for m in metrics)
    assert (workdir / "checkpoints" / "4" / "state").is_dir()


def test_nclip_without_prototype_heads_is_a_config_error(tmp_path, scenes_data_dir):
    config_file = tmp_path / "nclip_no_heads.py"
    config_file.write_text(
        "from configs import clip\n\n\ndef get_config(arg=None):\n"
        "    config = clip.get_config(arg)\n"
        "    config.losses = {'clip': {'weight': 1.0}, 'nclip': {'weight': 1.0}}\n"
        "    return config\n"
    )
    command = main_command(tmp_path / "run", micro_run_flags(scenes_data_dir, total_steps=2), config=str(config_file))
    result = subprocess.run(command, cwd=REPO_ROOT, env=cpu_env(1), capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "jclip: invalid config: losses:" in result.stderr and "prototype_heads" in result.stderr


def test_nclip_config_trains_and_evaluates_in_the_prototype_space(tmp_path, scenes_data_dir):
    """configs/nclip.py end to end: its evaluations embed with the prototype heads (K-dimensional)."""
    flags = micro_run_flags(scenes_data_dir, total_steps=2, checkpoint_every=2) + NCLIP_HEAD_FLAGS
    workdir = tmp_path / "run"
    command = main_command(workdir, flags, config="configs/nclip.py")
    result = subprocess.run(command, cwd=REPO_ROOT, env=cpu_env(1), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    final = read_final_evaluation(workdir)
    assert {"eval/retrieval/image_to_text_R@1", "eval/zeroshot/top1", "eval/compositional/accuracy"} <= set(final)
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model"]["embedding"] == "prototypes"
    import ml_collections
    from flax import nnx

    from jclip.build import ModelFunctions

    functions = ModelFunctions.create(ml_collections.ConfigDict(saved["model"]), 0)
    size = saved["model"]["vision"]["image_size"]
    shapes = jax.eval_shape(functions.encode_images, nnx.to_pure_dict(functions.abstract_state), jnp.zeros((2, size, size, 3)))
    assert shapes.shape == (2, 64)  # K prototypes, not embed_dim


@pytest.mark.parametrize("change, difference", [
    ("--config.model.scan_layers=True", "scan_layers: False vs True"),
    ("--config.model.vision.width=64", "vision.width: 32 vs 64"),
])
def test_resuming_with_another_model_is_one_config_error(micro_clip_run, scenes_data_dir, tmp_path, change,
                                                         difference):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(micro_clip_run, workdir)
    flags = micro_run_flags(scenes_data_dir, total_steps=4, checkpoint_every=3) + [change]
    result = subprocess.run(main_command(workdir, flags), cwd=REPO_ROOT, env=cpu_env(1), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"the checkpoint of step 3 in {workdir / 'checkpoints'} holds another model than config.model" in result.stderr
    assert difference in result.stderr
    assert "Traceback" not in result.stderr
