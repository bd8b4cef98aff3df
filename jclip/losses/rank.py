"""RankCLIP (Zhang et al., arXiv 2404.09387, ICCV 2025): list-wise ranking consistency on top of CLIP.

Semantics follow shared/METHODS.md section 1 and the official code (Jam1ezhang/RankCLIP,
`rankclip/rank_losses.py::list_MLE` and `rankclip/train.py::get_loss`; values pinned by
shared/reference/rankclip_official.npz):

    ListMLE(P, Q) = mean_i Σ_k [ log(ε + Σ_{m≥k} exp(P_iπ(m) − M_i)) + M_i − P_iπ(k) ],
                    π = the descending order of Q_i (stop-gradient, ties at random), M_i = max_j P_ij
    L_cross = ListMLE(S, Sᵀ) + ListMLE(Sᵀ, S),          S = s·X·Yᵀ
    L_in    = ListMLE(S_II, S_TT) + ListMLE(S_TT, S_II), S_II = s·X·Xᵀ, S_TT = s·Y·Yᵀ
    term    = w·(L_cross + L_in) / (32·N)

which is added to the `clip` term by the config (configs/rankclip.py). ε = 1e-10 is the official
numerics (ε = 0 is the exact Plackett–Luce likelihood); the tail sums are formed as a reverse cumulative
logsumexp, so that ε = 0 stays finite at any logit scale.

Across devices (METHODS section 0): each device owns n rows and all-gathers the other modality (and, for
the in-modal term, its own modality), so it holds the n×N row blocks of S and Sᵀ (and of S_II, S_TT) and
sorts its n rows of length N: O(n·N) memory per device, never O(N²). Row i of Sᵀ is text i against all
images, so the block of Sᵀ is s·Y_rows·X_allᵀ; it is the target of the S block and the scores of the
other direction, and likewise for the in-modal pair.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jclip.losses.sharded import batch_mask, batch_shards, pad_rows, pair_logits, prepare_pair, sharded_sum
from jclip.losses.terms import LossContext, Metrics, Reads, register_term
from jclip.parallel import BATCH_MESH_AXES

# Official normalisation: get_loss divides each direction pair by 32 and by the batch size.
RANK_DIVISOR = 32.0

# ---------------------------------------------------------------------------------------------------
# ListMLE
# ---------------------------------------------------------------------------------------------------


def descending_order(targets: jax.Array, col_mask: jax.Array, tie_permutation: jax.Array | None) -> jax.Array:
    """[n, L] int32: per row, the column indices sorted by target descending; masked columns last.

    Ties go by column index (a stable sort), or, with `tie_permutation` (a random permutation of the L
    columns), by the position in it: the official code's randperm of the columns before its sort.
    """
    sort_key = jnp.where(col_mask[None, :], -targets, jnp.inf)
    columns = jax.lax.broadcasted_iota(jnp.int32, targets.shape, 1)
    if tie_permutation is not None:
        sort_key = jnp.take(sort_key, tie_permutation, axis=1)
        columns = jnp.broadcast_to(tie_permutation.astype(jnp.int32)[None, :], targets.shape)
    return jax.lax.sort((sort_key, columns), dimension=1, num_keys=1, is_stable=True)[-1]


def _position_discounts(length: int, dtype: jnp.dtype) -> jax.Array:
    """1/ln(k+1) for the 1-based positions k = 1..length (the ICLR text's position discount)."""
    return 1.0 / jnp.log(jnp.arange(2, length + 2, dtype=dtype))


def _list_mle_rows(
    scores: jax.Array,
    targets: jax.Array,
    col_mask: jax.Array,
    *,
    eps: float,
    position_weight: bool,
    tie_permutation: jax.Array | None,
) -> jax.Array:
    """[n] per-row Plackett–Luce negative log-likelihood of the targets' order under the scores.

    Rows must hold all columns (the whole list). Masked columns are ranked last and contribute nothing,
    neither as summands nor inside the tail sums. With ε > 0 the tail sums are the official
    log(ε + Σ_{m≥k} exp(s_m − max)) by a reverse cumulative sum (a tail that underflows, < 1e-38 in
    float32, is far below any practical ε, so nothing is lost); ε = 0 takes a reverse cumulative logsumexp instead, exact at any scale (but slower
    to compile and run on CPU).
    """
    order = descending_order(jax.lax.stop_gradient(targets), col_mask, tie_permutation)
    valid = jnp.take_along_axis(jnp.broadcast_to(col_mask[None, :], scores.shape), order, axis=1)
    row_max = jnp.max(jnp.where(col_mask[None, :], scores, -jnp.inf), axis=1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # rows whose columns are all masked
    shifted = jnp.take_along_axis(scores, order, axis=1) - row_max
    if eps > 0.0:
        tails = jax.lax.cumsum(jnp.where(valid, jnp.exp(jnp.where(valid, shifted, 0.0)), 0.0), axis=1, reverse=True)
        log_tail = jnp.log(tails + eps)
    else:  # −inf on the masked tail (cotangent 0 there)
        log_tail = jax.lax.cumlogsumexp(jnp.where(valid, shifted, -jnp.inf), axis=1, reverse=True)
    summands = jnp.where(valid, log_tail - jnp.where(valid, shifted, 0.0), 0.0)
    if position_weight:
        summands = summands * _position_discounts(scores.shape[1], scores.dtype)[None, :]
    return jnp.sum(summands, axis=1)


def list_mle(
    scores: jax.Array,
    targets: jax.Array,
    *,
    eps: float = 1e-10,
    position_weight: bool = False,
    tie_key: jax.Array | None = None,
    row_mask: jax.Array | None = None,
    col_mask: jax.Array | None = None,
) -> jax.Array:
    """ListMLE (Xia et al. 2008) as RankCLIP's official `list_MLE`: mean over rows of the Plackett–Luce NLL.

    Per row i, π sorts `targets[i]` descending (stop-gradient; ties at random with `tie_key`, else by
    column index) and loss_i = Σ_k [log(ε + Σ_{m≥k} exp(s_π(m) − max)) + max − s_π(k)], optionally with
    the summand at 1-based position k discounted by 1/ln(k+1). `eps` = 0 gives the exact likelihood.
    `col_mask` [L] drops columns from the ranking and the likelihood; `row_mask` [n] drops rows from the
    mean. Vectorised over rows; computed in at least float32.
    """
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(f"expected scores and targets of the same shape [n, L], got {scores.shape} and {targets.shape}")
    if eps < 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    n, length = scores.shape
    dtype = jnp.result_type(jnp.float32, scores.dtype)
    row_mask = jnp.ones((n,), bool) if row_mask is None else jnp.asarray(row_mask, bool)
    col_mask = jnp.ones((length,), bool) if col_mask is None else jnp.asarray(col_mask, bool)
    if row_mask.shape != (n,) or col_mask.shape != (length,):
        raise ValueError(f"row_mask must be [{n}] and col_mask [{length}], got {row_mask.shape} and {col_mask.shape}")
    permutation = None if tie_key is None else jax.random.permutation(tie_key, length)
    rows = _list_mle_rows(
        scores.astype(dtype), targets.astype(dtype), col_mask, eps=eps, position_weight=position_weight,
        tie_permutation=permutation,
    )
    count = jnp.maximum(jnp.sum(row_mask), 1).astype(dtype)
    return jnp.sum(jnp.where(row_mask, rows, 0.0)) / count


# ---------------------------------------------------------------------------------------------------
# RankCLIP's two terms, per block of rows and across devices
# ---------------------------------------------------------------------------------------------------


def _rank_block(
    image_rows: jax.Array,
    text_rows: jax.Array,
    image_all: jax.Array,
    text_all: jax.Array,
    scale: jax.Array,
    row_mask: jax.Array,
    all_mask: jax.Array,
    tie_key: jax.Array | None,
    *,
    cross_modal: bool,
    in_modal: bool,
    eps: float,
    position_weight: bool,
) -> jax.Array:
    """[2]: Σ over the owned valid rows of (cross-modal, in-modal) ListMLE, both directions each."""

    def pair_sum(a: jax.Array, b: jax.Array, which: int) -> jax.Array:
        """Rows of ListMLE(A, B) + rows of ListMLE(B, A), summed over valid rows."""
        total = jnp.zeros((), a.dtype)
        for direction, (scores, targets) in enumerate(((a, b), (b, a))):
            permutation = None
            if tie_key is not None:  # one permutation per ListMLE, as the official randperm per call
                permutation = jax.random.permutation(jax.random.fold_in(tie_key, 2 * which + direction), a.shape[1])
            rows = _list_mle_rows(
                scores, targets, all_mask, eps=eps, position_weight=position_weight, tie_permutation=permutation
            )
            total = total + jnp.sum(jnp.where(row_mask, rows, 0.0))
        return total

    zero = jnp.zeros((), image_rows.dtype)
    cross = zero
    if cross_modal:  # rows of S (image -> texts) and of Sᵀ (text -> images)
        cross = pair_sum(pair_logits(image_rows, text_all, scale), pair_logits(text_rows, image_all, scale), 0)
    inmodal = zero
    if in_modal:  # rows of S_II and S_TT
        inmodal = pair_sum(pair_logits(image_rows, image_all, scale), pair_logits(text_rows, text_all, scale), 1)
    return jnp.stack([cross, inmodal])


def rankclip_losses(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    logit_scale: jax.Array | float,
    *,
    cross_modal: bool = True,
    in_modal: bool = True,
    eps: float = 1e-10,
    position_weight: bool = False,
    tie_key: jax.Array | None = None,
    mask: jax.Array | None = None,
    mesh: Mesh | None = None,
    batch_axes: Sequence[str] = BATCH_MESH_AXES,
) -> tuple[jax.Array, jax.Array]:
    """(L_cross, L_in): ListMLE(S, Sᵀ) + ListMLE(Sᵀ, S) and ListMLE(S_II, S_TT) + ListMLE(S_TT, S_II).

    Unweighted and unnormalised (each a sum of two row means); a disabled term is 0. Embeddings are
    L2-normalised [N, d], `logit_scale` the log scale t (scale s = exp t). `mask` [N] marks valid rows
    (padding is dropped as rows and as columns). With `mesh`, each device ranks its own rows against the
    all-gathered N columns (O(n·N) memory); the result equals the single-device one, also with random
    ties (`tie_key`: one column permutation per ListMLE, the same on every device) as long as N needs no
    padding to the shard count.
    """
    if eps < 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    images, texts, mask, (log_scale,) = prepare_pair(image_embeddings, text_embeddings, mask, [logit_scale])
    scale = jnp.exp(log_scale)
    options = dict(cross_modal=cross_modal, in_modal=in_modal, eps=eps, position_weight=position_weight)
    count = jnp.maximum(jnp.sum(mask), 1).astype(images.dtype)
    shards = batch_shards(mesh, batch_axes)
    if shards == 1:
        sums = _rank_block(images, texts, images, texts, scale, mask, mask, tie_key, **options)
        return sums[0] / count, sums[1] / count

    axes = tuple(batch_axes)

    def per_device(image_rows: jax.Array, text_rows: jax.Array, row_mask: jax.Array, scale: jax.Array, *key: jax.Array) -> jax.Array:
        image_all = jax.lax.all_gather(image_rows, axes, axis=0, tiled=True)
        text_all = jax.lax.all_gather(text_rows, axes, axis=0, tiled=True)
        all_mask = jax.lax.all_gather(row_mask, axes, axis=0, tiled=True)
        return _rank_block(
            image_rows, text_rows, image_all, text_all, scale, row_mask, all_mask, key[0] if key else None, **options
        )

    replicated = [scale] + ([] if tie_key is None else [tie_key])
    sums = sharded_sum(per_device, mesh, axes, pad_rows([images, texts, mask], shards), replicated)
    return sums[0] / count, sums[1] / count


def ramp_weight(
    step: jax.Array | int, total_steps: int, *, rate: float = 3.0, maximum: float = 2.0, dtype: Any = jnp.float32
) -> jax.Array:
    """w = clip(rate·progress, 0, maximum), progress = clip(step / total_steps, 0, 1) (as LossContext.progress).

    The step form of the official epoch ramp w(e) = clip(3(e−1)/(E−1), 0, 2): at progress = (e−1)/(E−1)
    both give the same value (the official one is a staircase, constant within an epoch). With the
    defaults w is 0 at step 0 and reaches its cap 2 at two thirds of training.
    """
    progress = jnp.clip(jnp.asarray(step, dtype) / max(int(total_steps), 1), 0.0, 1.0)
    return jnp.clip(rate * progress, 0.0, maximum)


@register_term("rankclip", reads=Reads(outputs=("image_embeddings", "text_embeddings", "logit_scale")))
def rankclip_term(
    outputs: Mapping[str, Any],
    batch: Mapping[str, Any],
    ctx: LossContext,
    *,
    cross_modal: bool = True,
    in_modal: bool = True,
    eps: float = 1e-10,
    position_weight: bool = False,
    ramp_rate: float = 3.0,
    ramp_max: float = 2.0,
    random_ties: bool = True,
) -> tuple[jax.Array, Metrics]:
    """RankCLIP's rank term w·(L_cross + L_in)/(32·N), to be added to the `clip` term (METHODS section 1).

    Defaults reproduce the official objective (get_loss with both rank terms on, λ1 = λ2 = 1; its
    `inmodal` flag is the separate augmented-view contrastive loss, not this in-modal rank term): ε = 1e-10,
    no position discount, the ramp clip(3·progress, 0, 2), ties broken at random (needs ctx.rng; the
    official code shuffles the columns before sorting). Metrics: `rankclip/weight` (w),
    `rankclip/cross` and `rankclip/in_modal` (L_cross and L_in, unweighted).
    """
    if not (cross_modal or in_modal):
        raise ValueError("the 'rankclip' loss term needs cross_modal or in_modal (both are off)")
    if random_ties and ctx.rng is None:
        raise ValueError("the 'rankclip' loss term with random_ties=True needs ctx.rng (or set random_ties=False)")
    tie_key = jax.random.fold_in(ctx.rng, 0x52414E4B) if random_ties else None  # "RANK": a stream of its own
    cross, inmodal = rankclip_losses(
        outputs["image_embeddings"], outputs["text_embeddings"], outputs["logit_scale"],
        cross_modal=cross_modal, in_modal=in_modal, eps=eps, position_weight=position_weight, tie_key=tie_key,
        mask=batch_mask(batch), mesh=ctx.mesh,
    )
    mask = batch_mask(batch)
    n_valid = outputs["image_embeddings"].shape[0] if mask is None else jnp.sum(jnp.asarray(mask, bool))
    count = jnp.maximum(jnp.asarray(n_valid, cross.dtype), 1.0)
    weight = ramp_weight(ctx.step, ctx.total_steps, rate=ramp_rate, maximum=ramp_max, dtype=cross.dtype)
    loss = weight * (cross + inmodal) / (RANK_DIVISOR * count)
    metrics = {
        "rankclip/weight": weight.astype(jnp.float32),
        "rankclip/cross": cross.astype(jnp.float32),
        "rankclip/in_modal": inmodal.astype(jnp.float32),
    }
    return loss, metrics
