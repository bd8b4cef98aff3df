"""CLIP (softmax InfoNCE) and SigLIP (sigmoid) losses, memory-bounded across devices.

Semantics follow shared/METHODS.md section 0 and the implementations users trust, OpenCLIP `ClipLoss`
and `SigLipLoss` (values pinned by shared/reference/openclip_losses.npz):

    CLIP:   L = ½[CE_rows(S) + CE_rows(Sᵀ)],                   S = exp(t)·X·Yᵀ
    SigLIP: L = −(1/N)·Σ_ij log σ(z_ij·(exp(t)·x_i·y_j + b)),   z_ij = +1 if i = j else −1

with L2-normalised embeddings X, Y [N, d] and the LOG scale t. Padding rows (mask False) are dropped as
rows and as columns, so a padded batch gives the loss of its valid rows (N = number of valid rows).

Every loss is written once, as a per-block computation: a block of rows (with their global offset)
against a block of columns (with theirs). Without a mesh the block is the whole batch. With a mesh the
global batch is split over the batch axes ('data', 'fsdp'); inside `jax.shard_map` each device owns its
n rows, all-gathers the other modality (its gradient is a reduce-scatter), computes its n×N block and
the partial sums are psum-ed: O(n·N) loss memory per device, never O(N²). SigLIP can instead pass the
text block around a ring (ppermute, N/n steps) so that only an n×n block is live.
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

# ---------------------------------------------------------------------------------------------------
# Per-block computations (shared by the single-device and the sharded forms)
# ---------------------------------------------------------------------------------------------------


def softmax_ce_sum(
    logits: jax.Array, positives: jax.Array, row_mask: jax.Array, col_mask: jax.Array
) -> jax.Array:
    """Σ over valid rows of −log softmax(row over valid columns)[positive column].

    The block must hold all columns of its rows (the softmax needs the whole row). NaN-free even when
    every row or column is masked: invalid rows are zeroed before the logsumexp and after it.
    """
    valid_rows = row_mask[:, None]
    masked = jnp.where(col_mask[None, :], logits, -jnp.inf)
    masked = jnp.where(valid_rows, masked, 0.0)
    log_normaliser = jax.nn.logsumexp(masked, axis=1)
    positive_logit = jnp.sum(jnp.where(positives, logits, 0.0), axis=1)
    return jnp.sum(jnp.where(row_mask, log_normaliser - positive_logit, 0.0))


def _sigmoid_nll_sum(
    logits: jax.Array, positives: jax.Array, row_mask: jax.Array, col_mask: jax.Array
) -> jax.Array:
    """Σ over valid (row, column) pairs of −log σ(z·logit), z = +1 on positives and −1 elsewhere."""
    signs = jnp.where(positives, 1.0, -1.0).astype(logits.dtype)
    nll = -jax.nn.log_sigmoid(signs * logits)
    return jnp.sum(jnp.where(row_mask[:, None] & col_mask[None, :], nll, 0.0))


def _clip_block(
    image_rows: jax.Array,
    text_rows: jax.Array,
    image_all: jax.Array,
    text_all: jax.Array,
    scale: jax.Array,
    row_offset: jax.Array | int,
    row_mask: jax.Array,
    all_mask: jax.Array,
) -> jax.Array:
    """CLIP partial sum of both directions for the owned rows: images→all texts and texts→all images."""
    positives = positive_pairs(image_rows.shape[0], text_all.shape[0], row_offset, 0)
    image_to_text = softmax_ce_sum(pair_logits(image_rows, text_all, scale), positives, row_mask, all_mask)
    text_to_image = softmax_ce_sum(pair_logits(text_rows, image_all, scale), positives, row_mask, all_mask)
    return image_to_text + text_to_image


def _siglip_block(
    image_rows: jax.Array,
    text_cols: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    row_offset: jax.Array | int,
    col_offset: jax.Array | int,
    row_mask: jax.Array,
    col_mask: jax.Array,
) -> jax.Array:
    """SigLIP partial sum of −log σ(z·logit) over an images-block × texts-block."""
    positives = positive_pairs(image_rows.shape[0], text_cols.shape[0], row_offset, col_offset)
    return _sigmoid_nll_sum(pair_logits(image_rows, text_cols, scale, bias), positives, row_mask, col_mask)


# ---------------------------------------------------------------------------------------------------
# Public losses
# ---------------------------------------------------------------------------------------------------


def clip_loss(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    logit_scale: jax.Array | float,
    *,
    mask: jax.Array | None = None,
    mesh: Mesh | None = None,
    batch_axes: Sequence[str] = BATCH_MESH_AXES,
) -> jax.Array:
    """Symmetric softmax InfoNCE, ½[CE_rows(S) + CE_rows(Sᵀ)] with S = exp(logit_scale)·X·Yᵀ.

    Equals OpenCLIP `ClipLoss` (world size 1, or gather-with-grad + local loss at any world size).
    Embeddings are L2-normalised [N, d]; `logit_scale` is the log scale t. `mask` [N] bool marks valid
    rows (False = padding, ignored as rows and columns). With `mesh`, the batch is split over
    `batch_axes` and each device computes its n×N blocks against the all-gathered other modality
    (O(n·N) memory); the result equals the single-device loss. Computed in (at least) float32.
    """
    images, texts, mask, (log_scale,) = prepare_pair(image_embeddings, text_embeddings, mask, [logit_scale])
    scale = jnp.exp(log_scale)
    shards = batch_shards(mesh, batch_axes)
    count = jnp.maximum(jnp.sum(mask), 1).astype(images.dtype)
    if shards == 1:
        total = _clip_block(images, texts, images, texts, scale, 0, mask, mask)
        return total / (2.0 * count)

    axes = tuple(batch_axes)

    def per_device(image_rows: jax.Array, text_rows: jax.Array, row_mask: jax.Array, scale: jax.Array) -> jax.Array:
        offset = image_rows.shape[0] * jax.lax.axis_index(axes)
        image_all = jax.lax.all_gather(image_rows, axes, axis=0, tiled=True)
        text_all = jax.lax.all_gather(text_rows, axes, axis=0, tiled=True)
        all_mask = jax.lax.all_gather(row_mask, axes, axis=0, tiled=True)
        return _clip_block(image_rows, text_rows, image_all, text_all, scale, offset, row_mask, all_mask)

    total = sharded_sum(per_device, mesh, axes, pad_rows([images, texts, mask], shards), [scale])
    return total / (2.0 * count)


def siglip_loss(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    logit_scale: jax.Array | float,
    logit_bias: jax.Array | float,
    *,
    mask: jax.Array | None = None,
    mesh: Mesh | None = None,
    ring: bool = False,
    batch_axes: Sequence[str] = BATCH_MESH_AXES,
) -> jax.Array:
    """Pairwise sigmoid loss, −(1/N)·Σ_ij log σ(z_ij·(exp(t)·x_i·y_j + b)), z_ij = +1 iff i = j.

    Equals OpenCLIP `SigLipLoss` (a sum over all pairs divided by the number of images). `mask` [N] bool
    marks valid rows (N = their number). With `mesh`, each device computes its n rows against all N
    texts: all-gathered (default; n×N live) or, with `ring=True`, passed around the ring of batch shards
    by ppermute in N/n steps (only n×n live, the step rematerialised in the backward pass). All forms
    equal the single-device loss.
    """
    images, texts, mask, (log_scale, bias) = prepare_pair(
        image_embeddings, text_embeddings, mask, [logit_scale, logit_bias]
    )
    scale = jnp.exp(log_scale)
    shards = batch_shards(mesh, batch_axes)
    count = jnp.maximum(jnp.sum(mask), 1).astype(images.dtype)
    if shards == 1:
        return _siglip_block(images, texts, scale, bias, 0, 0, mask, mask) / count

    axes = tuple(batch_axes)

    def gathered(image_rows: jax.Array, text_rows: jax.Array, row_mask: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
        offset = image_rows.shape[0] * jax.lax.axis_index(axes)
        text_all = jax.lax.all_gather(text_rows, axes, axis=0, tiled=True)
        all_mask = jax.lax.all_gather(row_mask, axes, axis=0, tiled=True)
        return _siglip_block(image_rows, text_all, scale, bias, offset, 0, row_mask, all_mask)

    def ringed(image_rows: jax.Array, text_rows: jax.Array, row_mask: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
        n = image_rows.shape[0]
        index = jax.lax.axis_index(axes)
        # Device k sends its current text block to device k+1: after s steps device k holds block k−s.
        to_next = [(k, (k + 1) % shards) for k in range(shards)]

        @jax.checkpoint
        def step(carry: tuple[jax.Array, jax.Array, jax.Array], s: jax.Array) -> tuple[tuple[jax.Array, jax.Array, jax.Array], None]:
            total, text_block, block_mask = carry
            text_block = jax.lax.ppermute(text_block, axes, perm=to_next)
            block_mask = jax.lax.ppermute(block_mask, axes, perm=to_next)
            col_offset = n * ((index - s) % shards)
            total = total + _siglip_block(image_rows, text_block, scale, bias, index * n, col_offset, row_mask, block_mask)
            return (total, text_block, block_mask), None

        own = _siglip_block(image_rows, text_rows, scale, bias, index * n, index * n, row_mask, row_mask)
        (total, _, _), _ = jax.lax.scan(step, (own, text_rows, row_mask), jnp.arange(1, shards))
        return total

    total = sharded_sum(ringed if ring else gathered, mesh, axes, pad_rows([images, texts, mask], shards), [scale, bias])
    return total / count


# ---------------------------------------------------------------------------------------------------
# Loss terms
# ---------------------------------------------------------------------------------------------------


@register_term("clip", reads=Reads(outputs=("image_embeddings", "text_embeddings", "logit_scale")))
def clip_term(outputs: Mapping[str, Any], batch: Mapping[str, Any], ctx: LossContext) -> tuple[jax.Array, Metrics]:
    """The CLIP softmax loss on the model's embeddings and log scale (METHODS.md section 0)."""
    loss = clip_loss(
        outputs["image_embeddings"], outputs["text_embeddings"], outputs["logit_scale"],
        mask=batch_mask(batch), mesh=ctx.mesh,
    )
    return loss, {"clip/scale": jnp.exp(jnp.asarray(outputs["logit_scale"], jnp.float32).reshape(()))}


@register_term("siglip", reads=Reads(outputs=("image_embeddings", "text_embeddings", "logit_scale", "logit_bias")))
def siglip_term(
    outputs: Mapping[str, Any], batch: Mapping[str, Any], ctx: LossContext, *, ring: bool = False
) -> tuple[jax.Array, Metrics]:
    """The SigLIP sigmoid loss; needs `logit_bias` in the outputs. `ring`: ppermute form across devices."""
    if "logit_bias" not in outputs:
        raise ValueError("the 'siglip' loss term needs outputs['logit_bias'] (the model has no bias)")
    loss = siglip_loss(
        outputs["image_embeddings"], outputs["text_embeddings"], outputs["logit_scale"], outputs["logit_bias"],
        mask=batch_mask(batch), mesh=ctx.mesh, ring=ring,
    )
    metrics = {
        "siglip/scale": jnp.exp(jnp.asarray(outputs["logit_scale"], jnp.float32).reshape(())),
        "siglip/bias": jnp.asarray(outputs["logit_bias"], jnp.float32).reshape(()),
    }
    return loss, metrics
