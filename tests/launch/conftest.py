"""The fake cloud fixture of the launcher tests; the helpers live in launch_testing.py (a module name of its own,
since tests/conftest.py is also imported as `conftest`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from launch_testing import FakeCloud, kill_recorded_processes


@pytest.fixture
def fake_cloud(tmp_path: Path):
    cloud = FakeCloud(tmp_path)
    yield cloud
    kill_recorded_processes(tmp_path / "cloud")
    shutil.rmtree(tmp_path / "cloud" / "homes", ignore_errors=True)
