"""Tests of jclip.losses.rank: ListMLE and the RankCLIP term.

Against the official code's numbers (shared/reference/rankclip_official.npz), against float64 NumPy loops
written here from METHODS.md section 1 (per row, per position k, log Σ_{m≥k} exp), central finite
differences, sharded (8 fake CPU devices) against unsharded, random tie-breaking, degenerate batches,
padding masks, the ramp, and the per-device memory of the sharded form (`pytest -s` prints it).
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from jclip.losses import LossContext, total_loss, validate_terms_config
from jclip.losses.rank import list_mle, ramp_weight, rankclip_losses
from jclip.parallel import batch_spec, make_mesh
from jclip_testing import fwd_bwd_temp_bytes, random_features, rel_err

MESHES = {"data8": {"data": 8}, "data4_fsdp2": {"data": 4, "fsdp": 2}}
OFFICIAL_EPOCHS = (1, 10, 40, 64)


def _normalise(v: jax.Array) -> jax.Array:
    return v / jnp.linalg.norm(v, axis=-1, keepdims=True)




def _objective(x, y, t, *, step=1, total_steps=3, mesh=None, mask=None, rng=None, clip=True, **rank_kwargs):
    """clip + rankclip terms on the L2-normalised raw features: (value, metrics, grads wrt x, y, t)."""
    ctx = LossContext(mesh=mesh, step=step, total_steps=total_steps, rng=rng)
    config = {"rankclip": {"weight": 1.0, **rank_kwargs}}
    if clip:
        config = {"clip": {"weight": 1.0}, **config}
    batch = {} if mask is None else {"mask": mask}

    def loss(x, y, t):
        outputs = {"image_embeddings": _normalise(x), "text_embeddings": _normalise(y), "logit_scale": t}
        return total_loss(outputs, batch, ctx, config)

    (value, metrics), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(x, y, t)
    return value, metrics, grads


# --- independent float64 NumPy references: the plain Plackett–Luce loop ----------------------------


def numpy_list_mle(scores, targets, eps=0.0, position_weight=False, row_mask=None, col_mask=None) -> float:
    """Mean over valid rows of Σ_k [log(ε + Σ_{m≥k} e^{p_m − M}) + M − p_k], p = scores in target order.

    Ties in the targets go by column index (Python's sort is stable).
    """
    scores, targets = np.asarray(scores, np.float64), np.asarray(targets, np.float64)
    rows = [i for i in range(scores.shape[0]) if row_mask is None or row_mask[i]]
    cols = [j for j in range(scores.shape[1]) if col_mask is None or col_mask[j]]
    total = 0.0
    for i in rows:
        order = sorted(cols, key=lambda j: -targets[i, j])
        p = [float(scores[i, j]) for j in order]
        top = max(p)
        for k in range(len(p)):
            tail = sum(math.exp(p[m] - top) for m in range(k, len(p)))
            summand = math.log(eps + tail) + top - p[k]
            total += summand / math.log(k + 2) if position_weight else summand  # k + 1 is 1-based
    return total / max(len(rows), 1)


def numpy_rank_terms(images, texts, log_scale, eps=0.0, position_weight=False, mask=None) -> tuple[float, float]:
    """(L_cross, L_in) of METHODS section 1 on the valid rows, from explicit loops."""
    keep = np.ones(len(images), bool) if mask is None else np.asarray(mask, bool)
    x, y = np.asarray(images, np.float64)[keep], np.asarray(texts, np.float64)[keep]
    x, y = x / np.linalg.norm(x, axis=1, keepdims=True), y / np.linalg.norm(y, axis=1, keepdims=True)
    s = math.exp(float(log_scale))
    sim = lambda a, b: np.array([[s * float(np.dot(a[i], b[j])) for j in range(len(b))] for i in range(len(a))])
    xy, xx, yy = sim(x, y), sim(x, x), sim(y, y)
    lm = lambda p, q: numpy_list_mle(p, q, eps, position_weight)
    return lm(xy, xy.T) + lm(xy.T, xy), lm(xx, yy) + lm(yy, xx)


# --- (a) the official code's numbers ----------------------------------------------------------------


@pytest.mark.parametrize("case", [0, 1])
def test_list_mle_matches_official(reference_dir, case):
    """list_mle (ε = 1e-10 default) equals the official list_MLE's loss and gradient wrt the scores."""
    ref = np.load(reference_dir / "rankclip_official.npz")
    with jax.enable_x64(True):
        scores = jnp.asarray(ref[f"listmle{case}_scores"], jnp.float64)
        targets = jnp.asarray(ref[f"listmle{case}_targets"], jnp.float64)
        value, grad = jax.jit(jax.value_and_grad(lambda s: list_mle(s, targets)))(scores)
        assert value.dtype == jnp.float64
    assert rel_err(value, ref[f"listmle{case}_loss"]) < 1e-12
    assert rel_err(grad, ref[f"listmle{case}_grad_scores"]) < 1e-10
    value32, grad32 = jax.jit(jax.value_and_grad(lambda s: list_mle(s, jnp.asarray(targets, jnp.float32))))(
        jnp.asarray(scores, jnp.float32)
    )
    assert rel_err(value32, ref[f"listmle{case}_loss"]) < 1e-5
    assert rel_err(grad32, ref[f"listmle{case}_grad_scores"]) < 1e-4


@pytest.mark.parametrize("epoch", OFFICIAL_EPOCHS)
@pytest.mark.parametrize("mesh_name", [None, "data8"])
def test_clip_plus_rankclip_matches_official(reference_dir, epoch, mesh_name):
    """clip + rankclip (defaults, random ties on) equal the official get_loss at epochs 1, 10, 40, 64.

    The step form of the epoch ramp: step e−1 of total_steps E−1 has progress (e−1)/(E−1). N = 12, so
    the 8-way sharded form also pads to 16 rows.
    """
    ref = np.load(reference_dir / "rankclip_official.npz")
    epochs = int(ref["full_epochs"])
    mesh = make_mesh(MESHES[mesh_name]) if mesh_name else None
    with jax.enable_x64(True):
        args = [jnp.asarray(ref[f"full_{k}"], jnp.float64) for k in ("image_features", "text_features", "log_scale")]
        value, metrics, grads = _objective(
            *args, step=epoch - 1, total_steps=epochs - 1, mesh=mesh, rng=jax.random.key(epoch)
        )
        assert value.dtype == jnp.float64
    prefix = f"full_e{epoch}"
    assert rel_err(value, ref[f"{prefix}_loss"]) < 1e-12
    assert rel_err(metrics["loss/clip"], ref[f"{prefix}_contrastive"]) < 1e-12
    if epoch == 1:
        assert float(metrics["loss/rankclip"]) == 0.0 == float(ref[f"{prefix}_rank"])
    else:
        assert rel_err(metrics["loss/rankclip"], ref[f"{prefix}_rank"]) < 1e-12
    assert rel_err(metrics["rankclip/weight"], min(2.0, 3.0 * (epoch - 1) / (epochs - 1))) < 1e-6
    for grad, key in zip(grads, ("image", "text", "log_scale")):
        assert rel_err(grad, ref[f"{prefix}_grad_{key}"]) < 1e-10, key


def test_official_objective_needs_the_in_modal_term(reference_dir):
    """The reference has both rank terms on: cross-modal alone is about half of full_e64_rank."""
    ref = np.load(reference_dir / "rankclip_official.npz")
    with jax.enable_x64(True):
        args = [jnp.asarray(ref[f"full_{k}"], jnp.float64) for k in ("image_features", "text_features", "log_scale")]
        _, metrics, _ = _objective(*args, step=63, total_steps=63, random_ties=False, in_modal=False)
    assert rel_err(metrics["loss/rankclip"], ref["full_e64_rank"]) > 0.1


# --- (b) float64 NumPy loops ------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 1e-10])
@pytest.mark.parametrize("position_weight", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_list_mle_matches_numpy_loop(eps, position_weight, masked):
    rng = np.random.default_rng(7)
    scores, targets = 8.0 * rng.normal(size=(2, 7, 9))
    row_mask = np.array([1, 0, 1, 1, 1, 0, 1], bool) if masked else None
    col_mask = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1], bool) if masked else None
    expected = numpy_list_mle(scores, targets, eps, position_weight, row_mask, col_mask)
    fn = jax.jit(lambda s, t: list_mle(s, t, eps=eps, position_weight=position_weight, row_mask=row_mask, col_mask=col_mask))
    with jax.enable_x64(True):
        value64 = fn(jnp.asarray(scores), jnp.asarray(targets))
    assert rel_err(value64, expected) < 1e-12
    value32 = fn(jnp.asarray(scores, jnp.float32), jnp.asarray(targets, jnp.float32))
    assert value32.dtype == jnp.float32
    assert rel_err(value32, expected) < 1e-5


@pytest.mark.parametrize("eps,position_weight,in_modal", [(0.0, False, True), (1e-10, True, True), (0.0, True, False)])
def test_rank_terms_match_numpy_loop(eps, position_weight, in_modal):
    x, y = random_features(3, 10, 6, np.float64)
    expected_cross, expected_in = numpy_rank_terms(x, y, 2.9, eps, position_weight)
    with jax.enable_x64(True):
        cross, inmodal = jax.jit(
            lambda x, y: rankclip_losses(_normalise(x), _normalise(y), 2.9, eps=eps, position_weight=position_weight, in_modal=in_modal)
        )(jnp.asarray(x), jnp.asarray(y))
    assert rel_err(cross, expected_cross) < 1e-12
    if in_modal:
        assert rel_err(inmodal, expected_in) < 1e-12
    else:
        assert float(inmodal) == 0.0


# --- (c) finite differences -------------------------------------------------------------------------


def _central_differences(fn, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[index] += h
        down[index] -= h
        grad[index] = (fn(up) - fn(down)) / (2 * h)
    return grad


@pytest.mark.parametrize("eps,position_weight", [(0.0, False), (1e-10, False), (0.0, True)])
def test_list_mle_gradient_matches_finite_differences(eps, position_weight):
    rng = np.random.default_rng(11)
    scores, targets = 3.0 * rng.normal(size=(2, 4, 5))
    col_mask = np.array([1, 1, 1, 0, 1], bool)
    with jax.enable_x64(True):
        fn = jax.jit(lambda s: list_mle(s, jnp.asarray(targets), eps=eps, position_weight=position_weight, col_mask=col_mask))
        grad = np.asarray(jax.grad(fn)(jnp.asarray(scores)))
        numeric = _central_differences(lambda s: float(fn(jnp.asarray(s))), scores)
    assert rel_err(grad, numeric) < 1e-7
    assert np.all(grad[:, 3] == 0.0)  # the masked column


def test_rank_term_gradient_matches_finite_differences():
    """d(rank term)/d(raw features, log scale) equals central differences (the orders stay fixed)."""
    x, y = random_features(12, 5, 3, np.float64)
    t = np.array(2.2)
    ctx = LossContext(step=1, total_steps=3)
    config = {"rankclip": {"random_ties": False, "eps": 0.0}}

    def loss(x, y, t):
        outputs = {"image_embeddings": _normalise(x), "text_embeddings": _normalise(y), "logit_scale": t}
        return total_loss(outputs, {}, ctx, config)[0]

    with jax.enable_x64(True):
        value = jax.jit(loss)
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, y, t)
        numeric = [
            _central_differences(lambda v: float(value(v, y, t)), x),
            _central_differences(lambda v: float(value(x, v, t)), y),
            _central_differences(lambda v: float(value(x, y, v)), t),
        ]
    for grad, expected in zip(grads, numeric):
        assert rel_err(grad, expected) < 1e-6


# --- (d) sharded == unsharded -----------------------------------------------------------------------


@pytest.mark.parametrize("mesh_name,n,duplicates", [("data8", 24, True), ("data4_fsdp2", 24, True), ("data8", 13, False)])
def test_sharded_equals_unsharded(mesh_name, n, duplicates):
    """Values and gradients of clip + rankclip (random ties on) sharded over the batch axes equal one device.

    With duplicated rows the targets hold exact ties, so this also checks that every device draws the
    same column permutation for the tie-breaking; N = 13 exercises the padding to a multiple of 8.
    """
    mesh = make_mesh(MESHES[mesh_name])
    x, y = random_features(2, n, 8)
    if duplicates:
        x[1::3], y[1::3] = x[0::3][: len(x[1::3])], y[0::3][: len(y[1::3])]
    t = jnp.float32(2.6)
    key = jax.random.key(5)
    expected_value, expected_metrics, expected_grads = _objective(x, y, t, rng=key)
    if n % 8 == 0:
        sharding = NamedSharding(mesh, batch_spec(2))
        x, y = jax.device_put(x, sharding), jax.device_put(y, sharding)
    value, metrics, grads = _objective(x, y, t, rng=key, mesh=mesh)
    assert rel_err(value, expected_value) < 1e-6
    for name in ("loss/rankclip", "rankclip/cross", "rankclip/in_modal"):
        assert rel_err(metrics[name], expected_metrics[name]) < 1e-6, name
    for grad, expected in zip(grads, expected_grads):
        assert rel_err(grad, expected) < 1e-5


# --- (e) ties, degenerate batches, large scale, masking ---------------------------------------------


def test_random_ties_are_unbiased():
    """With tied targets, the mean over independent tie-breaking keys equals the average over every
    tie-consistent order (enumerated here); without a key ties go by column index."""
    scores = np.array([0.3, -0.5, 1.2, 0.1, 2.0])
    targets = np.array([2.0, 1.0, 1.0, 1.0, 0.0])  # three-way tie in the middle
    losses = [numpy_list_mle(scores[None, [0, *m, 4]], -np.arange(5.0)[None, :]) for m in itertools.permutations([1, 2, 3])]
    by_index = numpy_list_mle(scores[None], targets[None])
    draws = 20_000
    with jax.enable_x64(True):
        s, t = jnp.asarray(scores[None]), jnp.asarray(targets[None])
        per_key = jax.jit(jax.vmap(lambda key: list_mle(s, t, eps=0.0, tie_key=key)))(jax.random.split(jax.random.key(0), draws))
        deterministic = float(list_mle(s, t, eps=0.0))
    per_key = np.asarray(per_key)
    assert np.all(np.isfinite(per_key))
    assert np.all(np.min(np.abs(per_key[:, None] - np.array(losses)[None, :]), axis=1) < 1e-12)  # always one of the orders
    assert abs(per_key.mean() - np.mean(losses)) < 5 * np.std(losses) / math.sqrt(draws)
    assert abs(deterministic - by_index) < 1e-12


@pytest.mark.parametrize("random_ties", [False, True])
def test_identical_embeddings_are_finite(random_ties):
    """All rows equal: every score ties, each list's likelihood is Σ_m log(ε + m) (any order gives it)."""
    n = 6
    x = np.tile(np.array([[0.3, -1.0, 0.5, 2.0]], np.float32), (n, 1))
    y = np.tile(np.array([[1.0, 0.2, -0.4, 0.1]], np.float32), (n, 1))
    values = []
    for seed in (0, 1):
        value, metrics, grads = _objective(x, y, jnp.float32(2.659), step=3, rng=jax.random.key(seed), random_ties=random_ties)
        assert np.isfinite(float(value)) and all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
        values.append(float(value))
        per_list = sum(math.log(1e-10 + m) for m in range(1, n + 1))
        assert rel_err(metrics["rankclip/cross"], 2 * per_list) < 1e-5
        assert rel_err(metrics["rankclip/in_modal"], 2 * per_list) < 1e-5
    assert abs(values[0] - values[1]) <= 1e-6 * abs(values[0])


@pytest.mark.parametrize("n", [1, 2])
def test_tiny_batches(n):
    x, y = random_features(8, n, 4, np.float64)
    expected_cross, expected_in = numpy_rank_terms(x, y, 2.659, eps=1e-10)
    value, metrics, grads = _objective(x.astype(np.float32), y.astype(np.float32), jnp.float32(2.659), step=3, rng=jax.random.key(0))
    assert np.isfinite(float(value)) and all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    assert abs(float(metrics["rankclip/cross"]) - expected_cross) <= 1e-5 * max(abs(expected_cross), 1e-3)
    assert abs(float(metrics["rankclip/in_modal"]) - expected_in) <= 1e-5 * max(abs(expected_in), 1e-3)


@pytest.mark.parametrize("eps", [0.0, 1e-10])
@pytest.mark.parametrize("mesh_name", [None, "data8"])
def test_logit_scale_100_is_finite(eps, mesh_name):
    """At s = 100 the tail sums underflow float32; the loss stays finite and matches float64 loops."""
    mesh = make_mesh(MESHES[mesh_name]) if mesh_name else None
    x, y = random_features(6, 16, 8)
    t = math.log(100.0)
    value, metrics, grads = _objective(x, y, jnp.float32(t), step=3, mesh=mesh, rng=jax.random.key(0), eps=eps)
    assert np.isfinite(float(value)) and all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    expected_cross, expected_in = numpy_rank_terms(x, y, t, eps=eps)
    assert rel_err(metrics["rankclip/cross"], expected_cross) < 1e-5
    assert rel_err(metrics["rankclip/in_modal"], expected_in) < 1e-5


@pytest.mark.parametrize("mesh_name", [None, "data8"])
def test_padding_rows_have_no_effect(mesh_name):
    """Loss and gradients with padding rows masked equal those of the valid rows alone; padding gets 0."""
    mesh = make_mesh(MESHES[mesh_name]) if mesh_name else None
    x, y = random_features(4, 13, 8)
    mask = np.ones(13, bool)
    mask[[0, 5, 6, 11, 12]] = False
    x[~mask] *= 50.0  # garbage in the padding rows
    key = jax.random.key(3)
    valid_value, valid_metrics, valid_grads = _objective(x[mask], y[mask], jnp.float32(2.5), rng=key)
    value, metrics, grads = _objective(x, y, jnp.float32(2.5), rng=key, mask=jnp.asarray(mask), mesh=mesh)
    assert rel_err(value, valid_value) < 1e-6
    assert rel_err(metrics["loss/rankclip"], valid_metrics["loss/rankclip"]) < 1e-6
    for grad, valid_grad in zip(grads[:2], valid_grads[:2]):
        assert rel_err(np.asarray(grad)[mask], valid_grad) < 1e-5
        assert np.all(np.asarray(grad)[~mask] == 0.0)
    assert rel_err(grads[2], valid_grads[2]) < 1e-5


def test_all_rows_masked_is_zero_and_finite():
    x, y = random_features(5, 8, 4)
    for mesh in (None, make_mesh(MESHES["data8"])):
        value, _, grads = _objective(x, y, jnp.float32(2.0), clip=False, mask=jnp.zeros(8, bool), mesh=mesh, rng=jax.random.key(0))
        assert float(value) == 0.0
        assert all(bool(jnp.all(g == 0.0)) for g in grads)


# --- (f) ramp and configuration ---------------------------------------------------------------------


def test_ramp_weight():
    """0 at step 0, the cap 2 at the end, and the official clip(3(e−1)/(E−1), 0, 2) at progress (e−1)/(E−1)."""
    total = 6300
    assert float(ramp_weight(0, total)) == 0.0
    assert float(ramp_weight(total, total)) == 2.0
    assert float(ramp_weight(total - 1, total)) == 2.0
    for epoch in OFFICIAL_EPOCHS:
        official = min(2.0, max(0.0, 3.0 * (epoch - 1) / 63))
        assert abs(float(ramp_weight((epoch - 1) * total // 63, total)) - official) < 1e-6
    assert float(ramp_weight(total // 2, total, rate=1.0, maximum=3.0)) == 0.5


def test_term_weight_metric_and_errors():
    x, y = random_features(9, 8, 4)
    for step, expected in ((0, 0.0), (100, 2.0)):
        value, metrics, _ = _objective(x, y, jnp.float32(2.0), clip=False, step=step, total_steps=100, rng=jax.random.key(0))
        assert float(metrics["rankclip/weight"]) == expected
        assert float(metrics["rankclip/cross"]) > 0.0
        if expected == 0.0:
            assert float(value) == 0.0
    with pytest.raises(ValueError, match="does not take"):
        validate_terms_config({"rankclip": {"weight": 1.0, "inmodal": True}})
    with pytest.raises(ValueError, match="ctx.rng"):
        _objective(x, y, jnp.float32(2.0), rng=None)
    with pytest.raises(ValueError, match="cross_modal or in_modal"):
        _objective(x, y, jnp.float32(2.0), rng=jax.random.key(0), cross_modal=False, in_modal=False)


# --- (g) per-device memory --------------------------------------------------------------------------


def _temp_bytes(n_rows: int, d: int, mesh) -> int:
    def loss(x, y, t):
        cross, inmodal = rankclip_losses(x, y, t, tie_key=jax.random.key(0), mesh=mesh)
        return cross + inmodal

    return fwd_bwd_temp_bytes(loss, n_rows, d, mesh)


def test_sharded_memory_grows_like_n_times_N():
    """At fixed local n, per-device temp memory of fwd+bwd grows linearly in N and stays below N² floats."""
    n, d = 32, 16
    temps = {}
    for devices in (2, 8):
        mesh = make_mesh({"data": devices}, devices=jax.devices()[:devices])
        temps[devices] = _temp_bytes(n * devices, d, mesh)
        print(f"\nrankclip fwd+bwd, {devices} devices, N={n * devices}, n={n}: temp {temps[devices]} bytes "
              f"= {temps[devices] / (n * n * devices * 4):.1f} x n*N floats")
    one_device = _temp_bytes(8 * n, d, None)
    print(f"rankclip fwd+bwd, 1 device, N={8 * n}: temp {one_device} bytes")
    assert temps[8] <= 1.25 * 4 * temps[2]
    assert temps[8] < 0.3 * one_device


# --- (h) composition with other terms ---------------------------------------------------------------


def test_siglip_plus_rankclip_is_the_weighted_sum_with_every_terms_metrics():
    """Terms combine freely: SigLIP + 0.5·RankCLIP is their weighted sum (the rank part checked against the
    NumPy loops), and the metrics carry each term's value and the ramp weight."""
    from jclip.losses import siglip_loss

    x, y = (v / np.linalg.norm(v, axis=1, keepdims=True) for v in random_features(21, 12, 5))
    log_scale, bias, step, total_steps = 1.7, -4.0, 30, 60
    outputs = {"image_embeddings": jnp.asarray(x), "text_embeddings": jnp.asarray(y),
               "logit_scale": jnp.float32(log_scale), "logit_bias": jnp.float32(bias)}
    config = {"siglip": {"weight": 1.0, "ring": False},
              "rankclip": {"weight": 0.5, "random_ties": False}}
    ctx = LossContext(step=jnp.int32(step), total_steps=total_steps, rng=jax.random.key(0))
    loss, metrics = jax.jit(lambda o: total_loss(o, {}, ctx, config))(outputs)

    cross, inmodal = numpy_rank_terms(x.astype(np.float64), y.astype(np.float64), log_scale, eps=1e-10)
    ramp = min(3.0 * step / total_steps, 2.0)
    rank_expected = ramp * (cross + inmodal) / (32.0 * len(x))
    siglip_expected = float(siglip_loss(outputs["image_embeddings"], outputs["text_embeddings"],
                                        outputs["logit_scale"], outputs["logit_bias"]))
    assert rel_err(metrics["loss/rankclip"], rank_expected) < 1e-5
    assert rel_err(metrics["loss/siglip"], siglip_expected) < 1e-6
    assert rel_err(loss, siglip_expected + 0.5 * rank_expected) < 1e-5
    assert float(metrics["rankclip/weight"]) == pytest.approx(ramp)
    assert rel_err(metrics["rankclip/cross"], cross) < 1e-5 and rel_err(metrics["rankclip/in_modal"], inmodal) < 1e-5
