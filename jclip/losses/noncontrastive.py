"""nCLIP: the non-contrastive prototype objective, and xCLIP = CLIP + λ·nCLIP (Zhou et al., arXiv 2210.09304,
CVPR 2023; shared/METHODS.md section 3).

Each modality's prototype logits h [N, K] (from `jclip.models.heads.PrototypeHead`) give a student
distribution p = softmax(h/τ_s) and a stop-gradient target q = Φ(h); each modality's target is the pseudo-label
of the other modality's student:

    L = ½·mean_i [H(q^T_i, p^I_i) + H(q^I_i, p^T_i)],   H(q, p) = −Σ_k q_k log p_k.

Φ prevents collapse, one of (`collapse`):
- "centering": q = softmax((h − c)/τ_t) with an EMA centre c of the global-batch mean of h, c ← m·c +
  (1−m)·mean_i h_i, and sharpening τ_t < τ_s (DINO). The centres are the term's state, kept in the train
  state and checkpointed.
- "sinkhorn": q = Sinkhorn–Knopp equipartition of exp(h/ε) over the global batch (SwAV: 3 iterations,
  ε = 0.05).
- "entropy": q = softmax(h/τ_t), plus λ_a·mean_i H(p_i) − λ_b·H(mean_i p_i) on each student (ME-MAX).

The paper released no code: the head layout, temperatures and weights here are a reconstruction
(METHODS [recon]), every one of them a knob. All batch statistics (centre, Sinkhorn marginals, mean
prediction) are over the global batch: written as global-array operations, GSPMD computes them across
devices with the batch sharded (per-device memory O(n·K)). Padding rows (mask False) are excluded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jclip.losses.terms import LossContext, Metrics, Reads, register_term

COLLAPSE_OPTIONS = ("centering", "sinkhorn", "entropy")
LOGIT_KEYS = {"image": "image_prototype_logits", "text": "text_prototype_logits"}


def _at_least_f32(x: Any) -> jax.Array:
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _valid(mask: jax.Array | None, count: int) -> jax.Array:
    return jnp.ones((count,), jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)


def _masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean over valid rows of `values` [N, ...]."""
    shape = (-1,) + (1,) * (values.ndim - 1)
    return jnp.sum(values * weights.reshape(shape), axis=0) / jnp.maximum(jnp.sum(weights), 1.0)


def sinkhorn_targets(scores: jax.Array, weights: jax.Array, *, epsilon: float, iterations: int) -> jax.Array:
    """SwAV's Sinkhorn–Knopp: rows of exp(scores/ε) rescaled so prototypes share the (valid) batch equally.

    Alternates: each prototype's column sums to 1/K, then each valid row sums to 1/B; returns rows scaled
    to sum to 1 (padding rows are zero). Computed in log space (no overflow at ε = 0.05).
    """
    scores = _at_least_f32(scores) / epsilon
    weights = weights.astype(scores.dtype)
    count = jnp.maximum(jnp.sum(weights), 1.0)
    num_prototypes = scores.shape[1]
    log_rows = jnp.where(weights[:, None] > 0, 0.0, -jnp.inf)
    log_q = scores + log_rows
    log_q = log_q - jax.nn.logsumexp(log_q)  # the whole matrix sums to 1
    for _ in range(iterations):
        log_q = log_q - jax.nn.logsumexp(log_q, axis=0, keepdims=True) - jnp.log(num_prototypes)
        row_norm = jax.nn.logsumexp(log_q, axis=1, keepdims=True)
        log_q = jnp.where(weights[:, None] > 0, log_q - row_norm - jnp.log(count), -jnp.inf)
    return jnp.where(weights[:, None] > 0, jnp.exp(log_q) * count, 0.0)


def _entropy(p: jax.Array, log_p: jax.Array) -> jax.Array:
    return -jnp.sum(jnp.where(p > 0, p * log_p, 0.0), axis=-1)


def _init_centres(abstract_outputs: Mapping[str, Any], **kwargs: Any) -> dict[str, jax.Array]:
    if LOGIT_KEYS["image"] not in abstract_outputs:
        raise ValueError(
            "the 'nclip' loss term needs prototype heads: set config.model.prototype_heads "
            "(e.g. {'num_prototypes': 32768}); see jclip/models/heads.py"
        )
    return {m: jnp.zeros((abstract_outputs[key].shape[-1],), jnp.float32) for m, key in LOGIT_KEYS.items()}


@register_term("nclip", reads=Reads(outputs=tuple(LOGIT_KEYS.values())), init_state=_init_centres)
def nclip_term(
    outputs: Mapping[str, Any],
    batch: Mapping[str, Any],
    ctx: LossContext,
    *,
    collapse: str = "centering",
    student_temperature: float = 0.1,
    teacher_temperature: float = 0.04,
    centre_momentum: float = 0.9,
    sinkhorn_epsilon: float = 0.05,
    sinkhorn_iterations: int = 3,
    entropy_weight: float = 1.0,
    mean_entropy_weight: float = 1.0,
) -> tuple[jax.Array, Metrics, dict[str, jax.Array]]:
    """The cross-modal pseudo-label cross-entropy with the chosen collapse prevention (see the module)."""
    if collapse not in COLLAPSE_OPTIONS:
        raise ValueError(f"nclip: collapse must be one of {COLLAPSE_OPTIONS}, got {collapse!r}")
    for key in LOGIT_KEYS.values():
        if key not in outputs:
            raise ValueError(f"the 'nclip' loss term needs outputs[{key!r}]: set config.model.prototype_heads")
    logits = {m: _at_least_f32(outputs[key]) for m, key in LOGIT_KEYS.items()}
    weights = _valid(batch.get("mask") if hasattr(batch, "get") else None, logits["image"].shape[0])
    weights = weights.astype(logits["image"].dtype)
    centres = ctx.state.get("nclip", {})
    new_centres = {}
    students, log_students, targets = {}, {}, {}
    for modality, h in logits.items():
        log_students[modality] = jax.nn.log_softmax(h / student_temperature, axis=-1)
        students[modality] = jnp.exp(log_students[modality])
        teacher_logits = jax.lax.stop_gradient(h)
        if collapse == "centering":
            centre = centres[modality]
            targets[modality] = jax.nn.softmax((teacher_logits - centre) / teacher_temperature, axis=-1)
            batch_mean = _masked_mean(teacher_logits, weights)
            new_centres[modality] = centre_momentum * centre + (1.0 - centre_momentum) * batch_mean
        elif collapse == "sinkhorn":
            targets[modality] = sinkhorn_targets(
                teacher_logits, weights, epsilon=sinkhorn_epsilon, iterations=sinkhorn_iterations
            )
        else:
            targets[modality] = jax.nn.softmax(teacher_logits / teacher_temperature, axis=-1)
        targets[modality] = jax.lax.stop_gradient(targets[modality])

    cross_entropy = {
        "image": _masked_mean(-jnp.sum(targets["text"] * log_students["image"], axis=-1), weights),
        "text": _masked_mean(-jnp.sum(targets["image"] * log_students["text"], axis=-1), weights),
    }
    loss = 0.5 * (cross_entropy["image"] + cross_entropy["text"])
    metrics: Metrics = {}
    for modality in LOGIT_KEYS:
        mean_prediction = _masked_mean(students[modality], weights)
        mean_entropy = _entropy(mean_prediction, jnp.log(jnp.maximum(mean_prediction, 1e-30)))
        sample_entropy = _masked_mean(_entropy(students[modality], log_students[modality]), weights)
        if collapse == "entropy":
            loss = loss + 0.5 * (entropy_weight * sample_entropy - mean_entropy_weight * mean_entropy)
        # exp(H(mean p)): how many prototypes the batch effectively uses (1 = collapsed).
        metrics[f"nclip/{modality}_prototypes_used"] = jnp.exp(mean_entropy)
    metrics["nclip/cross_entropy"] = 0.5 * (cross_entropy["image"] + cross_entropy["text"])
    return loss, metrics, (new_centres if collapse == "centering" else dict(centres))
