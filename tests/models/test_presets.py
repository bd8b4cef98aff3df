"""Tests for jclip/models/presets.py and `count_params`: OpenCLIP's exact parameter counts."""

from __future__ import annotations

import pytest

from jclip.models import PRESETS, count_params, get_preset


@pytest.mark.parametrize("name,expected", [
    ("B/32", 151_277_313),  # open_clip ViT-B-32, including logit_scale
    ("B/16", 149_620_737),
    ("L/14", 427_616_513),
])
def test_parameter_counts_equal_openclip(name: str, expected: int) -> None:
    assert count_params(get_preset(name)) == expected


def test_siglip_bias_adds_one_parameter() -> None:
    tiny = get_preset("tiny")
    assert count_params(get_preset("tiny", init_logit_bias=-10.0)) == count_params(tiny) + 1


def test_get_preset_returns_an_independent_copy() -> None:
    config = get_preset("tiny", dtype="bfloat16")
    config["vision"]["width"] = 1
    assert PRESETS["tiny"]["vision"]["width"] != 1
    assert config["name"] == "tiny" and config["dtype"] == "bfloat16"
    assert set(PRESETS) >= {"tiny", "B/32", "B/16", "L/14"}
    with pytest.raises(KeyError, match="unknown model preset"):
        get_preset("H/14")
