"""`python -m jclip.evaluate` on a saved checkpoint: the report equals the training run's own final
evaluation of the same parameters, and bad checkpoint paths fail with a clear message."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from jclip import checkpoint
from jclip_testing import REPO_ROOT, micro_run_flags, read_final_evaluation


def run_module(module, *flags, timeout=600):
    return subprocess.run([sys.executable, "-m", module, *flags], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained_workdir(micro_clip_run):
    return micro_clip_run


def test_report_equals_the_runs_final_evaluation(trained_workdir, tmp_path):
    output = tmp_path / "report.json"
    result = run_module("jclip.evaluate", f"--checkpoint={trained_workdir}", f"--output={output}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["step"] == 3
    assert set(report["evaluators"]) == {"retrieval", "zeroshot", "compositional"}
    expected = read_final_evaluation(trained_workdir)
    assert expected, "the training run logged no evaluation"
    for key, value in expected.items():
        _, name, metric = key.split("/", 2)
        assert report["evaluators"][name][metric] == pytest.approx(value, abs=1e-9), key


def test_a_params_export_evaluates_like_its_checkpoint(trained_workdir, tmp_path, scenes_data_dir):
    """The model comes from the export (the config's tiny preset is replaced), the rest from --config."""
    export = tmp_path / "export"
    result = run_module("jclip.convert", "params", f"--checkpoint={trained_workdir}", f"--output={export}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert run_module("jclip.evaluate", f"--checkpoint={export}").returncode == 2  # no --config: refused
    flags = [f for f in micro_run_flags(scenes_data_dir, total_steps=3) if not f.startswith("--config.model.")]
    result = run_module("jclip.evaluate", "--config=configs/clip.py", f"--checkpoint={export}", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((export / "eval.json").read_text())
    assert report["step"] is None
    for key, value in read_final_evaluation(trained_workdir).items():
        _, name, metric = key.split("/", 2)
        assert report["evaluators"][name][metric] == pytest.approx(value, abs=1e-9), key


def test_a_config_replaces_the_evaluators(trained_workdir, tmp_path, scenes_data_dir):
    output = tmp_path / "report.json"
    step_folder = trained_workdir / "checkpoints" / "3"
    result = run_module(
        "jclip.evaluate", "--config=configs/clip.py", f"--checkpoint={step_folder}", f"--output={output}",
        "--config.data.embedded_config=small", f"--config.data.data_dir={scenes_data_dir}",
        "--config.evals.zeroshot.limit=40", "--config.evals.zeroshot.templates=single",
        "--config.evals.retrieval.limit=24", "--config.evals.compositional.limit=8",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["evaluators"]["zeroshot"]["num_images"] == 40
    assert report["evaluators"]["retrieval"]["num_images"] == 24
    assert report["evaluators"]["compositional"]["num_items"] == 8 * 3


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    result = run_module("jclip.evaluate", f"--checkpoint={tmp_path / 'nowhere'}")
    assert result.returncode == 2
    assert "does not exist" in result.stderr
    (tmp_path / "empty").mkdir()
    result = run_module("jclip.evaluate", f"--checkpoint={tmp_path / 'empty'}")
    assert result.returncode == 2 and "holds no checkpoints" in result.stderr


def test_resolve_checkpoint_accepts_workdir_checkpoints_and_step_folders(trained_workdir):
    checkpoints = trained_workdir / "checkpoints"
    assert checkpoint.resolve_checkpoint(trained_workdir) == (checkpoints, None)
    assert checkpoint.resolve_checkpoint(checkpoints, 3) == (checkpoints, 3)
    assert checkpoint.resolve_checkpoint(checkpoints / "3") == (checkpoints, 3)
    with pytest.raises(ValueError, match="disagrees"):
        checkpoint.resolve_checkpoint(checkpoints / "3", 2)
