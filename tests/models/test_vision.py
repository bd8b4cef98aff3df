"""Tests for jclip/models/vision.py: patch embedding, class-token pooling, shapes and errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jclip.models.vision import VisionTransformer


def _tower(**overrides) -> VisionTransformer:
    args = dict(image_size=16, patch_size=8, width=32, layers=1, head_width=16, output_dim=8, rngs=nnx.Rngs(0))
    args.update(overrides)
    return VisionTransformer(**args)


def test_patch_embedding_equals_strided_convolution() -> None:
    tower = _tower(image_size=(16, 24))
    images = jax.random.normal(jax.random.key(1), (2, 16, 24, 3))
    expected = jax.lax.conv_general_dilated(
        images, tower.patch_embedding[...], window_strides=(8, 8), padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))  # [2, 2, 3, width]
    got = tower.embed_patches(images)
    np.testing.assert_allclose(got, expected.reshape(2, 6, 32), atol=1e-5)


def test_output_shape_dtype_and_heads() -> None:
    tower = _tower(width=32, head_width=8)
    assert tower.transformer.blocks[0].attn.num_heads == 4
    features = tower(jnp.zeros((3, 16, 16, 3)))
    assert features.shape == (3, 8) and features.dtype == jnp.float32
    assert tower.positional_embedding.shape == (1 + 4, 32)


def test_pools_the_class_token() -> None:
    """Features depend on patches only through attention to the class token; with all blocks removed the
    output is ln_post(class + pos[0]) @ proj, whatever the image."""
    tower = _tower(layers=0)
    a = tower(jax.random.normal(jax.random.key(1), (1, 16, 16, 3)))
    b = tower(jax.random.normal(jax.random.key(2), (1, 16, 16, 3)))
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_rejects_wrong_image_size() -> None:
    with pytest.raises(ValueError, match="expected images of size"):
        _tower()(jnp.zeros((1, 24, 24, 3)))
    with pytest.raises(ValueError, match="not a multiple of patch"):
        _tower(image_size=20)
