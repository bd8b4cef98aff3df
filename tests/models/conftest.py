"""Shared fixtures for the model tests: a small config (fast on CPU, divisible by a 2x2x2 mesh)."""

from __future__ import annotations

from typing import Any

import pytest

from jclip_testing import make_small_config


@pytest.fixture
def small_config() -> dict[str, Any]:
    return make_small_config()
