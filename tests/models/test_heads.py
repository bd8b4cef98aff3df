"""The nCLIP prototype head: shapes, weight normalisation, cosine logits, and wiring into the model."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jclip.models import build_model, count_params, presets
from jclip.models.heads import PrototypeHead, head_config


def test_logits_are_cosines_to_unit_prototypes():
    head = PrototypeHead(8, num_prototypes=10, hidden_dim=16, bottleneck_dim=4, layers=3, rngs=nnx.Rngs(0))
    features = jnp.asarray(np.random.default_rng(0).normal(size=(5, 8)), jnp.float32)
    logits = np.asarray(head(features))
    assert logits.shape == (5, 10) and np.all(np.abs(logits) <= 1 + 1e-6)
    # Weight normalisation: rescaling a prototype's raw weights changes nothing.
    head.prototypes[...] = head.prototypes[...] * jnp.arange(1, 11, dtype=jnp.float32)[None, :]
    np.testing.assert_allclose(np.asarray(head(features)), logits, atol=1e-6)
    # The reference computation: the bottleneck normalised, dotted with each normalised prototype.
    x = features
    for index, layer in enumerate(head.mlp):
        x = np.asarray(x) @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...])
        if index < len(head.mlp) - 1:
            x = x * 0.5 * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))  # exact GELU
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    w = np.asarray(head.prototypes[...])
    np.testing.assert_allclose(np.asarray(head(features)), x @ (w / np.linalg.norm(w, axis=0)), atol=1e-5)


def test_model_outputs_prototype_logits_only_when_configured():
    config = presets.get_preset("tiny")
    plain = build_model(config, nnx.Rngs(0))
    images, tokens = jnp.zeros((2, 32, 32, 3)), jnp.ones((2, 32), jnp.int32)
    assert "image_prototype_logits" not in plain({"images": images, "token_ids": tokens})
    config["prototype_heads"] = {"num_prototypes": 64, "hidden_dim": 32, "bottleneck_dim": 16, "layers": 2}
    outputs = build_model(config, nnx.Rngs(0))({"images": images, "token_ids": tokens})
    assert outputs["image_prototype_logits"].shape == outputs["text_prototype_logits"].shape == (2, 64)
    # Two heads: (128*32 + 32) + (32*16 + 16) + 16*64 parameters each.
    per_head = 128 * 32 + 32 + 32 * 16 + 16 + 16 * 64
    assert count_params(config) - count_params(presets.get_preset("tiny")) == 2 * per_head


def test_head_config_defaults_and_errors():
    assert head_config(None) is None
    assert head_config({"num_prototypes": 1024})["bottleneck_dim"] == 256
    with pytest.raises(ValueError, match="unknown model.prototype_heads"):
        head_config({"prototypes": 3})


def test_prototype_embedding_space_for_evaluations():
    """embedding='prototypes': encode_image/encode_text return the training forward's prototype logits
    (normalised), so evaluations compare nCLIP models where they are trained; the training outputs keep
    the projected embeddings."""
    config = presets.get_preset("tiny")
    config["prototype_heads"] = {"num_prototypes": 64, "hidden_dim": 32, "bottleneck_dim": 16, "layers": 2}
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.normal(size=(3, 32, 32, 3)), jnp.float32)
    tokens = jnp.asarray(rng.integers(1, 1000, size=(3, 32)), jnp.int32)
    projection = build_model(config, nnx.Rngs(0))
    prototypes = build_model({**config, "embedding": "prototypes"}, nnx.Rngs(0))
    outputs = prototypes({"images": images, "token_ids": tokens})
    np.testing.assert_allclose(np.asarray(outputs["image_embeddings"]), np.asarray(projection({"images": images, "token_ids": tokens})["image_embeddings"]), atol=1e-6)
    for encode, key in ((prototypes.encode_image, "image_prototype_logits"), (prototypes.encode_text, "text_prototype_logits")):
        expected = np.asarray(outputs[key])
        expected = expected / np.linalg.norm(expected, axis=1, keepdims=True)
        got = np.asarray(encode(images if key.startswith("image") else tokens, normalize=True))
        assert got.shape == (3, 64)
        np.testing.assert_allclose(got, expected, atol=1e-5)
    with pytest.raises(ValueError, match="set model.prototype_heads"):
        build_model({**presets.get_preset("tiny"), "embedding": "prototypes"}, nnx.Rngs(0))
    with pytest.raises(ValueError, match="model.embedding must be one of"):
        build_model({**config, "embedding": "bottleneck"}, nnx.Rngs(0))


def test_prototype_embedding_without_heads_is_a_config_error():
    from jclip.config_validation import validate_config
    from jclip.errors import ConfigError
    from jclip_testing import micro_config

    config = micro_config(**{"model.text.vocab_size": 49408})
    config.model.embedding = "prototypes"
    with pytest.raises(ConfigError, match="set model.prototype_heads"):
        validate_config(config)
    config.model.embedding = "logits"
    with pytest.raises(ConfigError, match="model.embedding must be one of"):
        validate_config(config)
