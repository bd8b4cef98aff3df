"""PyTorch interpreters for the conversion tests. PyTorch is never installed beside jclip: the real libraries
run in their own virtual environments, as subprocesses, found through an environment variable or a
`.venv-*` folder at the repository root (`.ci/run` builds `.venv-torch`)."""

from __future__ import annotations

import os
import pathlib
import subprocess

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


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
