"""User errors through the real command (README, Failure handling): each bad config below stops
`python -m jclip.main` with exactly one line on stderr (`jclip: ...`, naming the config key or the path, what is
wrong and what to do), exit status 2, no traceback, within seconds and before the run saves anything; `--verbose`
(or JCLIP_VERBOSE=1) prints the traceback first and ends with the same line."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import time

import pytest

from jclip_testing import REPO_ROOT, cpu_env, micro_run_flags

#: Replaced by a path in the test's own temporary folder that does not exist.
MISSING = "{missing}"

# (row id, config file, flags, text the one line must hold)
BAD_CONFIGS = [
    ("vision_width", "configs/clip.py", ["--config.model.vision.width=100"],
     "model.vision.width (100) must be divisible by head_width (16): set model.vision.width to a multiple of 16"),
    ("image_size", "configs/clip.py", ["--config.model.vision.image_size=36"],
     "model.vision.image_size (36) must be a positive multiple of patch_size (8): set model.vision.image_size"),
    ("text_heads", "configs/clip.py", ["--config.model.text.width=33"],
     "model.text.width (33) must be divisible by heads (2): set model.text.width to a multiple of 2 (e.g. 34)"),
    ("mesh", "configs/clip.py", ["--config.mesh.data=3"],
     "config.mesh {'data': 3, 'fsdp': 1, 'tensor': 1} does not fit the job"),
    ("wds_shards", "configs/clip.py", [f"--config.data.source=wds:{MISSING}/{{000..003}}.tar"],
     f"config.data.source='wds:{MISSING}/{{000..003}}.tar': 4 of 4 shards are missing: {MISSING}/000.tar"),
    ("tfds_data_dir", "configs/clip.py",
     ["--config.data.source=tfds:coco_captions/2017", f"--config.data.data_dir={MISSING}"],
     f"config.data.source='tfds:coco_captions/2017': the TFDS data dir config.data.data_dir='{MISSING}' does not "
     "exist"),
    ("folder", "configs/clip.py", [f"--config.data.source=folder:{MISSING}/captions.jsonl"],
     f"config.data.source='folder:{MISSING}/captions.jsonl': the file {MISSING}/captions.jsonl does not exist"),
    ("eval_source", "configs/clip.py", [f"--config.evals.zeroshot.source=classfolders:{MISSING}"],
     f"config.evals.zeroshot.source='classfolders:{MISSING}': the folder {MISSING} does not exist"),
    ("init_from", "configs/clip.py", [f"--config.init_from={MISSING}"],
     f"config.init_from='{MISSING}' does not exist; set it to a finished jclip run"),
    ("teacher", "configs/softclip.py",
     ["--config.losses.softclip.guidance=outputs", f"--config.teacher.checkpoint={MISSING}"],
     f"config.teacher.checkpoint='{MISSING}' does not exist; set it to a finished jclip run"),
    ("batch_size", "configs/clip.py", ["--config.data.batch_size=-3"], "data.batch_size must be positive, got -3"),
    ("eval_every", "configs/clip.py", ["--config.evals.zeroshot.every=-1"],
     "evals.zeroshot.every must be >= 0 (0 = only at the end), got -1"),
    ("loss_weight", "configs/clip.py", ["--config.losses.clip.weight=abc"],
     "flag --config.losses.clip.weight=abc: could not convert string to float: 'abc'"),
]


def run_main(config: str, flags: list[str], workdir: pathlib.Path,
             **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """`python -m jclip.main` on one CPU device; the result and its seconds."""
    command = [sys.executable, "-m", "jclip.main", f"--config={config}", f"--workdir={workdir}", *flags]
    env = cpu_env(1, **env)
    started = time.monotonic()
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    return result, time.monotonic() - started


def filled(text: str, missing: pathlib.Path) -> str:
    return text.replace(MISSING, str(missing))


@pytest.mark.parametrize("config, flags, expected", [row[1:] for row in BAD_CONFIGS],
                         ids=[row[0] for row in BAD_CONFIGS])
def test_a_user_error_is_one_line_and_exit_status_2_before_anything_is_built(config, flags, expected, scenes_data_dir,
                                                                             tmp_path):
    missing, workdir = tmp_path / "missing", tmp_path / "workdir"
    result, seconds = run_main(config, micro_run_flags(scenes_data_dir) + [filled(f, missing) for f in flags], workdir)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("jclip: "), result.stderr[-3000:]
    assert filled(expected, missing) in lines[0]
    assert "Traceback" not in result.stderr
    assert seconds < 60, f"{seconds:.0f} s: a config error must stop before anything is compiled"
    assert not (workdir / "checkpoints").exists() and not (workdir / "config.json").exists()
    assert not missing.exists()


@pytest.mark.parametrize("flag, env", [("--verbose", {}), ("--config.data.batch_size=16", {"JCLIP_VERBOSE": "1"})])
def test_verbose_prints_the_traceback_before_the_same_line(flag, env, scenes_data_dir, tmp_path):
    missing = tmp_path / "missing"
    bad = f"--config.data.source=folder:{missing}/captions.jsonl"
    result, _ = run_main("configs/clip.py", [*micro_run_flags(scenes_data_dir), bad, flag], tmp_path / "workdir", **env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-2].startswith("jclip.errors.ConfigError: config.data.source=")
    assert lines[-1] == (f"jclip: invalid config: config.data.source='folder:{missing}/captions.jsonl': the file "
                         f"{missing}/captions.jsonl does not exist; correct the path")
