"""Tests of jclip.losses.contrastive: CLIP and SigLIP values and gradients.

Against OpenCLIP's own numbers (shared/reference/openclip_losses.npz), against float64 NumPy loops written
here, sharded (8 fake CPU devices) against unsharded, padding masks, a large logit scale, and the
per-device memory of the sharded forms as XLA reports it (`pytest -s` prints it).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from jclip.losses.contrastive import clip_loss, siglip_loss
from jclip.parallel import batch_spec, make_mesh
from jclip_testing import fwd_bwd_temp_bytes, random_features, rel_err

MESHES = {
    "data8": {"data": 8},
    "data4_fsdp2": {"data": 4, "fsdp": 2},
    "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2},
}

# kind -> f(image_embeddings, text_embeddings, log_scale, bias, **kwargs); CLIP ignores the bias.
LOSSES: dict[str, Callable[..., jax.Array]] = {
    "clip": lambda x, y, t, b, **kw: clip_loss(x, y, t, **kw),
    "siglip": lambda x, y, t, b, **kw: siglip_loss(x, y, t, b, **kw),
    "siglip_ring": lambda x, y, t, b, **kw: siglip_loss(x, y, t, b, ring=True, **kw),
}


def _normalise(v: jax.Array) -> jax.Array:
    return v / jnp.linalg.norm(v, axis=-1, keepdims=True)


def _loss_and_grads(kind: str, raw_images, raw_texts, log_scale, bias, *, mask=None, mesh=None):
    """Loss of the L2-normalised raw features, and its gradients wrt (raw images, raw texts, t, b)."""

    def loss(images, texts, t, b):
        return LOSSES[kind](_normalise(images), _normalise(texts), t, b, mask=mask, mesh=mesh)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(raw_images, raw_texts, log_scale, bias)




# --- independent float64 NumPy references: explicit loops over i, j --------------------------------


def _np_normalise(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v / np.sqrt((v * v).sum(axis=1, keepdims=True))


def numpy_clip_loss(images, texts, log_scale, mask=None) -> float:
    """½[CE_rows(S) + CE_rows(Sᵀ)] over the valid rows, S_ij = e^t·<x_i, y_j>, by explicit loops."""
    x, y = _np_normalise(images), _np_normalise(texts)
    valid = [i for i in range(len(x)) if mask is None or mask[i]]
    scale = math.exp(float(log_scale))
    total = 0.0
    for i in valid:
        for queries, keys in ((x, y), (y, x)):  # image -> texts, text -> images
            row = [scale * float(np.dot(queries[i], keys[j])) for j in valid]
            top = max(row)
            log_normaliser = top + math.log(sum(math.exp(v - top) for v in row))
            total += log_normaliser - scale * float(np.dot(queries[i], keys[i]))
    return total / (2 * len(valid))


def numpy_siglip_loss(images, texts, log_scale, bias, mask=None) -> float:
    """−(1/N)·Σ_ij log σ(z_ij·(e^t·<x_i, y_j> + b)) over valid i, j, by explicit loops."""
    x, y = _np_normalise(images), _np_normalise(texts)
    valid = [i for i in range(len(x)) if mask is None or mask[i]]
    scale = math.exp(float(log_scale))
    total = 0.0
    for i in valid:
        for j in valid:
            z = 1.0 if i == j else -1.0
            logit = scale * float(np.dot(x[i], y[j])) + float(bias)
            total += float(np.logaddexp(0.0, -z * logit))  # −log σ(z·logit), stable
    return total / len(valid)


def _numpy_loss(kind: str, x, y, t, b, mask=None) -> float:
    return numpy_clip_loss(x, y, t, mask) if kind == "clip" else numpy_siglip_loss(x, y, t, b, mask)


# --- (a) OpenCLIP parity ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", [0, 1])
@pytest.mark.parametrize("kind,mesh_name", [("clip", None), ("siglip", None), ("clip", "data8"),
                                            ("siglip", "data8"), ("siglip_ring", "data8")])
def test_matches_openclip_float64(reference_dir, case, kind, mesh_name):
    """Values and gradients (wrt raw features, log scale, bias) equal OpenCLIP ClipLoss / SigLipLoss.

    Case 1 has N = 33, so the 8-way sharded forms also exercise the padding to a multiple of 8.
    """
    ref = np.load(reference_dir / "openclip_losses.npz")
    name = "clip" if kind == "clip" else "siglip"
    mesh = make_mesh(MESHES[mesh_name]) if mesh_name else None
    with jax.enable_x64(True):
        args = [jnp.asarray(ref[f"case{case}_{k}"], jnp.float64)
                for k in ("image_features", "text_features", "log_scale", "bias")]
        value, grads = _loss_and_grads(kind, *args, mesh=mesh)
        assert value.dtype == jnp.float64
    assert rel_err(value, ref[f"case{case}_{name}_loss"]) < 1e-12
    for grad, key in zip(grads, ("image", "text", "log_scale", "bias")):
        ref_key = f"case{case}_{name}_grad_{key}"
        if ref_key in ref:
            assert rel_err(grad, ref[ref_key]) < 1e-10, ref_key
        else:  # CLIP has no bias
            assert float(jnp.abs(grad)) == 0.0


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_matches_openclip_float32(reference_dir, kind):
    """The default float32 path agrees with OpenCLIP's float64 numbers to float32 accuracy."""
    ref = np.load(reference_dir / "openclip_losses.npz")
    args = [jnp.asarray(ref[f"case1_{k}"], jnp.float32)
            for k in ("image_features", "text_features", "log_scale", "bias")]
    value, grads = _loss_and_grads(kind, *args)
    assert value.dtype == jnp.float32
    assert rel_err(value, ref[f"case1_{kind}_loss"]) < 1e-6
    assert rel_err(grads[0], ref[f"case1_{kind}_grad_image"]) < 1e-5
    assert rel_err(grads[2], ref[f"case1_{kind}_grad_log_scale"]) < 1e-5


# --- (b) independent float64 NumPy loops ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_numpy_loops(kind, masked):
    x, y = random_features(0, 9, 5, np.float64)
    t, b = 2.3, -4.0
    mask = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1], bool) if masked else None
    expected = _numpy_loss(kind, x, y, t, b, mask)
    loss = jax.jit(lambda x, y, m: LOSSES[kind](_normalise(x), _normalise(y), t, b, mask=m))
    with jax.enable_x64(True):
        value64 = loss(jnp.asarray(x), jnp.asarray(y), mask)
    assert rel_err(value64, expected) < 1e-13
    value32 = loss(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), mask)
    assert value32.dtype == jnp.float32
    assert rel_err(value32, expected) < 2e-6


def test_low_precision_inputs_computed_in_float32():
    x, y = random_features(1, 8, 4)
    x16, y16 = _normalise(jnp.asarray(x)).astype(jnp.bfloat16), _normalise(jnp.asarray(y)).astype(jnp.bfloat16)
    for kind in ("clip", "siglip"):
        loss = jax.jit(LOSSES[kind])
        value = loss(x16, y16, jnp.asarray(2.0, jnp.bfloat16), jnp.asarray(-3.0, jnp.bfloat16))
        assert value.dtype == jnp.float32
        expected = loss(x16.astype(jnp.float32), y16.astype(jnp.float32), 2.0, -3.0)
        assert float(value) == float(expected)  # the same as upcasting first


# --- (c) sharded == unsharded -----------------------------------------------------------------------


@pytest.mark.parametrize("kind,mesh_name", [(k, m) for k in LOSSES for m in ("data8", "data4_fsdp2")]
                         + [("clip", "data2_fsdp2_tensor2")])
def test_sharded_equals_unsharded(kind, mesh_name):
    """Values and all gradients of the sharded form (inputs sharded over the batch axes) equal one device."""
    mesh = make_mesh(MESHES[mesh_name])
    x, y = random_features(2, 24, 8)
    t, b = jnp.float32(2.6), jnp.float32(-6.0)
    expected_value, expected_grads = _loss_and_grads(kind, x, y, t, b)
    sharding = NamedSharding(mesh, batch_spec(2))
    value, grads = _loss_and_grads(kind, jax.device_put(x, sharding), jax.device_put(y, sharding), t, b, mesh=mesh)
    assert rel_err(value, expected_value) < 1e-6
    for grad, expected in zip(grads, expected_grads):
        if kind == "clip" and float(jnp.abs(expected).max()) == 0.0:
            assert float(jnp.abs(grad).max()) == 0.0  # d/d bias of CLIP
        else:
            assert rel_err(grad, expected) < 1e-5


# --- (d) masking ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,mesh_name", [("clip", None), ("siglip", None), ("clip", "data8"),
                                            ("siglip", "data8"), ("siglip_ring", "data8")])
def test_padding_rows_have_no_effect(kind, mesh_name):
    """Loss and gradients with padding rows masked equal those of the valid rows alone; padding gets 0.

    N = 13 is not a multiple of the 8 shards, so the sharded forms also pad internally.
    """
    mesh = make_mesh(MESHES[mesh_name]) if mesh_name else None
    x, y = random_features(4, 13, 8)
    mask = np.ones(13, bool)
    mask[[0, 5, 6, 11, 12]] = False
    x[~mask] *= 50.0  # garbage in the padding rows
    valid_value, valid_grads = _loss_and_grads(kind, x[mask], y[mask], 2.5, -7.0)
    value, grads = _loss_and_grads(kind, x, y, 2.5, -7.0, mask=jnp.asarray(mask), mesh=mesh)
    assert rel_err(value, valid_value) < 1e-6
    for grad, valid_grad in zip(grads[:2], valid_grads[:2]):
        assert rel_err(np.asarray(grad)[mask], valid_grad) < 1e-5
        assert np.all(np.asarray(grad)[~mask] == 0.0)
    for grad, valid_grad in zip(grads[2:], valid_grads[2:]):
        assert abs(float(grad) - float(valid_grad)) <= 1e-5 * max(abs(float(valid_grad)), 1.0)


def test_all_rows_masked_is_zero_and_finite():
    mesh = make_mesh(MESHES["data8"])
    x, y = random_features(5, 8, 4)
    for kind, m in (("clip", None), ("siglip", None), ("clip", mesh), ("siglip_ring", mesh)):
        value, grads = _loss_and_grads(kind, x, y, 2.0, -1.0, mask=jnp.zeros(8, bool), mesh=m)
        assert float(value) == 0.0
        assert all(bool(jnp.all(g == 0.0)) for g in grads)


# --- (e) large logit scale --------------------------------------------------------------------------


@pytest.mark.parametrize("kind,mesh_name", [("clip", None), ("siglip", None), ("clip", "data8"),
                                            ("siglip_ring", "data8")])
def test_large_logit_scale_is_finite(kind, mesh_name):
    mesh = make_mesh(MESHES[mesh_name]) if mesh_name else None
    x, y = random_features(6, 16, 8)
    t = math.log(1e4)
    value, grads = _loss_and_grads(kind, x, y, t, -10.0, mesh=mesh)
    assert np.isfinite(float(value))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    assert rel_err(value, _numpy_loss(kind, x, y, t, -10.0)) < 1e-5


# --- (f) per-device memory --------------------------------------------------------------------------


def _temp_bytes(kind: str, n_rows: int, d: int, mesh) -> int:
    return fwd_bwd_temp_bytes(lambda x, y, t, b: LOSSES[kind](x, y, t, b, mesh=mesh), n_rows, d, mesh, num_scalars=2)


def test_sharded_memory_grows_like_n_times_N():
    """At fixed local n, per-device temp memory of fwd+bwd grows linearly in the global N (not N²).

    Also: the 8-way gathered forms need far less than the same loss on one device (which is O(N²)), and
    the SigLIP ring needs less than the gathered SigLIP.
    """
    n, d = 64, 16
    temps: dict[tuple[str, int], int] = {}
    print(f"\nper-device temp bytes of loss fwd+bwd, n={n} rows per device, d={d}, float32")
    print(f"{'kind':12s} {'devices':>7s} {'N':>5s} {'temp':>9s} {'temp/(n*N*4)':>12s} {'temp/(N*N*4)':>12s}")
    for kind in LOSSES:
        for devices in (2, 4, 8):
            mesh = make_mesh({"data": devices}, devices=jax.devices()[:devices])
            big_n = n * devices
            temps[kind, devices] = _temp_bytes(kind, big_n, d, mesh)
            print(f"{kind:12s} {devices:7d} {big_n:5d} {temps[kind, devices]:9d} "
                  f"{temps[kind, devices] / (n * big_n * 4):12.2f} {temps[kind, devices] / (big_n * big_n * 4):12.3f}")
    big_n = 8 * n
    for kind in ("clip", "siglip"):
        one_device = _temp_bytes(kind, big_n, d, None)
        print(f"{kind:12s} {1:7d} {big_n:5d} {one_device:9d}   (unsharded, same N)")
        assert temps[kind, 8] < 0.2 * one_device
    for kind in LOSSES:
        # linear in N: 4x the global batch costs at most ~4x (plus slack), not 16x
        assert temps[kind, 8] <= 1.25 * 4 * temps[kind, 2]
        # below one N×N float32 matrix at the largest N
        assert temps[kind, 8] < big_n * big_n * 4
    assert temps["siglip_ring", 8] < 0.6 * temps["siglip", 8]
