"""Hard-negative caption losses: FSC-CLIP's global and local HN terms (with SCR) and NegCLIP.

FSC-CLIP (Oh et al., arXiv 2410.05210, EMNLP 2024; official code ytaek-oh/fsc-clip, values pinned by
shared/reference/fscclip_official.npz) follows shared/METHODS.md section 4. Each example i has an image,
a positive caption and up to K hard-negative (HN) captions, `negative_mask` [N, K] marking the real ones.

    Global HN:  z_i = s·[⟨x_i, y_i⟩, ⟨x_i, ỹ_i1⟩, …, ⟨x_i, ỹ_iK⟩]                  ((1+K)-way, target 0)
    Local HN:   a_wp = stopgrad(⟨t_w, v_p⟩), min–max normalised over patches p, then divided by its sum
                v̂_w = Σ_p a_wp·v_p;   score(image, caption) = logsumexp_w s·cos(v̂_w, t_w)
                z_i = [score(i, y_i), score(i, ỹ_i1), …, score(i, ỹ_iK)]            (same (1+K)-way task)
    SCR:        p = softmax(z_i);  q_0 = (1−β) + β/(1+K_v),  q_k = β/(1+K_v) on valid negatives, 0 else
                ℓ_i = Σ_k q_k·(1 − p_k)^γ·(−log p_k)        (focal factor not detached)
    L = mean of ℓ_i over the rows with at least one valid negative (and not padding).

with s = exp(t) (t the log scale), x, y, ỹ L2-normalised embeddings, v_p the image's patch tokens (no CLS,
not normalised), t_w the caption's valid tokens (text_token_mask, without the start token). A missing
negative has logit 0 (as in the official code, where it is a zero feature): it stays in the softmax but
gets no target mass, and K_v counts the valid negatives of the row. Defaults γ = 2, β = 0.02 are the
official ones; γ = β = 0 is plain cross-entropy ("without SCR"). The loss weights λ_g, λ_l come from the
config's `weight`.

NegCLIP (Yuksekgonul et al., "When and why vision-language models behave like bags-of-words", ICLR 2023):
the CLIP loss whose image→text softmax also holds every valid negative caption of the global batch as
extra columns (N·K of them), text→image over the positives only; L = ½[CE_i→t + CE_t→i]. With no valid
negative it is exactly `clip`.

Cases the official code leaves undefined (it would produce NaN) get a finite convention here: a token whose
similarities to all patches are equal gets uniform attention, and a caption with no valid token scores 0.
Neither can happen for real inputs (only for padding rows and missing negatives, which are ignored).

Sharding (shared/ARCHITECTURE.md, principle 4): global_hn and local_hn only compare an image with its own
captions, so with a mesh each device computes its n rows alone (local_hn memory grows with n·K·L·P and
n·K·L·d, never with N) and the partial sums are psum-ed. NegCLIP all-gathers the positives and the
negatives, O(n·N·(1+K)) per device. All forms equal the single-device result, padding rows included.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jclip.losses.contrastive import softmax_ce_sum
from jclip.losses.sharded import (
    batch_mask,
    batch_shards,
    compute_dtype,
    pad_rows,
    pair_logits,
    positive_pairs,
    sharded_sum,
)
from jclip.losses.terms import LossContext, Metrics, Reads, register_term
from jclip.parallel import BATCH_MESH_AXES

HIGHEST = jax.lax.Precision.HIGHEST
ATTENTION_NORMALISERS = ("minmax", "softmax")

# ---------------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------------


def _l2_normalise(features: jax.Array) -> jax.Array:
    """L2 normalisation over the last axis; all-zero vectors (padding) stay zero, with finite gradients."""
    squared = jnp.sum(features * features, axis=-1, keepdims=True)
    return features * jax.lax.rsqrt(jnp.where(squared > 0, squared, 1.0))


def _scr_row_losses(
    logits: jax.Array, negative_valid: jax.Array, *, gamma: float, beta: float
) -> jax.Array:
    """ℓ_i = Σ_k q_k·(1 − p_k)^γ·(−log p_k) per row of [n, 1+K] logits (column 0 the positive).

    The caller has already put 0 in the logits of missing negatives. q is the SCR smoothed label with
    K_v = the row's valid negatives; β = 0 is the hard label, γ = 0 plain cross-entropy.
    """
    dtype = logits.dtype
    log_p = jax.nn.log_softmax(logits, axis=-1)
    nll = -log_p
    if gamma != 0.0:
        # 1 − p as −expm1(log p): no cancellation when p is close to 1.
        one_minus_p = jnp.maximum(-jnp.expm1(log_p), jnp.finfo(dtype).tiny)
        nll = nll * one_minus_p**gamma
    share = beta / (1.0 + jnp.sum(negative_valid, axis=-1, keepdims=True).astype(dtype))
    labels = jnp.concatenate([(1.0 - beta) + share, jnp.where(negative_valid, share, 0.0)], axis=-1)
    return jnp.sum(jax.lax.stop_gradient(labels) * nll, axis=-1)


def _hn_sums(
    logits: jax.Array, negative_valid: jax.Array, row_mask: jax.Array, *, gamma: float, beta: float
) -> jax.Array:
    """[Σ ℓ_i, #rows whose positive has the top logit] over the rows that count (valid, with a negative)."""
    counted = row_mask & jnp.any(negative_valid, axis=-1)
    logits = jnp.concatenate([logits[:, :1], jnp.where(negative_valid, logits[:, 1:], 0.0)], axis=-1)
    rows = _scr_row_losses(logits, negative_valid, gamma=gamma, beta=beta)
    correct = jnp.all(logits[:, :1] > jnp.where(negative_valid, logits[:, 1:], -jnp.inf), axis=-1)
    correct = jax.lax.stop_gradient(correct.astype(logits.dtype))
    return jnp.stack([jnp.sum(jnp.where(counted, rows, 0.0)), jnp.sum(jnp.where(counted, correct, 0.0))])


def _scr_knobs(name: str, gamma: float, beta: float) -> tuple[float, float]:
    """(γ, β) as floats, checked: γ = 0 drops the focal factor, β = 0 the label smoothing."""
    gamma, beta = float(gamma), float(beta)
    if gamma < 0.0:
        raise ValueError(f"{name}: gamma must be >= 0, got {gamma!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"{name}: beta must be in [0, 1], got {beta!r}")
    return gamma, beta


def _row_mask(mask: jax.Array | None, n: int) -> jax.Array:
    if mask is None:
        return jnp.ones((n,), bool)
    if jnp.shape(mask) != (n,):
        raise ValueError(f"mask must have shape ({n},), got {jnp.shape(mask)}")
    return jnp.asarray(mask, bool)


def _check_negative_mask(negative_mask: jax.Array, n: int, k: int) -> jax.Array:
    if jnp.shape(negative_mask) != (n, k):
        raise ValueError(f"negative mask must have shape ({n}, {k}), got {jnp.shape(negative_mask)}")
    return jnp.asarray(negative_mask, bool)


def _mean_over_counted_rows(
    block: Any, mesh: Mesh | None, batch_axes: Sequence[str], rows: list[jax.Array], scale: jax.Array,
    row_mask: jax.Array, negative_mask: jax.Array, dtype: Any,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(loss, accuracy, counted rows): `block(*rows, scale)`'s sums (on the whole batch, or on each device's
    rows, psum-ed, with a mesh) divided by the number of rows that are not padding and have a valid negative."""
    shards = batch_shards(mesh, batch_axes)
    if shards == 1:
        sums = block(*rows, scale)
    else:
        sums = sharded_sum(block, mesh, tuple(batch_axes), pad_rows(rows, shards), [scale])
    counted = jnp.sum(row_mask & jnp.any(negative_mask, axis=-1)).astype(dtype)
    denominator = jnp.maximum(counted, 1.0)
    return sums[0] / denominator, sums[1] / denominator, counted


# ---------------------------------------------------------------------------------------------------
# Global HN
# ---------------------------------------------------------------------------------------------------


def global_hn_parts(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    negative_text_embeddings: jax.Array,
    negative_mask: jax.Array,
    logit_scale: jax.Array | float,
    *,
    gamma: float = 2.0,
    beta: float = 0.02,
    mask: jax.Array | None = None,
    mesh: Mesh | None = None,
    batch_axes: Sequence[str] = BATCH_MESH_AXES,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(loss, accuracy, counted rows) of FSC-CLIP's global HN loss with SCR (see the module docstring).

    Embeddings are L2-normalised: images and positives [N, d], negatives [N, K, d] (rows of missing
    negatives are ignored, whatever they hold); `negative_mask` [N, K] bool; `logit_scale` the log scale.
    `mask` [N] bool drops padding rows. Accuracy: share of counted rows whose positive beats every valid
    negative. Computed in (at least) float32; with `mesh`, per device on its own rows.
    """
    n, k, d = negative_text_embeddings.shape
    if image_embeddings.shape != (n, d) or text_embeddings.shape != (n, d):
        raise ValueError(
            f"expected images and texts [{n}, {d}] to match the negatives {negative_text_embeddings.shape}, got "
            f"{image_embeddings.shape} and {text_embeddings.shape}"
        )
    dtype = compute_dtype(image_embeddings, text_embeddings, negative_text_embeddings)
    row_mask = _row_mask(mask, n)
    negative_mask = _check_negative_mask(negative_mask, n, k)
    scale = jnp.exp(jnp.asarray(logit_scale, dtype).reshape(()))

    def block(images, texts, negatives, negative_valid, row_mask, scale):
        captions = jnp.concatenate([texts[:, None, :], negatives], axis=1)  # [n, 1+K, d]
        logits = jnp.einsum("nd,nkd->nk", images * scale, captions, precision=HIGHEST)
        return _hn_sums(logits, negative_valid, row_mask, gamma=gamma, beta=beta)

    rows = [image_embeddings.astype(dtype), text_embeddings.astype(dtype), negative_text_embeddings.astype(dtype),
            negative_mask, row_mask]
    return _mean_over_counted_rows(block, mesh, batch_axes, rows, scale, row_mask, negative_mask, dtype)


def global_hn_loss(*args: Any, **kwargs: Any) -> jax.Array:
    """The loss of `global_hn_parts` (same arguments)."""
    return global_hn_parts(*args, **kwargs)[0]


# ---------------------------------------------------------------------------------------------------
# Local HN
# ---------------------------------------------------------------------------------------------------


def _token_attention(similarity: jax.Array, normaliser: str) -> jax.Array:
    """Weights over patches (last axis) from token–patch similarities (constants here).

    "minmax" (official default): (a − min)/(max − min), divided by its sum, with no ε in either division
    (as the official code; the reference values pin it); "softmax": softmax over p (the official
    alternative). A token with equal similarity to every patch (max = min, NaN in the official code) gets
    uniform weights. The official `sim_sparsify` option (off by default there) is not implemented.
    """
    if normaliser == "softmax":
        return jax.nn.softmax(similarity, axis=-1)
    low = jnp.min(similarity, axis=-1, keepdims=True)
    spread = jnp.max(similarity, axis=-1, keepdims=True) - low
    flat = spread <= 0
    weights = (similarity - low) / jnp.where(flat, 1.0, spread)
    weights = jnp.where(flat, 1.0, weights)  # the max patch has weight 1, so the sum is >= 1
    return weights / jnp.sum(weights, axis=-1, keepdims=True)


def _local_scores(
    image_tokens: jax.Array, caption_tokens: jax.Array, token_valid: jax.Array, scale: jax.Array, normaliser: str
) -> jax.Array:
    """score[i, c] = logsumexp over valid tokens w of s·cos(v̂_w, t_w), for [n, C, L, d] captions of image i.

    image_tokens [n, P, d]; token_valid [n, C, L]. A caption without a valid token scores 0.
    """
    similarity = jnp.einsum("ncld,npd->nclp", caption_tokens, image_tokens, precision=HIGHEST)
    attention = _token_attention(jax.lax.stop_gradient(similarity), normaliser)
    pooled = jnp.einsum("nclp,npd->ncld", attention, image_tokens, precision=HIGHEST)
    cosine = jnp.sum(_l2_normalise(pooled) * _l2_normalise(caption_tokens), axis=-1)
    logits = jnp.where(token_valid, scale * cosine, -jnp.inf)
    has_token = jnp.any(token_valid, axis=-1)
    logits = jnp.where(has_token[..., None], logits, 0.0)
    return jnp.where(has_token, jax.nn.logsumexp(logits, axis=-1), 0.0)


def local_hn_parts(
    image_tokens: jax.Array,
    text_tokens: jax.Array,
    text_token_mask: jax.Array,
    negative_text_tokens: jax.Array,
    negative_text_token_mask: jax.Array,
    negative_mask: jax.Array,
    logit_scale: jax.Array | float,
    *,
    gamma: float = 2.0,
    beta: float = 0.02,
    skip_start_token: bool = True,
    attention: str = "minmax",
    mask: jax.Array | None = None,
    mesh: Mesh | None = None,
    batch_axes: Sequence[str] = BATCH_MESH_AXES,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(loss, accuracy, counted rows) of FSC-CLIP's local HN loss (LHN) with SCR (module docstring).

    image_tokens [N, P, d] (patches, no CLS, not normalised); text_tokens [N, L, d] with text_token_mask
    [N, L]; negative_text_tokens [N, K, L, d] with negative_text_token_mask [N, K, L]; negative_mask
    [N, K]. `skip_start_token`: position 0 (the start token) is never a valid token, as in the official
    code. `attention`: the patch weighting, "minmax" (official) or "softmax" (the official alternative).
    """
    if attention not in ATTENTION_NORMALISERS:
        raise ValueError(f"local_hn: unknown attention {attention!r}; known: {list(ATTENTION_NORMALISERS)}")
    n, k, length, d = negative_text_tokens.shape
    if image_tokens.ndim != 3 or image_tokens.shape[0] != n or image_tokens.shape[2] != d:
        raise ValueError(f"expected image tokens [{n}, P, {d}], got {image_tokens.shape}")
    if text_tokens.shape != (n, length, d):
        raise ValueError(f"expected text tokens [{n}, {length}, {d}], got {text_tokens.shape}")
    if jnp.shape(text_token_mask) != (n, length) or jnp.shape(negative_text_token_mask) != (n, k, length):
        raise ValueError(
            f"expected token masks [{n}, {length}] and [{n}, {k}, {length}], got {jnp.shape(text_token_mask)} "
            f"and {jnp.shape(negative_text_token_mask)}"
        )
    dtype = compute_dtype(image_tokens, text_tokens, negative_text_tokens)
    row_mask = _row_mask(mask, n)
    negative_mask = _check_negative_mask(negative_mask, n, k)
    scale = jnp.exp(jnp.asarray(logit_scale, dtype).reshape(()))
    token_valid = jnp.concatenate(
        [jnp.asarray(text_token_mask, bool)[:, None], jnp.asarray(negative_text_token_mask, bool)], axis=1
    )
    if skip_start_token:
        token_valid = token_valid.at[..., 0].set(False)

    def block(images, texts, negatives, token_valid, negative_valid, row_mask, scale):
        captions = jnp.concatenate([texts[:, None], negatives], axis=1)  # [n, 1+K, L, d]
        logits = _local_scores(images, captions, token_valid, scale, attention)
        return _hn_sums(logits, negative_valid, row_mask, gamma=gamma, beta=beta)

    rows = [image_tokens.astype(dtype), text_tokens.astype(dtype), negative_text_tokens.astype(dtype), token_valid,
            negative_mask, row_mask]
    return _mean_over_counted_rows(block, mesh, batch_axes, rows, scale, row_mask, negative_mask, dtype)


def local_hn_loss(*args: Any, **kwargs: Any) -> jax.Array:
    """The loss of `local_hn_parts` (same arguments)."""
    return local_hn_parts(*args, **kwargs)[0]


# ---------------------------------------------------------------------------------------------------
# NegCLIP
# ---------------------------------------------------------------------------------------------------


def _negclip_block(
    image_rows: jax.Array,
    text_rows: jax.Array,
    image_all: jax.Array,
    text_all: jax.Array,
    negatives_all: jax.Array,
    scale: jax.Array,
    row_offset: jax.Array | int,
    row_mask: jax.Array,
    all_mask: jax.Array,
    negatives_valid: jax.Array,
) -> jax.Array:
    """Partial sum of both directions for the owned rows; image→text also over the [M, d] negatives."""
    n, m = image_rows.shape[0], text_all.shape[0]
    positives = positive_pairs(n, m, row_offset, 0)
    logits = jnp.concatenate(
        [pair_logits(image_rows, text_all, scale), pair_logits(image_rows, negatives_all, scale)], axis=1
    )
    columns = jnp.concatenate([all_mask, negatives_valid])
    targets = jnp.concatenate([positives, jnp.zeros((n, negatives_all.shape[0]), bool)], axis=1)
    image_to_text = softmax_ce_sum(logits, targets, row_mask, columns)
    text_to_image = softmax_ce_sum(pair_logits(text_rows, image_all, scale), positives, row_mask, all_mask)
    return image_to_text + text_to_image


def negclip_loss(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    negative_text_embeddings: jax.Array,
    negative_mask: jax.Array,
    logit_scale: jax.Array | float,
    *,
    mask: jax.Array | None = None,
    mesh: Mesh | None = None,
    batch_axes: Sequence[str] = BATCH_MESH_AXES,
) -> jax.Array:
    """NegCLIP: ½[CE over [all positives | all valid negatives] (image→text) + CE over positives (text→image)].

    L2-normalised embeddings: images, positives [N, d], negatives [N, K, d] with `negative_mask` [N, K];
    `logit_scale` the log scale. Negatives of padding rows (`mask` False) are dropped too. With `mesh`,
    each device gathers all positives and negatives (O(n·N·(1+K)) memory); equals the single-device loss.
    """
    n, k, d = negative_text_embeddings.shape
    if image_embeddings.shape != (n, d) or text_embeddings.shape != (n, d):
        raise ValueError(
            f"expected images and texts [{n}, {d}] to match the negatives {negative_text_embeddings.shape}, got "
            f"{image_embeddings.shape} and {text_embeddings.shape}"
        )
    dtype = compute_dtype(image_embeddings, text_embeddings, negative_text_embeddings)
    row_mask = _row_mask(mask, n)
    negative_valid = _check_negative_mask(negative_mask, n, k) & row_mask[:, None]
    images, texts = image_embeddings.astype(dtype), text_embeddings.astype(dtype)
    negatives = negative_text_embeddings.astype(dtype)
    scale = jnp.exp(jnp.asarray(logit_scale, dtype).reshape(()))
    shards = batch_shards(mesh, batch_axes)
    count = jnp.maximum(jnp.sum(row_mask), 1).astype(dtype)
    if shards == 1:
        total = _negclip_block(images, texts, images, texts, negatives.reshape(n * k, d), scale, 0, row_mask,
                               row_mask, negative_valid.reshape(n * k))
        return total / (2.0 * count)

    axes = tuple(batch_axes)

    def per_device(image_rows, text_rows, negative_rows, row_mask, negative_rows_valid, scale):
        offset = image_rows.shape[0] * jax.lax.axis_index(axes)
        gather = lambda a: jax.lax.all_gather(a, axes, axis=0, tiled=True)  # noqa: E731
        negatives_all = gather(negative_rows)
        return _negclip_block(
            image_rows, text_rows, gather(image_rows), gather(text_rows),
            negatives_all.reshape(-1, negatives_all.shape[-1]), scale, offset, row_mask, gather(row_mask),
            gather(negative_rows_valid).reshape(-1),
        )

    rows = pad_rows([images, texts, negatives, row_mask, negative_valid], shards)
    total = sharded_sum(per_device, mesh, axes, rows, [scale])
    return total / (2.0 * count)


# ---------------------------------------------------------------------------------------------------
# Loss terms
# ---------------------------------------------------------------------------------------------------


def _global_reads(*, negatives: str = "negative", **_: Any) -> Reads:
    """The embeddings, the scale and the `<negatives>_text_embeddings`; batch `<negatives>_mask`."""
    return Reads(
        outputs=("image_embeddings", "text_embeddings", f"{negatives}_text_embeddings", "logit_scale"),
        batch=(f"{negatives}_mask",),
    )


def _local_reads(*, negatives: str = "negative", **_: Any) -> Reads:
    """Patch and caption tokens with their masks, the scale; batch `<negatives>_mask`."""
    return Reads(
        outputs=("image_tokens", "text_tokens", "text_token_mask", f"{negatives}_text_tokens",
                 f"{negatives}_text_token_mask", "logit_scale"),
        batch=(f"{negatives}_mask",),
    )


@register_term("global_hn", reads=_global_reads)
def global_hn_term(
    outputs: Mapping[str, Any],
    batch: Mapping[str, Any],
    ctx: LossContext,
    *,
    gamma: float = 2.0,
    beta: float = 0.02,
    negatives: str = "negative",
) -> tuple[jax.Array, Metrics]:
    """FSC-CLIP's global HN loss with SCR (METHODS.md section 4); defaults are the official γ, β.

    `gamma=0` drops the focal factor and `beta=0` the label smoothing (both: plain cross-entropy).
    `negatives`: the prefix of the negative fields. Metrics: `global_hn/accuracy`, `global_hn/valid_rows`.
    """
    gamma, beta = _scr_knobs("global_hn", gamma, beta)
    loss, accuracy, counted = global_hn_parts(
        outputs["image_embeddings"], outputs["text_embeddings"], outputs[f"{negatives}_text_embeddings"],
        batch[f"{negatives}_mask"], outputs["logit_scale"],
        gamma=gamma, beta=beta, mask=batch_mask(batch), mesh=ctx.mesh,
    )
    return loss, {"global_hn/accuracy": accuracy, "global_hn/valid_rows": counted}


@register_term("local_hn", reads=_local_reads)
def local_hn_term(
    outputs: Mapping[str, Any],
    batch: Mapping[str, Any],
    ctx: LossContext,
    *,
    gamma: float = 2.0,
    beta: float = 0.02,
    skip_start_token: bool = True,
    attention: str = "minmax",
    negatives: str = "negative",
) -> tuple[jax.Array, Metrics]:
    """FSC-CLIP's local HN loss (token-grouped patches) with SCR (METHODS.md section 4).

    Knobs as `global_hn`, plus `skip_start_token` and `attention` (see `local_hn_parts`). Metrics:
    `local_hn/accuracy`, `local_hn/valid_rows`.
    """
    gamma, beta = _scr_knobs("local_hn", gamma, beta)
    loss, accuracy, counted = local_hn_parts(
        outputs["image_tokens"], outputs["text_tokens"], outputs["text_token_mask"],
        outputs[f"{negatives}_text_tokens"], outputs[f"{negatives}_text_token_mask"], batch[f"{negatives}_mask"],
        outputs["logit_scale"], gamma=gamma, beta=beta, skip_start_token=skip_start_token, attention=attention,
        mask=batch_mask(batch), mesh=ctx.mesh,
    )
    return loss, {"local_hn/accuracy": accuracy, "local_hn/valid_rows": counted}


@register_term("negclip", reads=_global_reads)
def negclip_term(
    outputs: Mapping[str, Any], batch: Mapping[str, Any], ctx: LossContext, *, negatives: str = "negative"
) -> tuple[jax.Array, Metrics]:
    """NegCLIP: the CLIP loss with the batch's hard negatives as extra image→text columns (replaces `clip`).

    Metrics: `negclip/scale`, `negclip/negatives` (valid negatives in the global batch).
    """
    negative_mask = jnp.asarray(batch[f"{negatives}_mask"], bool)
    mask = batch_mask(batch)
    loss = negclip_loss(
        outputs["image_embeddings"], outputs["text_embeddings"], outputs[f"{negatives}_text_embeddings"],
        negative_mask, outputs["logit_scale"], mask=mask, mesh=ctx.mesh,
    )
    if mask is not None:
        negative_mask = negative_mask & jnp.asarray(mask, bool)[:, None]
    return loss, {
        "negclip/scale": jnp.exp(jnp.asarray(outputs["logit_scale"], jnp.float32).reshape(())),
        "negclip/negatives": jnp.sum(negative_mask).astype(jnp.float32),
    }
