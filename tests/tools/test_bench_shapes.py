"""The benchmark shapes: the issue's parameter counts (and a count by hand), presets by name, size overrides."""

from __future__ import annotations

import pytest

from jclip.build import TrainSetup
from jclip.tools import bench_shapes
from jclip.tools.train_step_timing import parameter_counts
from jclip.train import run_mesh


def hand_parameters(image: int, patch: int, vision_width: int, vision_layers: int, context: int, vocab: int,
                    text_width: int, text_layers: int, embed: int) -> int:
    """OpenCLIP's ViT + causal text CLIP, counted by hand (no biases on the patch convolution)."""
    def block(w: int) -> int:
        return 2 * 2 * w + (3 * w * w + 3 * w) + (w * w + w) + (w * 4 * w + 4 * w) + (4 * w * w + w)

    w = vision_width
    tokens = (image // patch) ** 2 + 1
    vision = 3 * patch * patch * w + w + tokens * w + 2 * w + vision_layers * block(w) + 2 * w + w * embed
    w = text_width
    text = vocab * w + context * w + text_layers * block(w) + 2 * w + w * embed
    return vision + text + 1  # + the logit scale


@pytest.mark.parametrize("shape,hand_args,millions", [
    ("cpu-tiny", (32, 8, 128, 2, 32, 49408, 128, 2, 64), 7.2),
    ("cpu-small", (64, 8, 384, 6, 32, 49408, 256, 6, 256), 28.3),
])
def test_benchmark_shapes_have_the_issues_parameter_counts(shape, hand_args, millions):
    config = bench_shapes.train_config(shape, bench_shapes.default_batch(shape))
    params, decayed = parameter_counts(TrainSetup.create(config, run_mesh(config)))
    assert params == hand_parameters(*hand_args)
    assert round(params / 1e6, 1) == millions
    assert 0 < decayed < params


def test_benchmark_shapes_batches_and_presets():
    assert bench_shapes.default_batch("cpu-tiny") == 256 and bench_shapes.default_batch("cpu-small") == 64
    assert bench_shapes.default_batch("B/16") == 128
    config = bench_shapes.train_config("B/16", 32, "bfloat16")
    assert (config.model.vision.patch_size, config.model.vision.width, config.model.text.layers) == (16, 768, 12)
    assert config.model.dtype == "bfloat16" and config.data.batch_size == 32
    assert dict(config.mesh)["data"] == -1 and not config.evals and list(config.losses) == ["clip"]
    with pytest.raises(ValueError, match="unknown shape"):
        bench_shapes.train_config("B/99", 8)


def test_overrides_set_the_tower_sizes():
    config = bench_shapes.train_config("cpu-small", 64, overrides={
        "vision_width": 64, "vision_layers": 1, "patch_size": 16, "image_size": 48, "text_width": 96,
        "text_heads": 3, "text_layers": 1, "context_length": 20, "embed_dim": 24})
    vision, text = config.model.vision, config.model.text
    assert (vision.width, vision.layers, vision.patch_size, vision.image_size) == (64, 1, 16, 48)
    assert (text.width, text.heads, text.layers, text.context_length, config.model.embed_dim) == (96, 3, 1, 20, 24)
    with pytest.raises(ValueError, match="unknown override"):
        bench_shapes.train_config("cpu-tiny", 8, overrides={"vision_heads": 2})
    unchanged = bench_shapes.train_config("cpu-tiny", 8, overrides={"vision_width": None})  # flags not given
    assert unchanged.model.vision.width == 128
