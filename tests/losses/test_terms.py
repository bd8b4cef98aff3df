"""Tests of jclip.losses.terms: the registry, LossContext, config validation and the weighted total."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jclip.losses import TERMS, LossContext, clip_loss, siglip_loss, total_loss, validate_terms_config
from jclip.parallel import make_mesh


def _outputs(n: int = 8, d: int = 4, seed: int = 0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(2, n, d)).astype(np.float32)
    return {
        "image_embeddings": jnp.asarray(x / np.linalg.norm(x, axis=1, keepdims=True)),
        "text_embeddings": jnp.asarray(y / np.linalg.norm(y, axis=1, keepdims=True)),
        "logit_scale": jnp.float32(2.3),
        "logit_bias": jnp.float32(-5.0),
    }


def test_registry_has_base_terms():
    assert {"clip", "siglip"} <= set(TERMS)


def test_total_is_weighted_sum_with_metrics():
    outputs = _outputs()
    config = {"clip": {"weight": 1.0}, "siglip": {"weight": 0.5, "ring": False}}
    loss, metrics = jax.jit(lambda o: total_loss(o, {}, LossContext(), config))(outputs)
    clip = clip_loss(outputs["image_embeddings"], outputs["text_embeddings"], outputs["logit_scale"])
    siglip = siglip_loss(outputs["image_embeddings"], outputs["text_embeddings"], outputs["logit_scale"],
                         outputs["logit_bias"])
    np.testing.assert_allclose(metrics["loss/clip"], clip, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss/siglip"], siglip, rtol=1e-6)
    np.testing.assert_allclose(loss, clip + 0.5 * siglip, rtol=1e-6)
    assert float(metrics["loss/total"]) == float(loss)
    np.testing.assert_allclose(metrics["clip/scale"], np.exp(2.3), rtol=1e-6)
    assert {"loss/clip", "loss/siglip", "loss/total"} <= set(metrics)


def test_config_dict_and_missing_weight():
    outputs = _outputs()
    config = ml_collections.ConfigDict({"clip": {"weight": 2.0}, "siglip": {}})
    assert validate_terms_config(config) == [("clip", 2.0, {}), ("siglip", 1.0, {})]
    loss, metrics = total_loss(outputs, {}, LossContext(), config)
    np.testing.assert_allclose(loss, 2.0 * metrics["loss/clip"] + metrics["loss/siglip"], rtol=1e-6)


def test_batch_mask_reaches_the_terms():
    outputs = _outputs(n=8)
    mask = jnp.asarray([True] * 6 + [False] * 2)
    _, metrics = total_loss(outputs, {"mask": mask}, LossContext(), {"clip": {"weight": 1.0}})
    valid = clip_loss(outputs["image_embeddings"][:6], outputs["text_embeddings"][:6], outputs["logit_scale"])
    np.testing.assert_allclose(metrics["loss/clip"], valid, rtol=1e-6)


def test_sharded_context_and_ring_equal_single_device():
    """LossContext is a pytree (mesh and total_steps static), so it can be a jitted argument."""
    outputs = _outputs(n=16)
    mesh = make_mesh({"data": 4, "fsdp": 2})
    config = {"clip": {"weight": 1.0}, "siglip": {"weight": 1.0, "ring": True}}
    step = jax.jit(lambda o, ctx: total_loss(o, {}, ctx, config))
    loss_sharded, _ = step(outputs, LossContext(mesh=mesh, step=jnp.int32(3), total_steps=10, rng=jax.random.key(0)))
    loss_single, _ = step(outputs, LossContext(step=jnp.int32(3), total_steps=10))
    np.testing.assert_allclose(loss_sharded, loss_single, rtol=1e-6)


def test_loss_context_is_frozen_pytree():
    ctx = LossContext(step=jnp.int32(5), total_steps=20, rng=jax.random.key(1))
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.step = 6  # type: ignore[misc]
    leaves = jax.tree_util.tree_leaves(ctx)
    assert len(leaves) == 2  # step and rng; mesh and total_steps are static
    np.testing.assert_allclose(ctx.progress, 0.25)
    assert float(LossContext(step=50, total_steps=20).progress) == 1.0


def test_unknown_term_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown loss term 'cilp'.*'clip'.*'siglip'"):
        validate_terms_config({"cilp": {"weight": 1.0}})
    with pytest.raises(ValueError, match="unknown loss term"):
        total_loss(_outputs(), {}, LossContext(), {"cilp": {"weight": 1.0}})


@pytest.mark.parametrize(
    "config,message",
    [
        ({}, "empty"),
        (None, "must map"),
        ({"clip": {"weight": "1"}}, "weight must be a finite number"),
        ({"clip": {"weight": float("nan")}}, "weight must be a finite number"),
        ({"clip": {"weight": True}}, "weight must be a finite number"),
        ({"clip": {"weight": 1.0, "ring": True}}, r"'clip' does not take \['ring'\]"),
        ({"siglip": {"rnig": True}}, r"takes \['ring'\]"),
        ({"clip": 1.0}, "expected a mapping"),
    ],
)
def test_validate_rejects_bad_configs(config, message):
    with pytest.raises(ValueError, match=message):
        validate_terms_config(config)


def test_validate_computes_nothing_and_custom_terms_register(monkeypatch):
    monkeypatch.setattr("jclip.losses.terms.TERMS", dict(TERMS))  # isolate the registry
    from jclip.losses import terms as terms_module

    calls = []

    @terms_module.register_term("probe", reads=terms_module.Reads())
    def probe(outputs, batch, ctx, *, factor: float = 1.0):
        calls.append(factor)
        return factor * jnp.float32(1.0), {"probe/factor": jnp.float32(factor)}

    assert validate_terms_config({"probe": {"weight": 0.0, "factor": 3.0}}) == [("probe", 0.0, {"factor": 3.0})]
    assert calls == []
    loss, metrics = total_loss({}, {}, LossContext(), {"probe": {"weight": 0.0, "factor": 3.0}})
    assert calls == [3.0] and float(loss) == 0.0 and float(metrics["loss/probe"]) == 3.0

    with pytest.raises(ValueError, match="already registered"):
        @terms_module.register_term("probe", reads=terms_module.Reads())
        def other(outputs, batch, ctx):
            return jnp.float32(0.0), {}


def test_siglip_term_needs_bias():
    outputs = _outputs()
    del outputs["logit_bias"]
    with pytest.raises(ValueError, match="logit_bias"):
        total_loss(outputs, {}, LossContext(), {"siglip": {"weight": 1.0}})
