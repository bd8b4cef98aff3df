"""The shapes `python -m jclip.tools.bench_step` measures, each turned into a `configs/clip.py` train config.

A shape is a model preset of `jclip.models.presets` (`tiny`, `B/32`, `B/16`, `L/14`, `g/14`) or one of the two
small benchmark shapes of the "Performance" issue (`cpu-tiny`, `cpu-small`, below), with explicit tower sizes
optionally set over it. The config is the CLIP baseline's with its own optimizer defaults (AdamW, clipping;
configs/common.py), one data-parallel mesh over every device and no evaluators.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from configs import clip
from jclip.models import presets

#: The issue's benchmark shapes: their model fields (set over the `tiny` preset) and their batch.
BENCH_SHAPES: dict[str, dict[str, Any]] = {
    # 7.2 M parameters, most of them the 49408-token embedding.
    "cpu-tiny": {
        "batch": 256,
        "embed_dim": 64,
        "vision": {"image_size": 32, "patch_size": 8, "width": 128, "layers": 2, "head_width": 64},
        "text": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2},
    },
    # 28.3 M parameters.
    "cpu-small": {
        "batch": 64,
        "embed_dim": 256,
        "vision": {"image_size": 64, "patch_size": 8, "width": 384, "layers": 6, "head_width": 64},
        "text": {"context_length": 32, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 6},
    },
}

#: The batch of a preset when none is given: configs/common.py's default.
PRESET_BATCH = 128

#: Command-line size overrides: flag name -> (tower, key); tower None is a top-level model key.
OVERRIDES: dict[str, tuple[str | None, str]] = {
    "vision_width": ("vision", "width"),
    "vision_layers": ("vision", "layers"),
    "patch_size": ("vision", "patch_size"),
    "image_size": ("vision", "image_size"),
    "text_width": ("text", "width"),
    "text_heads": ("text", "heads"),
    "text_layers": ("text", "layers"),
    "context_length": ("text", "context_length"),
    "embed_dim": (None, "embed_dim"),
}


def shape_names() -> list[str]:
    """Every named shape: the presets, then the benchmark shapes."""
    return [*presets.PRESETS, *BENCH_SHAPES]


def default_batch(shape: str) -> int:
    """The batch a shape is measured at unless `--batch` says otherwise."""
    return int(BENCH_SHAPES[shape]["batch"]) if shape in BENCH_SHAPES else PRESET_BATCH


def train_config(shape: str, batch: int, dtype: str = "float32",
                 overrides: Mapping[str, int | None] | None = None) -> ml_collections.ConfigDict:
    """The clip.py config of `shape` at global batch `batch` and compute `dtype` (parameters stay float32), with
    the `OVERRIDES` given (None values are ignored), on a data-parallel mesh over every device, no evaluators."""
    if shape not in shape_names():
        raise ValueError(f"unknown shape {shape!r}; known: {shape_names()}")
    preset = "tiny" if shape in BENCH_SHAPES else shape
    config = clip.get_config(f"model={preset},batch={int(batch)},dtype={dtype}")
    model = config.model
    if shape in BENCH_SHAPES:
        spec = BENCH_SHAPES[shape]
        model.embed_dim = spec["embed_dim"]
        for tower in ("vision", "text"):
            for key, value in spec[tower].items():
                model[tower][key] = value
        model.name = shape
    for flag, value in (overrides or {}).items():
        if value is None:
            continue
        if flag not in OVERRIDES:
            raise ValueError(f"unknown override {flag!r}; known: {sorted(OVERRIDES)}")
        tower, key = OVERRIDES[flag]
        (model if tower is None else model[tower])[key] = int(value)
    config.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
    config.evals = {}
    return config


def describe_model(model: ml_collections.ConfigDict) -> dict[str, Any]:
    """The sizes that define a two-tower shape, for the report."""
    vision, text = model.vision, model.text
    return {
        "embed_dim": int(model.embed_dim),
        "vision": {key: vision[key] for key in ("image_size", "patch_size", "width", "layers", "head_width")},
        "text": {key: text[key] for key in ("context_length", "vocab_size", "width", "heads", "layers")},
        "dtype": str(model.dtype),
    }
