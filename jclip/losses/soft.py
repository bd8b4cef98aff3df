"""SoftCLIP (Gao et al., arXiv 2303.17561, AAAI 2024): soft cross-modal targets plus a negatives-only KL.

The paper has no official code; everything here follows the reconstruction of shared/METHODS.md section 2
and every default is a reconstruction ([recon]), kept as a knob:

    P^it = softmax_rows(S),  P^ti = softmax_rows(Sᵀ),      S = exp(t)·X·Yᵀ
    G^I  = softmax_rows(R^I·R^Iᵀ / τ_g),  G^T likewise    (intra-modal self-similarity, the guidance)
    Q    = (1−α)·I + α·G                                   (soft target, stop-gradient)
    L_soft = ½ Σ_directions mean_i KL(Q_i ‖ P_i)
    L_neg  = ½ Σ_directions mean_i KL(Q̄_i ‖ P̄_i)          (Q̄, P̄: diagonal dropped, renormalised over j ≠ i)
    L      = L_soft + λ·L_neg

Defaults [recon]: α = 0.2, λ = 1, τ_g = the model's current 1/s (stop-gradient), G^I supervises
image→text and G^T text→image, guidance features = the model's own embeddings under stop-gradient.

Conventions (documented choices where the reconstruction leaves a case open):
- Q̄ for α > 0 is G with its diagonal dropped and renormalised (the off-diagonal of Q is α·G, so α
  cancels); it is computed as a log-softmax with the diagonal at −∞, never as G/(1 − G_ii), which would
  cancel catastrophically when the positive dominates. Likewise P̄ (never P/(1 − P_ii)).
- A row with no negatives (a batch of one valid example), or α = 0 (Q has no mass on the negatives, so
  Q̄ is 0/0), contributes 0 to L_neg; hence α = 0 gives exactly the CLIP loss, whatever λ.
- Means are over the valid rows N; padding rows (mask False) are dropped as rows and as columns, and the
  guidance is renormalised over the valid columns, so a padded batch gives the loss of its valid rows.

Like jclip.losses.contrastive, the loss is written once as a per-block computation (a block of rows
against all N columns). With a mesh, each device owns its n rows, all-gathers the other modality
(differentiable) and the guidance features (no gradient), and computes its n×N blocks: O(n·N) memory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jclip.losses.sharded import (
    batch_mask,
    batch_shards,
    pad_rows,
    pair_logits,
    positive_pairs,
    prepare_pair,
    sharded_sum,
)
from jclip.losses.terms import LossContext, Metrics, Reads, register_term
from jclip.parallel import BATCH_MESH_AXES

GUIDANCE_SOURCES = ("self", "batch", "outputs")
# pairing -> (guidance modality of image→text, guidance modality of text→image)
PAIRINGS: dict[str, tuple[str, str]] = {
    "same": ("image", "text"),  # [recon] default: G^I for image→text, G^T for text→image
    "swapped": ("text", "image"),
    "image": ("image", "image"),
    "text": ("text", "text"),
}
BATCH_GUIDANCE_KEYS = {"image": "guidance_image_features", "text": "guidance_text_features"}
OUTPUT_GUIDANCE_KEYS = {"image": "teacher_image_embeddings", "text": "teacher_text_embeddings"}

# ---------------------------------------------------------------------------------------------------
# Per-block computation
# ---------------------------------------------------------------------------------------------------


def _masked_log_softmax(logits: jax.Array, valid: jax.Array) -> jax.Array:
    """Row-wise log-softmax over the `valid` entries; 0 (not NaN) at invalid entries and empty rows."""
    has_any = jnp.any(valid, axis=1, keepdims=True)
    masked = jnp.where(valid, logits, -jnp.inf)
    masked = jnp.where(has_any, masked, 0.0)
    return jnp.where(valid, masked - jax.nn.logsumexp(masked, axis=1, keepdims=True), 0.0)


def _kl_rows(target: jax.Array, log_target: jax.Array, log_pred: jax.Array) -> jax.Array:
    """Σ_j target·(log target − log pred) per row, with 0·log 0 = 0 (target carries no gradient)."""
    log_target = jnp.where(target > 0, log_target, 0.0)
    return jnp.sum(target * (log_target - log_pred), axis=1)


def _softclip_direction(
    query_rows: jax.Array,
    key_all: jax.Array,
    guide_rows: jax.Array,
    guide_all: jax.Array,
    scale: jax.Array,
    guide_scale: jax.Array,
    alpha: float,
    row_offset: jax.Array | int,
    row_mask: jax.Array,
    all_mask: jax.Array,
) -> jax.Array:
    """[Σ_i KL(Q_i ‖ P_i), Σ_i KL(Q̄_i ‖ P̄_i)] over the valid rows of one direction's n×N block.

    `guide_rows`/`guide_all` and `guide_scale` (= 1/τ_g) are constants (stop-gradient): Q has no gradient.
    """
    n, m = query_rows.shape[0], key_all.shape[0]
    positives = positive_pairs(n, m, row_offset, 0)
    valid = row_mask[:, None] & all_mask[None, :]
    negatives = valid & ~positives
    logits = pair_logits(query_rows, key_all, scale)
    guide_logits = jax.lax.stop_gradient(pair_logits(guide_rows, guide_all, guide_scale))

    # Soft term: Q = (1−α)·I + α·G over the valid columns.
    log_guide = _masked_log_softmax(guide_logits, valid)
    target = (1.0 - alpha) * (positives & valid) + alpha * jnp.where(valid, jnp.exp(log_guide), 0.0)
    target = jax.lax.stop_gradient(target.astype(logits.dtype))
    log_target = jnp.log(jnp.where(target > 0, target, 1.0))
    soft = jnp.sum(_kl_rows(target, log_target, _masked_log_softmax(logits, valid)))

    # Negatives-only term: diagonal at −∞ before the log-softmax, for the guidance and the prediction.
    if alpha <= 0.0:
        neg = jnp.zeros((), logits.dtype)
    else:
        log_guide_bar = _masked_log_softmax(guide_logits, negatives)
        guide_bar = jnp.where(negatives, jnp.exp(log_guide_bar), 0.0)  # all-zero rows without negatives
        neg = jnp.sum(_kl_rows(guide_bar, log_guide_bar, _masked_log_softmax(logits, negatives)))
    return jnp.stack([soft, neg])


def _softclip_block(
    image_rows: jax.Array,
    text_rows: jax.Array,
    image_all: jax.Array,
    text_all: jax.Array,
    guides: Mapping[str, tuple[jax.Array, jax.Array]],
    pairing: tuple[str, str],
    scale: jax.Array,
    guide_scale: jax.Array,
    alpha: float,
    row_offset: jax.Array | int,
    row_mask: jax.Array,
    all_mask: jax.Array,
) -> jax.Array:
    """[soft, neg] partial sums of both directions for the owned rows; `guides[m]` = (rows, all) of modality m."""
    i2t_guide, t2i_guide = (guides[modality] for modality in pairing)
    common = (scale, guide_scale, alpha, row_offset, row_mask, all_mask)
    image_to_text = _softclip_direction(image_rows, text_all, *i2t_guide, *common)
    text_to_image = _softclip_direction(text_rows, image_all, *t2i_guide, *common)
    return image_to_text + text_to_image


# ---------------------------------------------------------------------------------------------------
# Public loss
# ---------------------------------------------------------------------------------------------------


def _l2_normalise(features: jax.Array) -> jax.Array:
    """Row-wise L2 normalisation; all-zero rows (e.g. padding) stay zero instead of becoming NaN."""
    norm = jnp.sqrt(jnp.sum(features * features, axis=-1, keepdims=True))
    return features / jnp.where(norm > 0, norm, 1.0)


def _check_knobs(alpha: float, guidance_temperature: float | None, pairing: str) -> None:
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"softclip: alpha must be in [0, 1], got {alpha!r}")
    if guidance_temperature is not None and not float(guidance_temperature) > 0.0:
        raise ValueError(f"softclip: guidance_temperature must be positive or None, got {guidance_temperature!r}")
    if pairing not in PAIRINGS:
        raise ValueError(f"softclip: unknown pairing {pairing!r}; known: {sorted(PAIRINGS)}")


def softclip_parts(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    logit_scale: jax.Array | float,
    *,
    alpha: float = 0.2,
    guidance_temperature: float | None = None,
    image_guidance: jax.Array | None = None,
    text_guidance: jax.Array | None = None,
    pairing: str = "same",
    mask: jax.Array | None = None,
    mesh: Mesh | None = None,
    batch_axes: Sequence[str] = BATCH_MESH_AXES,
) -> tuple[jax.Array, jax.Array]:
    """(L_soft, L_neg) of SoftCLIP (METHODS.md section 2, all defaults [recon]); see the module docstring.

    Embeddings are L2-normalised [N, d]; `logit_scale` is the log scale t. `image_guidance` /
    `text_guidance` are the guidance features R^I / R^T [N, d_g] (L2-normalised here); None means the
    embeddings themselves (used as given). Guidance never carries gradient. `guidance_temperature` τ_g;
    None means 1/exp(t) (stop-gradient). `pairing` picks which guidance supervises which direction
    (`PAIRINGS`). `mask` [N] bool marks valid rows. With `mesh` the batch is split over `batch_axes` and
    each device computes its n×N blocks; the result equals the single-device loss.
    """
    _check_knobs(alpha, guidance_temperature, pairing)
    alpha = float(alpha)
    images, texts, mask, (log_scale,) = prepare_pair(image_embeddings, text_embeddings, mask, [logit_scale])
    dtype = images.dtype
    scale = jnp.exp(log_scale)
    if guidance_temperature is None:
        guide_scale = jax.lax.stop_gradient(scale)
    else:
        guide_scale = jnp.asarray(1.0 / float(guidance_temperature), dtype)

    needed = sorted(set(PAIRINGS[pairing]))
    external: dict[str, jax.Array] = {}  # modality -> guidance features given explicitly
    for modality, features in (("image", image_guidance), ("text", text_guidance)):
        if modality in needed and features is not None:
            features = jnp.asarray(features)
            if features.ndim != 2 or features.shape[0] != images.shape[0]:
                raise ValueError(
                    f"softclip: {modality} guidance features must have shape [{images.shape[0]}, d_g], got {features.shape}"
                )
            external[modality] = jax.lax.stop_gradient(_l2_normalise(features.astype(dtype)))
    names = sorted(external)  # order of the external guidance arrays among the row arrays
    shards = batch_shards(mesh, batch_axes)
    count = jnp.maximum(jnp.sum(mask), 1).astype(dtype)

    def guides_of(images_rows, texts_rows, images_all, texts_all, ext_rows, ext_all):
        own = {"image": (images_rows, images_all), "text": (texts_rows, texts_all)}
        guides = {m: tuple(jax.lax.stop_gradient(a) for a in own[m]) for m in needed if m not in external}
        guides.update({m: (ext_rows[k], ext_all[k]) for k, m in enumerate(names)})
        return guides

    if shards == 1:
        ext = [external[m] for m in names]
        guides = guides_of(images, texts, images, texts, ext, ext)
        sums = _softclip_block(images, texts, images, texts, guides, PAIRINGS[pairing], scale, guide_scale,
                               alpha, 0, mask, mask)
    else:
        axes = tuple(batch_axes)

        def per_device(image_rows, text_rows, row_mask, *rest):
            *ext_rows, scale, guide_scale = rest
            offset = image_rows.shape[0] * jax.lax.axis_index(axes)
            gather = lambda a: jax.lax.all_gather(a, axes, axis=0, tiled=True)  # noqa: E731
            image_all, text_all, all_mask = gather(image_rows), gather(text_rows), gather(row_mask)
            ext_all = [jax.lax.stop_gradient(gather(a)) for a in ext_rows]
            guides = guides_of(image_rows, text_rows, image_all, text_all, ext_rows, ext_all)
            return _softclip_block(image_rows, text_rows, image_all, text_all, guides, PAIRINGS[pairing],
                                   scale, guide_scale, alpha, offset, row_mask, all_mask)

        rows = pad_rows([images, texts, mask] + [external[m] for m in names], shards)
        sums = sharded_sum(per_device, mesh, axes, rows, [scale, guide_scale])
    soft, neg = sums[0] / (2.0 * count), sums[1] / (2.0 * count)
    return soft, neg


def softclip_loss(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    logit_scale: jax.Array | float,
    *,
    neg_weight: float = 1.0,
    **kwargs: Any,
) -> jax.Array:
    """L_soft + λ·L_neg with λ = `neg_weight` (default 1, [recon]); other arguments as `softclip_parts`."""
    soft, neg = softclip_parts(image_embeddings, text_embeddings, logit_scale, **kwargs)
    return soft + float(neg_weight) * neg


# ---------------------------------------------------------------------------------------------------
# Loss term
# ---------------------------------------------------------------------------------------------------


def _guidance_features(
    source: str, outputs: Mapping[str, Any], batch: Mapping[str, Any], pairing: str
) -> dict[str, jax.Array | None]:
    """The guidance features per modality for a `guidance` source; a clear error when a key is missing."""
    if source not in GUIDANCE_SOURCES:
        raise ValueError(f"softclip: unknown guidance {source!r}; known: {list(GUIDANCE_SOURCES)}")
    if source == "self":
        return {"image_guidance": None, "text_guidance": None}
    container, keys, where = (
        (batch, BATCH_GUIDANCE_KEYS, "batch") if source == "batch" else (outputs, OUTPUT_GUIDANCE_KEYS, "outputs")
    )
    needed = sorted(set(PAIRINGS[pairing]))
    missing = [f"{where}[{keys[m]!r}]" for m in needed if keys[m] not in container]
    if missing:
        hint = ("the data pipeline must carry precomputed guidance features" if source == "batch"
                else "the train step must put the frozen teacher's embeddings in the model outputs")
        raise ValueError(f"softclip with guidance={source!r} needs {', '.join(missing)} ({hint})")
    return {f"{m}_guidance": container[keys[m]] for m in needed}


def _softclip_reads(*, guidance: str = "self", pairing: str = "same", **_: Any) -> Reads:
    """The embeddings and scale, plus the guidance features the configured source and pairing use."""
    outputs = ["image_embeddings", "text_embeddings", "logit_scale"]
    modalities = sorted(set(PAIRINGS.get(pairing, ("image", "text"))))
    if guidance == "batch":
        return Reads(outputs=tuple(outputs), batch=tuple(BATCH_GUIDANCE_KEYS[m] for m in modalities))
    if guidance == "outputs":
        outputs += [OUTPUT_GUIDANCE_KEYS[m] for m in modalities]
    return Reads(outputs=tuple(outputs))


@register_term("softclip", reads=_softclip_reads)
def softclip_term(
    outputs: Mapping[str, Any],
    batch: Mapping[str, Any],
    ctx: LossContext,
    *,
    alpha: float = 0.2,
    neg_weight: float = 1.0,
    guidance_temperature: float | None = None,
    guidance: str = "self",
    pairing: str = "same",
) -> tuple[jax.Array, Metrics]:
    """SoftCLIP, L_soft + λ·L_neg (METHODS.md section 2; every default is a reconstruction, [recon]).

    `guidance`: "self" (the model's embeddings under stop-gradient), "batch" (precomputed features in
    batch['guidance_image_features'] / batch['guidance_text_features'], [N, d_g]) or "outputs" (a frozen
    teacher's outputs['teacher_image_embeddings'] / outputs['teacher_text_embeddings']). Metrics:
    `softclip/soft`, `softclip/neg` (unweighted) and `softclip/alpha`.
    """
    _check_knobs(alpha, guidance_temperature, pairing)
    features = _guidance_features(guidance, outputs, batch, pairing)
    soft, neg = softclip_parts(
        outputs["image_embeddings"], outputs["text_embeddings"], outputs["logit_scale"],
        alpha=alpha, guidance_temperature=guidance_temperature, pairing=pairing,
        mask=batch_mask(batch), mesh=ctx.mesh, **features,
    )
    metrics = {"softclip/soft": soft, "softclip/neg": neg, "softclip/alpha": jnp.asarray(alpha, jnp.float32)}
    return soft + float(neg_weight) * neg, metrics
