"""Forward FLOPs of the OpenCLIP towers (`vit`, `clip` text), counted from parameter shapes, nothing allocated.

A FLOP is a multiply or an add (2 per multiply-accumulate), as in OpenCLIP's docs/model_profile.csv
(`image_gflops`, `text_gflops`): every matrix multiply of the tower on every token (the patch convolution on
the patches, the blocks' q/k/v, output and MLP kernels on all tokens, the projection on the pooled token), plus
attention's two T x T products per block (full, also for the causal text tower). LayerNorms, softmax, GELU,
biases and embedding look-ups are left out. A training step of model FLOPs is 3x the forward (the backward
takes twice the forward), whatever remat recomputes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from jclip.models import stacking, towers
from jclip.models.clip_model import TOWER_ATTRIBUTES, abstract_model

#: Tower parameters that are looked up or added, not multiplied.
_NOT_MATMULS = ("token_embedding", "positional_embedding", "class_embedding")


def _tokens(settings: Mapping[str, Any], modality: str) -> tuple[int, int]:
    """(tokens through the blocks, tokens through the patch convolution) of one example."""
    if modality == "text":
        return int(settings["context_length"]), 0
    size = settings["image_size"]
    height, width = (size, size) if isinstance(size, int) else size
    patches = (int(height) // int(settings["patch_size"])) * (int(width) // int(settings["patch_size"]))
    return patches + 1, patches


def forward_flops(model_config: Mapping[str, Any]) -> dict[str, int]:
    """Forward FLOPs per example of each tower: {"vision": ..., "text": ...} (towers `vit` and `clip`)."""
    model = abstract_model(model_config)  # a model of ShapeDtypeStructs
    result = {}
    for modality, attribute in TOWER_ATTRIBUTES.items():
        tower = towers.tower_for(model_config, modality)
        if tower.kind not in ("vit", "clip"):
            raise ValueError(f"forward_flops counts OpenCLIP's towers (vit, clip), not {tower.kind!r}")
        settings = tower.settings(model_config[modality])
        tokens, patches = _tokens(settings, modality)
        flops = 0
        params = {tuple(path): jax.ShapeDtypeStruct(v.shape, v.dtype)
                  for path, v in nnx.to_flat_state(nnx.state(getattr(model, attribute), nnx.Param))}
        for path, leaf in stacking.unstack(params).items():  # a scanned tower's biases are not matrices
            size = int(np.prod(leaf.shape))
            if leaf.ndim < 2 or path[-1] in _NOT_MATMULS or str(path[-1]).endswith("bias"):
                continue  # the fused q/k/v bias is [3, heads, head_dim]: added, not multiplied
            if path[-1] == "patch_embedding":
                flops += 2 * size * patches
            elif path[-1] == "projection":
                flops += 2 * size  # the pooled token only
            else:
                flops += 2 * size * tokens
        flops += 4 * tokens * tokens * int(settings["width"]) * int(settings["layers"])  # Q K^T and A V
        result[modality] = flops
    return result


def train_step_flops(model_config: Mapping[str, Any], batch_size: int) -> int:
    """Model FLOPs of one training step on `batch_size` examples: 3 x the forward of both towers."""
    return 3 * batch_size * sum(forward_flops(model_config).values())


__all__ = ["forward_flops", "train_step_flops"]
