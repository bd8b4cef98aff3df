"""Shared fixtures for the model tests: a small config (fast on CPU, divisible by a 2x2x2 mesh)."""

from __future__ import annotations

from typing import Any

import pytest


def make_small_config(**overrides: Any) -> dict[str, Any]:
    """A two-layer CLIP with 32-wide towers, 2 heads each, a 64-token vocabulary."""
    config = {
        "embed_dim": 16,
        "quick_gelu": False,
        "vision": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16,
                   "mlp_ratio": 4.0},
        "text": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 2},
    }
    config.update(overrides)
    return config


@pytest.fixture
def small_config() -> dict[str, Any]:
    return make_small_config()
