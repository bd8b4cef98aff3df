"""jclip/models/flops.py against OpenCLIP's docs/model_profile.csv (forward GFLOPs per example, per tower)."""

from __future__ import annotations

import pytest

from jclip.models import get_preset
from jclip.models.flops import forward_flops, train_step_flops

# model_profile.csv: image_gflops, text_gflops
PROFILE = {"B/32": (8.82, 5.96), "B/16": (35.13, 5.96), "L/14": (162.03, 13.3), "g/14": (534.06, 47.09)}


@pytest.mark.parametrize("name", sorted(PROFILE))
def test_forward_flops_match_openclips_model_profile(name: str) -> None:
    image, text = PROFILE[name]
    flops = forward_flops(get_preset(name))
    assert flops["vision"] / 1e9 == pytest.approx(image, rel=5e-4)  # the profile's counter differs in details
    assert flops["text"] / 1e9 == pytest.approx(text, rel=5e-4)


def test_scanned_towers_count_the_same_and_a_step_is_three_forwards() -> None:
    assert forward_flops(get_preset("L/14", scan_layers=True)) == forward_flops(get_preset("L/14"))
    assert train_step_flops(get_preset("B/32"), 10) == 30 * sum(forward_flops(get_preset("B/32")).values())
