"""Tests of jclip.losses.noncontrastive (nCLIP): against float64 NumPy written as explicit loops (cross-entropy
sums, the EMA centre, Sinkhorn as SwAV's iterations, the entropy terms), finite differences, sharded (8 fake
devices) against unsharded, padding masks and degenerate inputs."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from jclip.losses import LossContext, TERMS, init_loss_state, total_loss_with_state
from jclip.losses.noncontrastive import sinkhorn_targets
from jclip.parallel import batch_spec, make_mesh

KNOBS = dict(student_temperature=0.1, teacher_temperature=0.04, centre_momentum=0.9, sinkhorn_epsilon=0.05,
             sinkhorn_iterations=3, entropy_weight=1.0, mean_entropy_weight=1.0)


def softmax_rows(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def reference_sinkhorn(scores, epsilon, iterations):
    """SwAV's distributed_sinkhorn, transcribed as plain loops over prototypes and samples."""
    q = np.exp(scores / epsilon).T  # K x B
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        for p in range(k):
            q[p] /= q[p].sum() * k
        for i in range(b):
            q[:, i] /= q[:, i].sum() * b
    return (q * b).T


def reference_loss(h_image, h_text, centres, collapse, knobs=KNOBS, target_logits=None):
    """(loss, new centres) in float64 with explicit sums over samples i and prototypes k.

    `target_logits` (image, text): where the stop-gradient targets are computed (default: the same logits).
    """
    n, k = h_image.shape
    logits = {"image": h_image, "text": h_text}
    students = {m: softmax_rows(h / knobs["student_temperature"]) for m, h in logits.items()}
    targets, new_centres = {}, {}
    target_logits = dict(zip(("image", "text"), target_logits)) if target_logits else logits
    for m, h in target_logits.items():
        if collapse == "centering":
            targets[m] = softmax_rows((h - centres[m]) / knobs["teacher_temperature"])
            mean = sum(h[i] for i in range(n)) / n
            new_centres[m] = knobs["centre_momentum"] * centres[m] + (1 - knobs["centre_momentum"]) * mean
        elif collapse == "sinkhorn":
            targets[m] = reference_sinkhorn(h, knobs["sinkhorn_epsilon"], knobs["sinkhorn_iterations"])
        else:
            targets[m] = softmax_rows(h / knobs["teacher_temperature"])
    total = 0.0
    for i in range(n):
        for kk in range(k):
            total -= targets["text"][i, kk] * math.log(students["image"][i, kk])
            total -= targets["image"][i, kk] * math.log(students["text"][i, kk])
    loss = 0.5 * total / n
    if collapse == "entropy":
        for m in logits:
            p = students[m]
            sample = sum(-sum(p[i, kk] * math.log(p[i, kk]) for kk in range(k)) for i in range(n)) / n
            mean_p = p.sum(axis=0) / n
            mean_entropy = -sum(mean_p[kk] * math.log(mean_p[kk]) for kk in range(k))
            loss += 0.5 * (knobs["entropy_weight"] * sample - knobs["mean_entropy_weight"] * mean_entropy)
    return loss, new_centres


def random_logits(seed, n=6, k=5, dtype=np.float64):
    rng = np.random.default_rng(seed)
    # Cosine-like logits in [-1, 1], as the weight-normalised head produces.
    return np.tanh(rng.normal(size=(n, k))).astype(dtype), np.tanh(rng.normal(size=(n, k))).astype(dtype)


def run_term(h_image, h_text, collapse, centres=None, mask=None, mesh=None, **knobs):
    outputs = {"image_prototype_logits": jnp.asarray(h_image), "text_prototype_logits": jnp.asarray(h_text)}
    if centres is None:
        centres = {m: jnp.zeros((h_image.shape[1],), jnp.asarray(h_image).dtype) for m in ("image", "text")}
    config = {"nclip": {"collapse": collapse, **knobs}}
    batch = {} if mask is None else {"mask": jnp.asarray(mask)}
    ctx = LossContext(mesh=mesh, state={"nclip": centres})
    loss, (metrics, state) = jax.jit(lambda o, b, c: total_loss_with_state(o, b, c, config))(outputs, batch, ctx)
    return float(loss), metrics, state["nclip"]


@pytest.mark.parametrize("collapse", ["centering", "sinkhorn", "entropy"])
def test_matches_float64_loops(collapse):
    h_image, h_text = random_logits(0)
    rng = np.random.default_rng(1)
    centres = {"image": rng.normal(size=5) * 0.1, "text": rng.normal(size=5) * 0.1}
    with jax.enable_x64(True):
        loss, _, state = run_term(h_image, h_text, collapse, centres={m: jnp.asarray(c) for m, c in centres.items()})
    expected, expected_centres = reference_loss(h_image, h_text, centres, collapse)
    assert loss == pytest.approx(expected, rel=1e-10)
    if collapse == "centering":
        for m in ("image", "text"):
            np.testing.assert_allclose(np.asarray(state[m]), expected_centres[m], rtol=1e-12)


def test_sinkhorn_marginals_and_reference():
    scores, _ = random_logits(2, n=7, k=4)
    with jax.enable_x64(True):
        q = np.asarray(sinkhorn_targets(jnp.asarray(scores), jnp.ones(7), epsilon=0.05, iterations=3))
    np.testing.assert_allclose(q, reference_sinkhorn(scores, 0.05, 3), rtol=1e-9)
    np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=1e-12)  # rows are distributions
    # After enough iterations every prototype gets an equal share of the batch.
    with jax.enable_x64(True):
        q = np.asarray(sinkhorn_targets(jnp.asarray(scores), jnp.ones(7), epsilon=0.05, iterations=200))
    np.testing.assert_allclose(q.sum(axis=0), 7 / 4, rtol=1e-6)


@pytest.mark.parametrize("collapse", ["centering", "sinkhorn", "entropy"])
def test_gradients_match_finite_differences_with_targets_held_fixed(collapse):
    # The targets are stop-gradient: the gradient is the derivative with respect to the students alone.
    h_image, h_text = random_logits(3, n=4, k=3)
    zeros = {"image": np.zeros(3), "text": np.zeros(3)}
    with jax.enable_x64(True):
        def loss(hi, ht):
            outputs = {"image_prototype_logits": hi, "text_prototype_logits": ht}
            ctx = LossContext(state={"nclip": {"image": jnp.zeros(3), "text": jnp.zeros(3)}})
            return TERMS["nclip"](outputs, {}, ctx, collapse=collapse)[0]

        grads = jax.grad(loss, argnums=(0, 1))(jnp.asarray(h_image), jnp.asarray(h_text))
    step = 1e-6
    for which, (array, grad) in enumerate(zip((h_image, h_text), grads)):
        for index in np.ndindex(array.shape):
            values = []
            for sign in (1, -1):
                moved = array.copy()
                moved[index] += sign * step
                students = (moved, h_text) if which == 0 else (h_image, moved)
                values.append(reference_loss(*students, zeros, collapse, target_logits=(h_image, h_text))[0])
            numeric = (values[0] - values[1]) / (2 * step)
            assert float(grad[index]) == pytest.approx(numeric, rel=1e-6, abs=1e-9), (which, index)


@pytest.mark.parametrize("collapse", ["centering", "sinkhorn", "entropy"])
@pytest.mark.parametrize("mesh_shape", [{"data": 8}, {"data": 4, "fsdp": 2}])
def test_sharded_equals_unsharded_with_global_batch_statistics(collapse, mesh_shape):
    h_image, h_text = random_logits(4, n=16, k=12, dtype=np.float32)
    loss, metrics, state = run_term(h_image, h_text, collapse)
    mesh = make_mesh(mesh_shape)
    sharding = NamedSharding(mesh, batch_spec(2))
    sharded = (jax.device_put(h_image, sharding), jax.device_put(h_text, sharding))

    def grads(hi, ht, m=None):
        def f(a, b):
            out = {"image_prototype_logits": a, "text_prototype_logits": b}
            ctx = LossContext(mesh=m, state={"nclip": {"image": jnp.zeros(12), "text": jnp.zeros(12)}})
            return TERMS["nclip"](out, {}, ctx, collapse=collapse)[0]
        return jax.jit(jax.grad(f, argnums=(0, 1)))(hi, ht)

    sharded_loss, sharded_metrics, sharded_state = run_term(*sharded, collapse, mesh=mesh)
    assert sharded_loss == pytest.approx(loss, rel=1e-6)
    for m in ("image", "text"):
        np.testing.assert_allclose(np.asarray(sharded_state[m]), np.asarray(state[m]), rtol=1e-6, atol=1e-7)
    for got, expected in zip(grads(*sharded, mesh), grads(h_image, h_text)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("collapse", ["centering", "sinkhorn", "entropy"])
def test_padding_rows_are_ignored(collapse):
    h_image, h_text = random_logits(5, n=5, k=4, dtype=np.float32)
    loss, _, state = run_term(h_image, h_text, collapse)
    pad = np.full((3, 4), 0.7, np.float32)
    padded_loss, _, padded_state = run_term(
        np.concatenate([h_image, pad]), np.concatenate([h_text, -pad]), collapse,
        mask=np.array([True] * 5 + [False] * 3),
    )
    assert padded_loss == pytest.approx(loss, rel=1e-6)
    for m in ("image", "text"):
        np.testing.assert_allclose(np.asarray(padded_state[m]), np.asarray(state[m]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("collapse", ["centering", "sinkhorn", "entropy"])
@pytest.mark.parametrize("n", [1, 2])
def test_tiny_batches_and_identical_logits_stay_finite(collapse, n):
    same = np.ones((n, 6), np.float32) * 0.3
    for h_image, h_text in [random_logits(6, n=n, k=6, dtype=np.float32), (same, same)]:
        def loss(a, b):
            out = {"image_prototype_logits": a, "text_prototype_logits": b}
            ctx = LossContext(state={"nclip": {"image": jnp.zeros(6), "text": jnp.zeros(6)}})
            return TERMS["nclip"](out, {}, ctx, collapse=collapse)[0]

        value, grads = jax.value_and_grad(loss, argnums=(0, 1))(jnp.asarray(h_image), jnp.asarray(h_text))
        assert np.isfinite(float(value))
        assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_state_init_needs_prototype_heads():
    abstract = {"image_embeddings": jax.ShapeDtypeStruct((2, 8), jnp.float32)}
    with pytest.raises(ValueError, match="prototype_heads"):
        init_loss_state({"nclip": {"weight": 1.0}}, abstract)
    abstract.update({"image_prototype_logits": jax.ShapeDtypeStruct((2, 16), jnp.float32),
                     "text_prototype_logits": jax.ShapeDtypeStruct((2, 16), jnp.float32)})
    state = init_loss_state({"clip": {}, "nclip": {"weight": 1.0}}, abstract)
    assert set(state) == {"nclip"} and state["nclip"]["image"].shape == (16,)


def test_unknown_collapse_option_is_refused():
    h_image, h_text = random_logits(7, n=2, k=3, dtype=np.float32)
    with pytest.raises(ValueError, match="collapse must be one of"):
        run_term(h_image, h_text, "whitening")
