"""The command line: bad configs stop with a clear message before anything is built or compiled."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from configs import clip, common, siglip
from jclip_testing import REPO_ROOT, cpu_env
from jclip.config_validation import validate_config
from jclip.errors import ConfigError


def run_main(*flags, timeout=120):
    started = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "jclip.main", *flags], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout
    )
    return result, time.time() - started


@pytest.mark.parametrize("flag, name", [("--config.optim.learning_rat=0.1", "learning_rat"), ("--config.losses.clip.wieght=1", "wieght")])
def test_unknown_key_stops_with_its_name(tmp_path, flag, name):
    result, _ = run_main("--config=configs/clip.py", f"--workdir={tmp_path}", flag)
    assert result.returncode == 2
    assert "invalid command line or config" in result.stderr and name in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.data.batch_size=-4", "data.batch_size must be positive"),
        ("--config.model.vision.patch_size=5", "multiple of patch_size"),
        ("--config.optim.accum_steps=3", "divisible by optim.accum_steps"),
        ("--config.model.dtype=float8", "model.dtype must be one of"),
    ],
)
def test_invalid_value_stops_before_compiling(tmp_path, flag, message):
    result, seconds = run_main("--config=configs/clip.py", f"--workdir={tmp_path}", flag)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "invalid config" in result.stderr and message in result.stderr
    assert not (tmp_path / "config.json").exists(), "nothing may be written before the config is valid"


def test_wrong_type_is_rejected(tmp_path):
    result, _ = run_main("--config=configs/clip.py", f"--workdir={tmp_path}", "--config.data.batch_size=abc")
    assert result.returncode == 2 and "batch_size" in result.stderr and "Traceback" not in result.stderr


def test_a_mesh_the_devices_cannot_fill_names_both(tmp_path):
    env = cpu_env(2)
    result = subprocess.run(
        [sys.executable, "-m", "jclip.main", "--config=configs/clip.py", f"--workdir={tmp_path}", "--config.mesh.data=3"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "invalid config" in result.stderr and "Traceback" not in result.stderr
    assert "'data': 3" in result.stderr and "needs 3 devices" in result.stderr
    assert "jax sees 2 cpu device(s) in 1 process(es), 2 per process" in result.stderr


def test_arg_strings_and_unknown_losses():
    config = clip.get_config("model=B/32,batch=4096,steps=10")
    assert config.model.vision.patch_size == 32 and config.data.batch_size == 4096 and config.total_steps == 10
    validate_config(config)
    validate_config(siglip.get_config())
    with pytest.raises(ValueError, match="unknown config arg"):
        clip.get_config("modle=B/32")
    with pytest.raises(KeyError, match="unknown model preset"):
        common.base_config("model=B/99")
    config = clip.get_config()
    config.losses = {"clip": {"weight": 1.0}, "nope": {"weight": 1.0}}
    with pytest.raises(ConfigError, match="unknown loss term 'nope'"):
        validate_config(config)
