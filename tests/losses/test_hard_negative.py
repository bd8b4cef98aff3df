"""Tests of jclip.losses.hard_negative: FSC-CLIP's global_hn and local_hn (with SCR) and NegCLIP.

Against the official FSC-CLIP code's numbers (shared/reference/fscclip_official.npz), against float64 NumPy
loops written here from shared/METHODS.md section 4 (missing negatives, rows without negatives, K_v in the
smoothed labels, padding), central finite differences of those loops, plain cross-entropy at γ = β = 0,
NegCLIP = CLIP without valid negatives, and 8 fake CPU devices (with padding) against one.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jclip.losses import LossContext, TERMS, clip_loss, term_reads, total_loss
from jclip.losses.hard_negative import global_hn_parts, local_hn_parts, negclip_loss
from jclip.parallel import make_mesh
from jclip_testing import rel_err

MESHES = {"data8": {"data": 8}, "data4_fsdp2": {"data": 4, "fsdp": 2}}
REFERENCE_INPUTS = ("image_features", "pos_text_features", "neg_text_features", "image_tokens", "pos_text_tokens",
                    "neg_text_tokens", "log_scale")


def _normalise(v: jax.Array) -> jax.Array:
    return v / jnp.linalg.norm(v, axis=-1, keepdims=True)


# --- random inputs ----------------------------------------------------------------------------------


def make_inputs(seed: int, n: int = 7, k: int = 3, patches: int = 5, length: int = 6, d: int = 8) -> dict:
    """Raw (unnormalised) float64 inputs in the model contract's layout, with missing negatives.

    Row 1 has no valid negative and the others have K_v from 1 to K. Token masks run from the start token
    (position 0) to the end token; missing negatives hold large garbage.
    """
    rng = np.random.default_rng(seed)
    negative_mask = rng.random((n, k)) < 0.6
    negative_mask[0] = True
    negative_mask[1] = False
    negative_mask[2] = [True] + [False] * (k - 1)
    lengths = rng.integers(2, length + 1, size=(n, 1 + k))
    token_mask = np.arange(length)[None, None, :] < lengths[..., None]
    inputs = {
        "images": rng.normal(size=(n, d)),
        "texts": rng.normal(size=(n, d)),
        "negatives": rng.normal(size=(n, k, d)),
        "image_tokens": rng.normal(size=(n, patches, d)),
        "text_tokens": rng.normal(size=(n, length, d)),
        "negative_tokens": rng.normal(size=(n, k, length, d)),
        "text_token_mask": token_mask[:, 0],
        "negative_token_mask": token_mask[:, 1:],
        "negative_mask": negative_mask,
        "log_scale": np.float64(2.3),
    }
    inputs["negatives"][~negative_mask] *= 40.0
    inputs["negative_tokens"][~negative_mask] *= 40.0
    return inputs


# --- independent float64 NumPy references: explicit loops -------------------------------------------


def _np_unit(v) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v / math.sqrt(float(np.dot(v, v)))


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def numpy_scr(logits: list[float], valid: list[bool], gamma: float, beta: float) -> float:
    """Σ_k q_k·(1 − p_k)^γ·(−log p_k) for one row; missing negatives get logit 0 and no label."""
    row = [logits[0]] + [z if ok else 0.0 for z, ok in zip(logits[1:], valid)]
    log_norm = _logsumexp(row)
    k_valid = sum(valid)
    labels = [(1 - beta) + beta / (1 + k_valid)] + [beta / (1 + k_valid) if ok else 0.0 for ok in valid]
    total = 0.0
    for label, z in zip(labels, row):
        log_p = z - log_norm
        total += label * (1.0 - math.exp(log_p)) ** gamma * (-log_p)
    return total


def _np_mean_over_rows(row_logits, negative_mask, mask, gamma, beta) -> float:
    losses = [numpy_scr(row_logits[i], list(negative_mask[i]), gamma, beta)
              for i in range(len(row_logits)) if (mask is None or mask[i]) and any(negative_mask[i])]
    return sum(losses) / max(len(losses), 1)


def numpy_global_hn(inp: dict, *, gamma=2.0, beta=0.02, mask=None) -> float:
    """METHODS.md §4 global HN: (1+K)-way logits s·⟨x_i, caption⟩ of the L2-normalised raw features."""
    s = math.exp(float(inp["log_scale"]))
    rows = []
    for i in range(len(inp["images"])):
        x = _np_unit(inp["images"][i])
        captions = [inp["texts"][i]] + list(inp["negatives"][i])
        rows.append([s * float(np.dot(x, _np_unit(c))) for c in captions])
    return _np_mean_over_rows(rows, inp["negative_mask"], mask, gamma, beta)


def numpy_local_score(patches, tokens, token_mask, s, *, skip_start=True, attention="minmax",
                      attention_patches=None, attention_tokens=None) -> float:
    """logsumexp over valid tokens w of s·cos(Σ_p a_wp v_p, t_w), by loops.

    The attention a comes from `attention_patches` / `attention_tokens` when given (frozen at other
    inputs: the loss treats it as a constant, so finite differences must too).
    """
    attention_patches = patches if attention_patches is None else attention_patches
    attention_tokens = tokens if attention_tokens is None else attention_tokens
    scores = []
    for w in range(len(tokens)):
        if not token_mask[w] or (skip_start and w == 0):
            continue
        sims = [float(np.dot(attention_tokens[w], v)) for v in attention_patches]
        if attention == "minmax":
            weights = [(q - min(sims)) / (max(sims) - min(sims)) for q in sims]
        else:
            weights = [math.exp(q - max(sims)) for q in sims]
        weights = [a / sum(weights) for a in weights]
        pooled = sum(a * np.asarray(v, np.float64) for a, v in zip(weights, patches))
        scores.append(s * float(np.dot(_np_unit(pooled), _np_unit(tokens[w]))))
    return _logsumexp(scores)


def numpy_local_hn(inp: dict, *, gamma=2.0, beta=0.02, mask=None, skip_start=True, attention="minmax",
                   frozen: dict | None = None) -> float:
    """METHODS.md §4 local HN with SCR; `frozen` (inputs of the same shapes) fixes the attention."""
    s = math.exp(float(inp["log_scale"]))
    att = inp if frozen is None else frozen
    rows = []
    for i in range(len(inp["images"])):
        captions = [(inp["text_tokens"][i], inp["text_token_mask"][i], att["text_tokens"][i])]
        captions += [(inp["negative_tokens"][i, j], inp["negative_token_mask"][i, j], att["negative_tokens"][i, j])
                     for j in range(inp["negative_mask"].shape[1])]
        row = []
        for j, (tokens, token_mask, attention_tokens) in enumerate(captions):
            if j > 0 and not inp["negative_mask"][i, j - 1]:
                row.append(0.0)  # ignored by numpy_scr
                continue
            row.append(numpy_local_score(inp["image_tokens"][i], tokens, token_mask, s, skip_start=skip_start,
                                         attention=attention, attention_patches=att["image_tokens"][i],
                                         attention_tokens=attention_tokens))
        rows.append(row)
    return _np_mean_over_rows(rows, inp["negative_mask"], mask, gamma, beta)


def numpy_negclip(inp: dict, *, mask=None) -> float:
    """½[image→(positives ∪ valid negatives of the batch) + text→images] over valid rows, by loops."""
    s = math.exp(float(inp["log_scale"]))
    n, k = inp["negative_mask"].shape
    valid = [i for i in range(n) if mask is None or mask[i]]
    x = {i: _np_unit(inp["images"][i]) for i in valid}
    y = {i: _np_unit(inp["texts"][i]) for i in valid}
    negatives = [_np_unit(inp["negatives"][i, j]) for i in valid for j in range(k) if inp["negative_mask"][i, j]]
    total = 0.0
    for i in valid:
        row = [s * float(np.dot(x[i], y[j])) for j in valid] + [s * float(np.dot(x[i], c)) for c in negatives]
        total += _logsumexp(row) - s * float(np.dot(x[i], y[i]))
        column = [s * float(np.dot(y[i], x[j])) for j in valid]
        total += _logsumexp(column) - s * float(np.dot(y[i], x[i]))
    return total / (2 * len(valid))


# --- the JAX losses as functions of the raw inputs --------------------------------------------------

DIFFERENTIABLE = ("images", "texts", "negatives", "image_tokens", "text_tokens", "negative_tokens", "log_scale")


def jax_loss(kind: str, inp: dict, *, mask=None, mesh=None, **knobs):
    """f(*DIFFERENTIABLE raw arrays) -> loss; features are L2-normalised first (tokens are not)."""
    negative_mask = jnp.asarray(inp["negative_mask"])
    text_token_mask, negative_token_mask = jnp.asarray(inp["text_token_mask"]), jnp.asarray(inp["negative_token_mask"])

    def loss(images, texts, negatives, image_tokens, text_tokens, negative_tokens, log_scale):
        if kind == "global_hn":
            return global_hn_parts(_normalise(images), _normalise(texts), _normalise(negatives), negative_mask,
                                   log_scale, mask=mask, mesh=mesh, **knobs)[0]
        if kind == "local_hn":
            return local_hn_parts(image_tokens, text_tokens, text_token_mask, negative_tokens, negative_token_mask,
                                  negative_mask, log_scale, mask=mask, mesh=mesh, **knobs)[0]
        return negclip_loss(_normalise(images), _normalise(texts), _normalise(negatives), negative_mask, log_scale,
                            mask=mask, mesh=mesh, **knobs)

    return loss


def value_and_grads(kind: str, inp: dict, dtype=jnp.float64, **kwargs):
    args = [jnp.asarray(inp[name], dtype) for name in DIFFERENTIABLE]
    return jax.jit(jax.value_and_grad(jax_loss(kind, inp, **kwargs), argnums=tuple(range(len(args)))))(*args)


NUMPY_LOSSES = {"global_hn": numpy_global_hn, "local_hn": numpy_local_hn, "negclip": numpy_negclip}


# --- (a) the official FSC-CLIP code's numbers -------------------------------------------------------


def _reference_inputs(ref) -> dict:
    return {
        "images": ref["image_features"], "texts": ref["pos_text_features"], "negatives": ref["neg_text_features"],
        "image_tokens": ref["image_tokens"], "text_tokens": ref["pos_text_tokens"],
        "negative_tokens": ref["neg_text_tokens"], "text_token_mask": ref["pos_token_mask"] > 0,
        "negative_token_mask": ref["neg_token_mask"] > 0, "negative_mask": ref["neg_mask"] > 0,
        "log_scale": ref["log_scale"],
    }


@pytest.mark.parametrize("mesh_name", [None, "data8"])
@pytest.mark.parametrize("kind", ["global_hn", "local_hn"])
def test_matches_official_fscclip(reference_dir, kind, mesh_name):
    """Loss and every gradient (wrt the raw inputs) equal the official code's, γ = 2, β = 0.02.

    The residual (about 1.5e-8 relative) is the official float32 smoothed labels; rounding our labels to
    float32 as well leaves about 1e-15. On 8 devices the 6 rows are padded to 8.
    """
    ref = np.load(reference_dir / "fscclip_official.npz")
    mesh = make_mesh(MESHES[mesh_name]) if mesh_name else None
    with jax.enable_x64(True):
        value, grads = value_and_grads(kind, _reference_inputs(ref), mesh=mesh)
        assert value.dtype == jnp.float64
    assert rel_err(value, ref[f"{kind}_loss"]) < 1e-7
    for grad, name in zip(grads, REFERENCE_INPUTS):
        expected = ref[f"{kind}_grad_{name}"]
        assert rel_err(grad, expected) < 1e-7 if np.any(expected) else np.all(np.asarray(grad) == 0.0), name


def test_clip_matches_official_fscclip(reference_dir):
    """jclip's `clip_loss` is the official code's CLIP part (features normalised first)."""
    ref = np.load(reference_dir / "fscclip_official.npz")
    with jax.enable_x64(True):
        loss = lambda x, y, t: clip_loss(_normalise(x), _normalise(y), t)  # noqa: E731
        args = [jnp.asarray(ref[k]) for k in ("image_features", "pos_text_features", "log_scale")]
        value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(*args)
    assert rel_err(value, ref["clip_loss"]) < 1e-12
    for grad, name in zip(grads, ("image_features", "pos_text_features", "log_scale")):
        assert rel_err(grad, ref[f"clip_grad_{name}"]) < 1e-12, name


# --- (b) independent float64 NumPy loops ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["global_hn", "local_hn", "negclip"])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_numpy_loops(kind, masked):
    """Missing negatives (garbage), a row without negatives, K_v from 1 to K, padding rows; float64 and 32."""
    inp = make_inputs(0)
    mask = np.array([1, 1, 0, 1, 1, 0, 1], bool) if masked else None
    expected = NUMPY_LOSSES[kind](inp, mask=mask)
    with jax.enable_x64(True):
        value64, _ = value_and_grads(kind, inp, mask=mask)
    assert rel_err(value64, expected) < 1e-12
    value32, _ = value_and_grads(kind, inp, jnp.float32, mask=mask)
    assert value32.dtype == jnp.float32
    assert rel_err(value32, expected) < 2e-5


@pytest.mark.parametrize("kind", ["global_hn", "local_hn"])
@pytest.mark.parametrize("gamma,beta", [(0.0, 0.0), (0.0, 0.1), (1.5, 0.0), (3.0, 0.3)])
def test_scr_knobs_match_numpy_loops(kind, gamma, beta):
    inp = make_inputs(1)
    with jax.enable_x64(True):
        value, _ = value_and_grads(kind, inp, gamma=gamma, beta=beta)
    assert rel_err(value, NUMPY_LOSSES[kind](inp, gamma=gamma, beta=beta)) < 1e-12


@pytest.mark.parametrize("skip_start,attention", [(False, "minmax"), (True, "softmax")])
def test_local_hn_knobs_match_numpy_loops(skip_start, attention):
    inp = make_inputs(2)
    with jax.enable_x64(True):
        value, _ = value_and_grads("local_hn", inp, skip_start_token=skip_start, attention=attention)
    assert rel_err(value, numpy_local_hn(inp, skip_start=skip_start, attention=attention)) < 1e-12


@pytest.mark.parametrize("kind", ["global_hn", "local_hn"])
def test_gamma_beta_zero_is_plain_cross_entropy(kind):
    """Without SCR: mean over the counted rows of −log softmax(logits)[0], missing negatives at logit 0."""
    inp = make_inputs(3)
    with jax.enable_x64(True):
        value, _ = value_and_grads(kind, inp, gamma=0.0, beta=0.0)
        args = [jnp.asarray(inp[name]) for name in DIFFERENTIABLE]
        if kind == "global_hn":
            captions = jnp.concatenate([_normalise(args[1])[:, None], _normalise(args[2])], axis=1)
            logits = jnp.exp(args[6]) * jnp.einsum("nd,nkd->nk", _normalise(args[0]), captions)
        else:  # the scores from the NumPy loops
            s = math.exp(float(inp["log_scale"]))
            logits = jnp.asarray([
                [numpy_local_score(inp["image_tokens"][i], t, m, s) for t, m in
                 [(inp["text_tokens"][i], inp["text_token_mask"][i])]
                 + list(zip(inp["negative_tokens"][i], inp["negative_token_mask"][i]))]
                for i in range(len(inp["images"]))])
        valid = jnp.asarray(inp["negative_mask"])
        logits = logits.at[:, 1:].set(jnp.where(valid, logits[:, 1:], 0.0))
        rows = -jax.nn.log_softmax(logits, axis=-1)[:, 0]
        counted = jnp.any(valid, axis=-1)
        expected = jnp.sum(jnp.where(counted, rows, 0.0)) / jnp.sum(counted)
    assert rel_err(value, expected) < 1e-13


# --- (c) gradients by central finite differences of the NumPy loops ---------------------------------


def _directional_fd(kind: str, inp: dict, direction: dict, h: float = 1e-5) -> float:
    """(f(x + h·u) − f(x − h·u)) / 2h of the NumPy loop; the local attention stays frozen at x."""

    def at(sign: float) -> float:
        moved = dict(inp)
        for name in DIFFERENTIABLE:
            moved[name] = np.asarray(inp[name], np.float64) + sign * h * direction[name]
        if kind == "local_hn":
            return numpy_local_hn(moved, frozen=inp)
        return NUMPY_LOSSES[kind](moved)

    return (at(1.0) - at(-1.0)) / (2 * h)


@pytest.mark.parametrize("kind", ["global_hn", "local_hn", "negclip"])
def test_gradients_match_finite_differences(kind):
    """⟨∇L, u⟩ equals the central difference along 3 random directions u over every raw input."""
    inp = make_inputs(5, n=5)
    with jax.enable_x64(True):
        _, grads = value_and_grads(kind, inp)
    rng = np.random.default_rng(6)
    for _ in range(3):
        direction = {name: rng.normal(size=np.shape(inp[name])) for name in DIFFERENTIABLE}
        analytic = sum(float(np.sum(np.asarray(g) * direction[name])) for g, name in zip(grads, DIFFERENTIABLE))
        numeric = _directional_fd(kind, inp, direction)
        assert abs(analytic - numeric) < 1e-7 * max(abs(numeric), 1.0), (analytic, numeric)


@pytest.mark.parametrize("kind", ["global_hn", "local_hn", "negclip"])
def test_missing_negatives_and_padding_get_no_gradient(kind):
    inp = make_inputs(7)
    mask = np.array([1, 1, 1, 0, 1, 1, 1], bool)
    with jax.enable_x64(True):
        _, grads = value_and_grads(kind, inp, mask=mask)
    grads = dict(zip(DIFFERENTIABLE, (np.asarray(g) for g in grads)))
    ignored = ~inp["negative_mask"] | ~mask[:, None]
    assert np.all(grads["negatives"][ignored] == 0.0) and np.all(grads["negative_tokens"][ignored] == 0.0)
    for name in ("images", "texts", "image_tokens", "text_tokens"):
        assert np.all(grads[name][~mask] == 0.0), name
    if kind != "negclip":  # a row without a negative is dropped (negclip still uses it)
        assert np.all(grads["images"][1] == 0.0) and np.all(grads["image_tokens"][1] == 0.0)


# --- (d) NegCLIP = CLIP without negatives -----------------------------------------------------------


@pytest.mark.parametrize("mesh_name", [None, "data8"])
def test_negclip_equals_clip_without_valid_negatives(mesh_name):
    inp = make_inputs(8)
    inp["negative_mask"] = np.zeros_like(inp["negative_mask"])
    mask = np.array([1, 1, 0, 1, 1, 1, 1], bool)
    mesh = make_mesh(MESHES[mesh_name]) if mesh_name else None
    with jax.enable_x64(True):
        value, grads = value_and_grads("negclip", inp, mask=mask, mesh=mesh)
        clip = lambda x, y, t: clip_loss(_normalise(x), _normalise(y), t, mask=mask, mesh=mesh)  # noqa: E731
        expected, expected_grads = jax.value_and_grad(clip, argnums=(0, 1, 2))(
            *(jnp.asarray(inp[k]) for k in ("images", "texts", "log_scale")))
    assert rel_err(value, expected) < 1e-14
    for grad, expected_grad in zip((grads[0], grads[1], grads[6]), expected_grads):
        assert rel_err(grad, expected_grad) < 1e-13
    assert np.all(np.asarray(grads[2]) == 0.0)


# --- (e) sharded == unsharded -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["global_hn", "local_hn", "negclip"])
@pytest.mark.parametrize("mesh_name", ["data8", "data4_fsdp2"])
def test_sharded_equals_unsharded_with_padding(kind, mesh_name):
    """13 rows (not a multiple of 8, with 3 padding rows) on 8 devices: the value and all gradients."""
    inp = make_inputs(9, n=13)
    mask = np.ones(13, bool)
    mask[[0, 6, 12]] = False
    mesh = make_mesh(MESHES[mesh_name])
    with jax.enable_x64(True):
        expected, expected_grads = value_and_grads(kind, inp, mask=mask)
        value, grads = value_and_grads(kind, inp, mask=mask, mesh=mesh)
    assert rel_err(value, expected) < 1e-13
    for grad, expected_grad, name in zip(grads, expected_grads, DIFFERENTIABLE):
        grad, expected_grad = np.asarray(grad), np.asarray(expected_grad)
        assert rel_err(grad, expected_grad) < 1e-12 if np.any(expected_grad) else np.all(grad == 0.0), name
    value32, _ = value_and_grads(kind, inp, jnp.float32, mask=mask, mesh=mesh)
    assert value32.dtype == jnp.float32 and rel_err(value32, expected) < 2e-5


# --- (f) the registered terms -----------------------------------------------------------------------


def _outputs_and_batch(inp: dict, prefix: str = "negative") -> tuple[dict, dict]:
    outputs = {
        "image_embeddings": _normalise(jnp.asarray(inp["images"], jnp.float32)),
        "text_embeddings": _normalise(jnp.asarray(inp["texts"], jnp.float32)),
        f"{prefix}_text_embeddings": _normalise(jnp.asarray(inp["negatives"], jnp.float32)),
        "logit_scale": jnp.float32(inp["log_scale"]),
        "image_tokens": jnp.asarray(inp["image_tokens"], jnp.float32),
        "text_tokens": jnp.asarray(inp["text_tokens"], jnp.float32),
        "text_token_mask": jnp.asarray(inp["text_token_mask"]),
        f"{prefix}_text_tokens": jnp.asarray(inp["negative_tokens"], jnp.float32),
        f"{prefix}_text_token_mask": jnp.asarray(inp["negative_token_mask"]),
    }
    return outputs, {f"{prefix}_mask": jnp.asarray(inp["negative_mask"])}


def test_fscclip_and_negclip_configs_through_total_loss():
    """clip + global_hn + local_hn with their weights; negclip alone; metrics (accuracy, valid rows)."""
    inp = make_inputs(10)
    outputs, batch = _outputs_and_batch(inp)
    config = {"clip": {"weight": 1.0}, "global_hn": {"weight": 0.5}, "local_hn": {"weight": 0.2}}
    total, metrics = jax.jit(lambda o, b: total_loss(o, b, LossContext(), config))(outputs, batch)
    expected = metrics["loss/clip"] + 0.5 * metrics["loss/global_hn"] + 0.2 * metrics["loss/local_hn"]
    assert abs(float(total) - float(expected)) < 1e-5
    assert rel_err(metrics["loss/global_hn"], numpy_global_hn(inp)) < 1e-5
    assert rel_err(metrics["loss/local_hn"], numpy_local_hn(inp)) < 1e-5
    assert float(metrics["global_hn/valid_rows"]) == float(np.any(inp["negative_mask"], axis=1).sum())
    assert 0.0 <= float(metrics["local_hn/accuracy"]) <= 1.0

    # accuracy: share of counted rows whose positive beats every valid negative
    x, captions = outputs["image_embeddings"], jnp.concatenate(
        [outputs["text_embeddings"][:, None], outputs["negative_text_embeddings"]], axis=1)
    logits = np.asarray(jnp.einsum("nd,nkd->nk", x, captions))
    counted = np.any(inp["negative_mask"], axis=1)
    wins = [all(logits[i, 0] > logits[i, 1 + j] for j in np.flatnonzero(inp["negative_mask"][i]))
            for i in np.flatnonzero(counted)]
    assert abs(float(metrics["global_hn/accuracy"]) - np.mean(wins)) < 1e-6

    value, metrics = total_loss(outputs, batch, LossContext(), {"negclip": {"weight": 1.0}})
    assert rel_err(value, numpy_negclip(inp)) < 1e-5
    assert float(metrics["negclip/negatives"]) == float(inp["negative_mask"].sum())


def test_terms_with_a_mesh_and_padding_mask():
    inp = make_inputs(11, n=13)
    outputs, batch = _outputs_and_batch(inp)
    batch["mask"] = jnp.asarray(np.arange(13) % 5 != 0)
    config = {"global_hn": {}, "local_hn": {}, "negclip": {}}
    _, single = total_loss(outputs, batch, LossContext(), config)
    _, sharded = jax.jit(lambda o, b: total_loss(o, b, LossContext(mesh=make_mesh(MESHES["data8"])), config))(
        outputs, batch)
    for key, value in single.items():
        assert abs(float(sharded[key]) - float(value)) <= 1e-5 * max(abs(float(value)), 1.0), key


def test_reads_follow_the_negatives_prefix():
    reads = term_reads({"global_hn": {}, "local_hn": {"negatives": "swap"}, "negclip": {"negatives": "hn"}})
    assert reads["global_hn"].outputs == ("image_embeddings", "text_embeddings", "negative_text_embeddings",
                                          "logit_scale")
    assert reads["global_hn"].batch == ("negative_mask",)
    assert set(reads["local_hn"].outputs) == {"image_tokens", "text_tokens", "text_token_mask", "swap_text_tokens",
                                              "swap_text_token_mask", "logit_scale"}
    assert reads["local_hn"].batch == ("swap_mask",)
    assert "hn_text_embeddings" in reads["negclip"].outputs and reads["negclip"].batch == ("hn_mask",)
    outputs, batch = _outputs_and_batch(make_inputs(12), prefix="swap")
    value, _ = TERMS["local_hn"](outputs, batch, LossContext(), negatives="swap")
    assert np.isfinite(float(value))


def test_degenerate_batches_are_finite():
    """No valid negative anywhere, or every row padding: the HN losses are 0 with zero, finite gradients."""
    inp = make_inputs(13)
    inp["negative_mask"] = np.zeros_like(inp["negative_mask"])
    for kind in ("global_hn", "local_hn"):
        value, grads = value_and_grads(kind, inp, jnp.float32)
        assert float(value) == 0.0 and all(bool(jnp.all(g == 0.0)) for g in grads)
    inp = make_inputs(13)
    for kind in ("global_hn", "local_hn", "negclip"):
        value, grads = value_and_grads(kind, inp, jnp.float32, mask=np.zeros(7, bool))
        assert float(value) == 0.0 and all(bool(jnp.all(g == 0.0)) for g in grads)


def test_bad_knobs_are_refused():
    outputs, batch = _outputs_and_batch(make_inputs(14))
    with pytest.raises(ValueError, match="beta"):
        TERMS["global_hn"](outputs, batch, LossContext(), beta=1.5)
    with pytest.raises(ValueError, match="gamma"):
        TERMS["local_hn"](outputs, batch, LossContext(), gamma=-1.0)
    with pytest.raises(ValueError, match="attention"):
        TERMS["local_hn"](outputs, batch, LossContext(), attention="max")


# --- (g) per-device memory --------------------------------------------------------------------------


def _hn_temp_bytes(kind: str, devices: int, n: int, k: int = 3, patches: int = 16, length: int = 12,
                   d: int = 32) -> int:
    """XLA's per-device temp bytes of the jitted fwd+bwd of a term on n rows per device (float32)."""
    from jax.sharding import NamedSharding

    from jclip.parallel import batch_spec

    mesh = make_mesh({"data": devices}, devices=jax.devices()[:devices])
    big_n = n * devices

    def spec(shape, dtype=jnp.float32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, batch_spec(len(shape))))

    shapes = {"images": (big_n, d), "texts": (big_n, d), "negatives": (big_n, k, d),
              "image_tokens": (big_n, patches, d), "text_tokens": (big_n, length, d),
              "negative_tokens": (big_n, k, length, d)}
    inp = {"negative_mask": np.ones((big_n, k), bool), "text_token_mask": np.ones((big_n, length), bool),
           "negative_token_mask": np.ones((big_n, k, length), bool)}
    loss = jax_loss(kind, inp, mesh=mesh)
    args = [spec(shapes[name]) for name in DIFFERENTIABLE[:-1]] + [jax.ShapeDtypeStruct((), jnp.float32)]
    grad = jax.value_and_grad(loss, argnums=tuple(range(len(args))))
    return int(jax.jit(grad).lower(*args).compile().memory_analysis().temp_size_in_bytes)


def test_per_device_memory():
    """At a fixed n per device: global_hn and local_hn do not grow with N (no cross-device term);
    negclip grows at most linearly in N (O(n·N·(1+K)), not O(N²))."""
    n = 16
    temps = {(kind, devices): _hn_temp_bytes(kind, devices, n)
             for kind in ("global_hn", "local_hn", "negclip") for devices in (2, 8)}
    print("\nper-device temp bytes of fwd+bwd, n=16 rows per device:", temps)
    for kind in ("global_hn", "local_hn"):
        assert temps[kind, 8] <= 1.1 * temps[kind, 2] + 4096, kind
    assert temps["negclip", 8] <= 1.25 * 4 * temps["negclip", 2]
