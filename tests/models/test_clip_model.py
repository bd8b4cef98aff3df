"""Tests for jclip/models/clip_model.py: outputs, logit scale/bias, mixed precision, remat, config handling."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jclip_testing import make_small_config
from flax import nnx

from jclip.models import CLIPModel, build_model


def _inputs(batch: int = 4) -> tuple[jax.Array, jax.Array]:
    images = jax.random.normal(jax.random.key(1), (batch, 16, 16, 3))
    token_ids = jax.random.randint(jax.random.key(2), (batch, 8), 1, 63).at[:, 5].set(63)
    return images, token_ids


@nnx.jit
def _forward(model: CLIPModel, images: jax.Array, token_ids: jax.Array) -> dict[str, jax.Array]:
    return model({"images": images, "token_ids": token_ids})


@pytest.fixture(scope="module")
def model() -> CLIPModel:
    return build_model(make_small_config(), nnx.Rngs(0))


def test_outputs(model: CLIPModel) -> None:
    images, token_ids = _inputs()
    outputs = _forward(model, images, token_ids)
    assert set(outputs) == {"image_features", "text_features", "image_embeddings", "text_embeddings",
                            "logit_scale"}
    for name in ("image_features", "text_features", "image_embeddings", "text_embeddings"):
        assert outputs[name].shape == (4, 16) and outputs[name].dtype == jnp.float32, name
    np.testing.assert_allclose(jnp.linalg.norm(outputs["image_embeddings"], axis=-1), 1, rtol=1e-6)
    np.testing.assert_allclose(outputs["text_embeddings"],
                               outputs["text_features"] / jnp.linalg.norm(outputs["text_features"], axis=-1,
                                                                           keepdims=True), rtol=1e-6)
    assert outputs["logit_scale"].shape == () and outputs["logit_scale"].dtype == jnp.float32
    np.testing.assert_allclose(outputs["logit_scale"], math.log(1 / 0.07), rtol=1e-6)
    np.testing.assert_allclose(model.encode_image(images), outputs["image_features"], atol=1e-5)
    np.testing.assert_allclose(model.encode_text(token_ids, normalize=True), outputs["text_embeddings"],
                               atol=1e-5)


def test_logit_bias_only_when_configured() -> None:
    siglip = build_model(make_small_config(init_logit_scale=math.log(10), init_logit_bias=-10.0), nnx.Rngs(0))
    outputs = _forward(siglip, *_inputs())
    np.testing.assert_allclose(outputs["logit_scale"], math.log(10), rtol=1e-6)
    np.testing.assert_allclose(outputs["logit_bias"], -10.0)
    params = nnx.to_flat_state(nnx.state(siglip, nnx.Param))
    assert ("logit_bias",) in [path for path, _ in params]


def test_bfloat16_compute_keeps_float32_params_and_outputs(model: CLIPModel) -> None:
    bf16 = build_model(make_small_config(dtype="bfloat16"), nnx.Rngs(0))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    images, token_ids = _inputs()
    low, full = _forward(bf16, images, token_ids), _forward(model, images, token_ids)
    for name in ("image_embeddings", "text_embeddings", "logit_scale"):
        assert low[name].dtype == jnp.float32
    np.testing.assert_allclose(low["image_embeddings"], full["image_embeddings"], atol=5e-2)
    np.testing.assert_allclose(low["text_embeddings"], full["text_embeddings"], atol=5e-2)


def test_remat_gives_same_values_and_gradients() -> None:
    config = make_small_config()
    config["vision"]["layers"] = config["text"]["layers"] = 1
    model = build_model(config, nnx.Rngs(0))
    remat_model = build_model(dict(config, remat=True), nnx.Rngs(0))
    images, token_ids = _inputs()

    @nnx.jit
    def loss_and_grads(m: CLIPModel) -> tuple[jax.Array, nnx.State]:
        def loss(m: CLIPModel) -> jax.Array:
            out = m({"images": images, "token_ids": token_ids})
            return jnp.sum(out["image_embeddings"] @ out["text_embeddings"].T * jnp.exp(out["logit_scale"]))
        return nnx.value_and_grad(loss)(m)

    value, grads = loss_and_grads(model)
    remat_value, remat_grads = loss_and_grads(remat_model)
    np.testing.assert_allclose(remat_value, value, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.max(jnp.abs(b))) + 1e-7)


def test_config_dict_and_unknown_keys() -> None:
    config = ml_collections.ConfigDict(make_small_config())
    abstract = nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0)))
    assert abstract.text.token_embedding.shape == (64, 32)
    with pytest.raises(ValueError, match="unknown model config keys"):
        build_model(make_small_config(embed_dims=3), nnx.Rngs(0))
    bad = make_small_config()
    bad["vision"] = dict(bad["vision"], heads=4)
    with pytest.raises(ValueError, match=r"unknown model.vision keys \[.heads.\] for kind .vit."):
        build_model(bad, nnx.Rngs(0))
