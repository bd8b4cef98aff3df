"""Tests of jclip.losses.soft: the SoftCLIP loss term (METHODS.md section 2, a reconstruction).

Against float64 NumPy loops written here (explicit sums over i, j for KL(Q‖P) and the negatives-only KL),
central finite differences of those loops, the CLIP loss at α = 0, a label-smoothed cross-entropy for
uniform guidance, sharded (8 fake CPU devices) against unsharded, padding masks, degenerate batches and
scales, and the three guidance sources with their missing-key errors.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding

from configs import softclip as softclip_config
from jclip.losses import LossContext, TERMS, clip_loss, total_loss, validate_terms_config
from jclip.losses.soft import softclip_loss, softclip_parts
from jclip.parallel import batch_spec, make_mesh
from jclip_testing import fwd_bwd_temp_bytes, random_features, rel_err

MESHES = {"data8": {"data": 8}, "data4_fsdp2": {"data": 4, "fsdp": 2}}


def _normalise(v: jax.Array) -> jax.Array:
    return v / jnp.linalg.norm(v, axis=-1, keepdims=True)




# --- independent float64 NumPy reference: explicit sums over i, j ----------------------------------


def _np_normalise(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v / np.sqrt((v * v).sum(axis=1, keepdims=True))


def _log_softmax_over(values: dict[int, float]) -> dict[int, float]:
    """{j: v_j − log Σ_k exp v_k} for the given entries, by an explicit, max-shifted sum."""
    top = max(values.values())
    log_normaliser = top + math.log(sum(math.exp(v - top) for v in values.values()))
    return {j: v - log_normaliser for j, v in values.items()}


def numpy_softclip(
    images, texts, log_scale, *, alpha=0.2, tau=None, image_guidance=None, text_guidance=None,
    pairing="same", mask=None, guidance_scale=None,
) -> tuple[float, float]:
    """(L_soft, L_neg) by explicit loops, written from METHODS.md section 2.

    Guidance features default to the (normalised) embeddings; `guidance_scale` overrides 1/τ_g (used to
    freeze the guidance for finite differences). L_neg is 0 for rows without negatives and for α = 0.
    """
    x, y = _np_normalise(images), _np_normalise(texts)
    rx = x if image_guidance is None else _np_normalise(image_guidance)
    ry = y if text_guidance is None else _np_normalise(text_guidance)
    guides = {"image": rx, "text": ry}
    i2t, t2i = {"same": ("image", "text"), "swapped": ("text", "image"),
                "image": ("image", "image"), "text": ("text", "text")}[pairing]
    valid = [i for i in range(len(x)) if mask is None or mask[i]]
    scale = math.exp(float(log_scale))
    beta = guidance_scale if guidance_scale is not None else (scale if tau is None else 1.0 / tau)
    soft = neg = 0.0
    for queries, keys, r in ((x, y, guides[i2t]), (y, x, guides[t2i])):
        for i in valid:
            logits = {j: scale * float(np.dot(queries[i], keys[j])) for j in valid}
            guide = {j: beta * float(np.dot(r[i], r[j])) for j in valid}
            log_p, log_g = _log_softmax_over(logits), _log_softmax_over(guide)
            for j in valid:
                q = (1.0 - alpha) * (i == j) + alpha * math.exp(log_g[j])
                if q > 0:
                    soft += q * (math.log(q) - log_p[j])
            others = [j for j in valid if j != i]
            if alpha > 0 and others:
                log_p_bar = _log_softmax_over({j: logits[j] for j in others})
                log_g_bar = _log_softmax_over({j: guide[j] for j in others})
                for j in others:
                    neg += math.exp(log_g_bar[j]) * (log_g_bar[j] - log_p_bar[j])
    return soft / (2 * len(valid)), neg / (2 * len(valid))


# --- helpers: the loss through the registered term ---------------------------------------------------


def _term_value_and_grads(raw_x, raw_y, log_scale, *, batch=None, outputs_extra=None, mesh=None, **knobs):
    """(loss, metrics), grads wrt (raw images, raw texts, t) of TERMS['softclip'] on normalised features."""
    batch = {} if batch is None else batch
    extra = {} if outputs_extra is None else outputs_extra

    def loss(x, y, t):
        outputs = {"image_embeddings": _normalise(x), "text_embeddings": _normalise(y), "logit_scale": t, **extra}
        return TERMS["softclip"](outputs, batch, LossContext(mesh=mesh), **knobs)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(raw_x, raw_y, log_scale)


# --- (a) values against the NumPy loops --------------------------------------------------------------

CASES = [
    # (guidance, pairing, masked, tau, alpha)
    ("self", "same", False, None, 0.2),
    ("self", "same", True, None, 0.2),
    ("self", "swapped", False, 0.05, 0.5),
    ("batch", "same", False, None, 0.2),
    ("batch", "same", True, 0.1, 0.3),
    ("batch", "swapped", True, None, 0.2),
    ("batch", "image", False, None, 1.0),
    ("batch", "text", True, 0.5, 0.7),
]


@pytest.mark.parametrize("guidance,pairing,masked,tau,alpha", CASES)
def test_matches_numpy_loops(guidance, pairing, masked, tau, alpha):
    """L_soft and L_neg (reported as metrics) and the total, float64 to 1e-10 and float32 to 1e-5."""
    x, y = random_features(0, 9, 5, np.float64)
    rng = np.random.default_rng(1)
    gx, gy = rng.normal(size=(9, 7)), rng.normal(size=(9, 7))
    mask = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1], bool) if masked else None
    t = 2.3
    reference = dict(alpha=alpha, tau=tau, pairing=pairing, mask=mask)
    if guidance == "batch":
        reference.update(image_guidance=gx, text_guidance=gy)
    soft_ref, neg_ref = numpy_softclip(x, y, t, **reference)
    assert neg_ref > 0.01 and soft_ref > 0.01  # non-trivial cases

    knobs = dict(alpha=alpha, neg_weight=0.7, guidance_temperature=tau, guidance=guidance, pairing=pairing)
    for dtype, tol in ((jnp.float64, 1e-10), (jnp.float32, 1e-5)):
        with jax.enable_x64(dtype == jnp.float64):
            batch = {} if mask is None else {"mask": jnp.asarray(mask)}
            if guidance == "batch":
                batch.update(guidance_image_features=jnp.asarray(gx, dtype), guidance_text_features=jnp.asarray(gy, dtype))
            (value, metrics), _ = _term_value_and_grads(
                jnp.asarray(x, dtype), jnp.asarray(y, dtype), jnp.asarray(t, dtype), batch=batch, **knobs
            )
            assert value.dtype == dtype
            assert rel_err(metrics["softclip/soft"], soft_ref) < tol
            assert rel_err(metrics["softclip/neg"], neg_ref) < tol
            assert rel_err(value, soft_ref + 0.7 * neg_ref) < tol
            assert float(metrics["softclip/alpha"]) == pytest.approx(alpha)


# --- (b) gradients against central finite differences -------------------------------------------------


def _finite_differences(f, params: list[np.ndarray], h: float = 1e-5) -> list[np.ndarray]:
    grads = []
    for k, p in enumerate(params):
        g = np.zeros_like(p)
        for idx in np.ndindex(p.shape):
            plus = [q.copy() for q in params]
            minus = [q.copy() for q in params]
            plus[k][idx] += h
            minus[k][idx] -= h
            g[idx] = (f(*plus) - f(*minus)) / (2 * h)
        grads.append(g)
    return grads


@pytest.mark.parametrize("guidance,masked", [("self", False), ("self", True), ("batch", True)])
def test_gradients_match_finite_differences(guidance, masked):
    """Gradients wrt raw features and t equal central differences of the NumPy loops (float64, 1e-6).

    Guidance carries no gradient: for "self" guidance (τ_g = the current 1/s) the differences are taken
    with the guidance frozen at the base point (its features and its scale).
    """
    x, y = random_features(3, 5, 3, np.float64)
    rng = np.random.default_rng(4)
    gx, gy = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    t = np.array(2.0)
    mask = np.array([1, 1, 0, 1, 1], bool) if masked else None
    lam = 0.8
    if guidance == "self":
        frozen = dict(image_guidance=x.copy(), text_guidance=y.copy(), guidance_scale=math.exp(float(t)))
        batch = {}
        tau = None
    else:
        frozen = dict(image_guidance=gx, text_guidance=gy, tau=0.2)
        batch = {"guidance_image_features": jnp.asarray(gx), "guidance_text_features": jnp.asarray(gy)}
        tau = 0.2

    def reference(xx, yy, tt):
        soft, neg = numpy_softclip(xx, yy, float(tt), alpha=0.3, mask=mask, **frozen)
        return soft + lam * neg

    expected = _finite_differences(reference, [x, y, t])
    if mask is not None:
        batch["mask"] = jnp.asarray(mask)
    with jax.enable_x64(True):
        _, grads = _term_value_and_grads(
            jnp.asarray(x), jnp.asarray(y), jnp.asarray(t), batch=batch,
            alpha=0.3, neg_weight=lam, guidance=guidance, guidance_temperature=tau,
        )
    for grad, exp in zip(grads, expected):
        assert rel_err(grad, exp) < 1e-6


# --- (c) α = 0 is CLIP; uniform guidance is label smoothing ------------------------------------------


@pytest.mark.parametrize("mesh_name", [None, "data8"])
def test_alpha_zero_equals_clip(mesh_name):
    """With α = 0 the loss (at the default λ = 1) and its gradients equal jclip.losses.clip_loss."""
    mesh = make_mesh(MESHES[mesh_name]) if mesh_name else None
    x, y = random_features(5, 13, 6)
    mask = np.ones(13, bool)
    mask[[2, 7]] = False
    for dtype, tol in ((jnp.float64, 1e-12), (jnp.float32, 1e-6)):
        with jax.enable_x64(dtype == jnp.float64):
            xs, ys, t = jnp.asarray(x, dtype), jnp.asarray(y, dtype), jnp.asarray(2.6, dtype)
            (value, metrics), grads = _term_value_and_grads(xs, ys, t, batch={"mask": jnp.asarray(mask)},
                                                            mesh=mesh, alpha=0.0)
            clip = jax.jit(jax.value_and_grad(
                lambda a, b, s: clip_loss(_normalise(a), _normalise(b), s, mask=jnp.asarray(mask)), argnums=(0, 1, 2)
            ))
            clip_value, clip_grads = clip(xs, ys, t)
            assert float(metrics["softclip/neg"]) == 0.0
            assert rel_err(value, clip_value) < tol
            for grad, clip_grad in zip(grads, clip_grads):
                assert rel_err(grad, clip_grad) < 10 * tol


def numpy_label_smoothed_ce(images, texts, log_scale, eps) -> float:
    """½ Σ_directions mean_i −Σ_j q_ij log p_ij with q = (1−ε)·onehot + ε/N, by explicit sums."""
    x, y = _np_normalise(images), _np_normalise(texts)
    n, scale = len(x), math.exp(float(log_scale))
    total = 0.0
    for queries, keys in ((x, y), (y, x)):
        for i in range(n):
            log_p = _log_softmax_over({j: scale * float(np.dot(queries[i], keys[j])) for j in range(n)})
            total -= sum(((1 - eps) * (i == j) + eps / n) * log_p[j] for j in range(n))
    return total / (2 * n)


def test_uniform_guidance_is_label_smoothing():
    """Identical guidance features make G uniform: L_soft = label-smoothed CE − H(Q), same gradients."""
    n, eps = 10, 0.3
    x, y = random_features(6, n, 8)
    same = np.ones((n, 4), np.float32)
    batch = {"guidance_image_features": jnp.asarray(same), "guidance_text_features": jnp.asarray(same)}
    (_, metrics), grads = _term_value_and_grads(jnp.asarray(x), jnp.asarray(y), jnp.float32(2.4), batch=batch,
                                                guidance="batch", alpha=eps, neg_weight=0.0)
    q = np.full(n, eps / n)
    q[0] += 1 - eps
    entropy = -float(np.sum(q * np.log(q)))  # the same for every row
    assert rel_err(float(metrics["softclip/soft"]) + entropy, numpy_label_smoothed_ce(x, y, 2.4, eps)) < 1e-5

    def smoothed(a, b, t):  # optax's label smoothing, an independent implementation
        logits = jnp.exp(t) * _normalise(a) @ _normalise(b).T
        labels = optax.smooth_labels(jnp.eye(n), eps)
        return 0.5 * (optax.softmax_cross_entropy(logits, labels).mean()
                      + optax.softmax_cross_entropy(logits.T, labels).mean())

    expected = jax.grad(smoothed, argnums=(0, 1, 2))(jnp.asarray(x), jnp.asarray(y), jnp.float32(2.4))
    for grad, exp in zip(grads, expected):
        assert rel_err(grad, exp) < 1e-5


# --- (d) sharded == unsharded --------------------------------------------------------------------------


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("guidance,n", [("self", 24), ("batch", 24), ("outputs", 13), ("self", 13)])
def test_sharded_equals_unsharded(mesh_name, guidance, n):
    """Values (1e-6) and gradients (1e-5) of the sharded term equal one device; N = 13 pads to 16."""
    mesh = make_mesh(MESHES[mesh_name])
    x, y = random_features(7, n, 8)
    rng = np.random.default_rng(8)
    gx, gy = rng.normal(size=(n, 5)).astype(np.float32), rng.normal(size=(n, 5)).astype(np.float32)
    mask = np.ones(n, bool)
    mask[[1, n - 2]] = False
    sharding = NamedSharding(mesh, batch_spec(2))
    put = (lambda a: jax.device_put(a, sharding)) if n % 8 == 0 else jnp.asarray
    batch, extra = {"mask": jnp.asarray(mask)}, {}
    if guidance == "batch":
        batch.update(guidance_image_features=put(gx), guidance_text_features=put(gy))
    if guidance == "outputs":
        extra = {"teacher_image_embeddings": put(gx), "teacher_text_embeddings": put(gy)}
    knobs = dict(guidance=guidance, alpha=0.4, neg_weight=1.5)
    (expected, expected_metrics), expected_grads = _term_value_and_grads(
        jnp.asarray(x), jnp.asarray(y), jnp.float32(2.6), batch=batch, outputs_extra=extra, **knobs)
    (value, metrics), grads = _term_value_and_grads(
        put(x), put(y), jnp.float32(2.6), batch=batch, outputs_extra=extra, mesh=mesh, **knobs)
    assert rel_err(value, expected) < 1e-6
    for key in ("softclip/soft", "softclip/neg"):
        assert rel_err(metrics[key], expected_metrics[key]) < 1e-6
    for grad, exp in zip(grads, expected_grads):
        assert rel_err(grad, exp) < 1e-5


def test_sharded_guidance_features_get_no_gradient():
    mesh = make_mesh(MESHES["data8"])
    x, y = random_features(9, 16, 4)
    gx, gy = random_features(10, 16, 3)

    def loss(gi, gt):
        return softclip_loss(_normalise(jnp.asarray(x)), _normalise(jnp.asarray(y)), 2.0,
                             image_guidance=gi, text_guidance=gt, mesh=mesh)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(gx), jnp.asarray(gy))
    assert all(bool(jnp.all(g == 0.0)) for g in grads)


# --- (e) degenerate inputs -------------------------------------------------------------------------------


def _assert_finite(value, grads):
    assert np.isfinite(float(value))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


def test_batch_of_one():
    """N = 1: P = Q = [1] so L_soft = 0, and there are no negatives, so L_neg is defined as 0."""
    x, y = random_features(11, 1, 4)
    (value, metrics), grads = _term_value_and_grads(jnp.asarray(x), jnp.asarray(y), jnp.float32(2.6))
    _assert_finite(value, grads)
    assert float(value) == 0.0 and float(metrics["softclip/neg"]) == 0.0
    assert all(float(jnp.abs(g).max()) == 0.0 for g in grads)


def test_batch_of_two():
    """N = 2: one negative per row, so P̄ = Q̄ = [1] and L_neg = 0; L_soft as the NumPy loops."""
    x, y = random_features(12, 2, 4)
    (value, metrics), grads = _term_value_and_grads(jnp.asarray(x), jnp.asarray(y), jnp.float32(2.6))
    _assert_finite(value, grads)
    soft_ref, neg_ref = numpy_softclip(x, y, 2.6)
    assert neg_ref == 0.0 and abs(float(metrics["softclip/neg"])) < 1e-7
    assert rel_err(metrics["softclip/soft"], soft_ref) < 1e-5


def test_identical_embeddings():
    """Every image and every text the same: P and G uniform, finite gradients, values as NumPy."""
    x = np.tile(np.array([[0.3, -1.0, 2.0, 0.5]], np.float32), (6, 1))
    y = np.tile(np.array([[1.0, 0.2, -0.4, 0.1]], np.float32), (6, 1))
    (value, metrics), grads = _term_value_and_grads(jnp.asarray(x), jnp.asarray(y), jnp.float32(2.6))
    _assert_finite(value, grads)
    soft_ref, neg_ref = numpy_softclip(x, y, 2.6)
    assert rel_err(metrics["softclip/soft"], soft_ref) < 1e-5
    assert abs(float(metrics["softclip/neg"]) - neg_ref) < 1e-6  # both 0: Ḡ = P̄ = uniform


@pytest.mark.parametrize("mesh_name", [None, "data8"])
@pytest.mark.parametrize("log_scale", [math.log(100.0), math.log(1e6)])
def test_large_logit_scale_is_finite(log_scale, mesh_name):
    """ln 100 (CLIP's clamp) and 1e6: no NaN/Inf in loss or gradients; float64 values match NumPy."""
    mesh = make_mesh(MESHES[mesh_name]) if mesh_name else None
    x, y = random_features(13, 16, 8)
    for guidance, tau in (("self", None), ("self", 0.01)):
        (value, _), grads = _term_value_and_grads(jnp.asarray(x), jnp.asarray(y), jnp.float32(log_scale),
                                                  mesh=mesh, guidance=guidance, guidance_temperature=tau)
        _assert_finite(value, grads)
        soft_ref, neg_ref = numpy_softclip(x, y, log_scale, tau=tau)
        with jax.enable_x64(True):
            (value64, _), grads64 = _term_value_and_grads(jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.float64),
                                                          jnp.float64(log_scale), mesh=mesh, guidance_temperature=tau)
        _assert_finite(value64, grads64)
        assert rel_err(value64, soft_ref + neg_ref) < 1e-9
        if log_scale < 5.0:
            assert rel_err(value, soft_ref + neg_ref) < 1e-5


@pytest.mark.parametrize("mesh_name", [None, "data8"])
@pytest.mark.parametrize("guidance", ["self", "batch"])
def test_padding_rows_have_no_effect(mesh_name, guidance):
    """Masked padding rows (garbage embeddings and guidance) give the loss and gradients of the valid rows."""
    mesh = make_mesh(MESHES[mesh_name]) if mesh_name else None
    x, y = random_features(14, 13, 8)
    gx, gy = random_features(15, 13, 5)
    mask = np.ones(13, bool)
    mask[[0, 5, 6, 11, 12]] = False
    x[~mask] *= 50.0
    gx[~mask] *= -30.0
    knobs = dict(guidance=guidance, alpha=0.25)

    def batch_of(rows):
        b = {"guidance_image_features": jnp.asarray(gx[rows]), "guidance_text_features": jnp.asarray(gy[rows])}
        return b if guidance == "batch" else {}

    (expected, _), expected_grads = _term_value_and_grads(
        jnp.asarray(x[mask]), jnp.asarray(y[mask]), jnp.float32(2.5), batch=batch_of(mask), **knobs)
    (value, _), grads = _term_value_and_grads(
        jnp.asarray(x), jnp.asarray(y), jnp.float32(2.5), batch={"mask": jnp.asarray(mask), **batch_of(slice(None))},
        mesh=mesh, **knobs)
    assert rel_err(value, expected) < 1e-6
    for grad, exp in zip(grads[:2], expected_grads[:2]):
        assert rel_err(np.asarray(grad)[mask], exp) < 1e-5
        assert np.all(np.asarray(grad)[~mask] == 0.0)
    assert abs(float(grads[2]) - float(expected_grads[2])) <= 1e-5 * max(abs(float(expected_grads[2])), 1.0)


def test_all_rows_masked_is_zero_and_finite():
    x, y = random_features(16, 8, 4)
    for mesh in (None, make_mesh(MESHES["data8"])):
        (value, _), grads = _term_value_and_grads(jnp.asarray(x), jnp.asarray(y), jnp.float32(2.0),
                                                  batch={"mask": jnp.zeros(8, bool)}, mesh=mesh)
        assert float(value) == 0.0
        assert all(bool(jnp.all(g == 0.0)) for g in grads)


# --- (f) guidance sources, knobs, errors ---------------------------------------------------------------


def test_outputs_guidance_matches_numpy_and_only_needs_its_keys():
    """guidance='outputs' reads the teacher embeddings; pairing='image' needs only the image one."""
    x, y = random_features(17, 7, 6)
    gx, gy = random_features(18, 7, 3)
    extra = {"teacher_image_embeddings": jnp.asarray(gx), "teacher_text_embeddings": jnp.asarray(gy)}
    (value, _), _ = _term_value_and_grads(jnp.asarray(x), jnp.asarray(y), jnp.float32(2.0), outputs_extra=extra,
                                          guidance="outputs")
    soft_ref, neg_ref = numpy_softclip(x, y, 2.0, image_guidance=gx, text_guidance=gy)
    assert rel_err(value, soft_ref + neg_ref) < 1e-5
    only_image = {"teacher_image_embeddings": jnp.asarray(gx)}
    (value, _), _ = _term_value_and_grads(jnp.asarray(x), jnp.asarray(y), jnp.float32(2.0),
                                          outputs_extra=only_image, guidance="outputs", pairing="image")
    soft_ref, neg_ref = numpy_softclip(x, y, 2.0, image_guidance=gx, pairing="image")
    assert rel_err(value, soft_ref + neg_ref) < 1e-5


@pytest.mark.parametrize("guidance,keys", [
    ("batch", ("guidance_image_features", "guidance_text_features")),
    ("outputs", ("teacher_image_embeddings", "teacher_text_embeddings")),
])
def test_missing_guidance_keys_raise(guidance, keys):
    x, y = random_features(19, 4, 3)
    outputs = {"image_embeddings": _normalise(jnp.asarray(x)), "text_embeddings": _normalise(jnp.asarray(y)),
               "logit_scale": jnp.float32(2.0)}
    with pytest.raises(ValueError) as error:
        TERMS["softclip"](outputs, {}, LossContext(), guidance=guidance)
    assert all(key in str(error.value) for key in keys)
    container = {keys[0]: jnp.asarray(x)}  # the image key only: the text one is reported
    batch, outs = (container, outputs) if guidance == "batch" else ({}, {**outputs, **container})
    with pytest.raises(ValueError, match=keys[1]) as error:
        TERMS["softclip"](outs, batch, LossContext(), guidance=guidance)
    assert keys[0] not in str(error.value)


@pytest.mark.parametrize("knobs,message", [
    ({"guidance": "teacher"}, "unknown guidance"),
    ({"pairing": "diagonal"}, "unknown pairing"),
    ({"alpha": 1.5}, "alpha"),
    ({"guidance_temperature": 0.0}, "guidance_temperature"),
])
def test_bad_knobs_raise(knobs, message):
    x, y = random_features(20, 4, 3)
    outputs = {"image_embeddings": jnp.asarray(x), "text_embeddings": jnp.asarray(y), "logit_scale": jnp.float32(2.0)}
    with pytest.raises(ValueError, match=message):
        TERMS["softclip"](outputs, {}, LossContext(), **knobs)


def test_config_and_total_loss():
    """configs/softclip.py validates, and total_loss reports the term's metrics."""
    config = softclip_config.get_config()
    parsed = validate_terms_config(config.losses)
    assert [name for name, _, _ in parsed] == ["softclip"]
    assert parsed[0][2] == {"alpha": 0.2, "neg_weight": 1.0, "guidance_temperature": None,
                            "guidance": "self", "pairing": "same"}
    x, y = random_features(21, 6, 4)
    outputs = {"image_embeddings": _normalise(jnp.asarray(x)), "text_embeddings": _normalise(jnp.asarray(y)),
               "logit_scale": jnp.float32(2.6)}
    loss, metrics = total_loss(outputs, {}, LossContext(), config.losses)
    soft_ref, neg_ref = numpy_softclip(x, y, 2.6)
    assert rel_err(loss, soft_ref + neg_ref) < 1e-5
    assert {"softclip/soft", "softclip/neg", "softclip/alpha", "loss/softclip", "loss/total"} <= set(metrics)


def test_softclip_parts_wrapper_matches_term():
    x, y = random_features(22, 5, 4)
    xs, ys = _normalise(jnp.asarray(x)), _normalise(jnp.asarray(y))
    soft, neg = softclip_parts(xs, ys, 2.1, alpha=0.35)
    assert rel_err(softclip_loss(xs, ys, 2.1, alpha=0.35, neg_weight=2.0), soft + 2.0 * neg) < 1e-7
    assert rel_err((soft, neg), numpy_softclip(x, y, 2.1, alpha=0.35)) < 1e-5


# --- (g) per-device memory ----------------------------------------------------------------------------


def _temp_bytes(n_rows: int, d: int, mesh) -> int:
    return fwd_bwd_temp_bytes(lambda x, y, t: softclip_loss(x, y, t, mesh=mesh), n_rows, d, mesh)


def test_sharded_memory_grows_like_n_times_N():
    """At fixed local n, per-device temp memory of fwd+bwd grows linearly in the global N, not N²."""
    n, d = 64, 16
    temps = {}
    for devices in (2, 8):
        mesh = make_mesh({"data": devices}, devices=jax.devices()[:devices])
        temps[devices] = _temp_bytes(n * devices, d, mesh)
    one_device = _temp_bytes(8 * n, d, None)
    big_n = 8 * n
    print(f"\nsoftclip per-device temp bytes, n={n}: 2 devices {temps[2]}, 8 devices {temps[8]} "
          f"({temps[8] / (n * big_n * 4):.1f} n·N floats), one device at N={big_n}: {one_device}")
    assert temps[8] <= 1.25 * 4 * temps[2]
    assert temps[8] < 0.25 * one_device
