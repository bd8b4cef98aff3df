"""The toy method's loss term: each image against its caption and that caption's K word-shuffled copies.

Reads the batch field `shuffled_token_ids` [B, K, L] (for which shuffles differ from the caption) and the
model outputs `shuffled_text_embeddings` [B, K, d] (the text tower on that field), `text_tokens` with
`text_token_mask`, the pooled embeddings and the log scale. Per example:

    ce_i    = -log softmax([s·x_i·y_i, s·x_i·n_i1, ..., s·x_i·n_iK])[0]      (copies equal to the caption left out)
    align_i = mean over the caption's valid tokens t of cos(token_t, x_i)
    loss    = mean_i ce_i + 0.1 · mean_i (1 − align_i)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jclip.losses import Reads, register_term


@register_term("toy_hard_negatives", reads=Reads(
    outputs=("image_embeddings", "text_embeddings", "shuffled_text_embeddings", "text_tokens", "text_token_mask",
             "logit_scale"),
    batch=("token_ids", "shuffled_token_ids"),
))
def toy_hard_negatives(outputs, batch, ctx, *, token_weight: float = 0.1):
    images = outputs["image_embeddings"]
    scale = jnp.exp(outputs["logit_scale"])
    positive = scale * jnp.sum(images * outputs["text_embeddings"], axis=-1)
    negatives = scale * jnp.einsum("bd,bkd->bk", images, outputs["shuffled_text_embeddings"])
    differs = jnp.any(batch["shuffled_token_ids"] != batch["token_ids"][:, None, :], axis=-1)
    logits = jnp.concatenate([positive[:, None], jnp.where(differs, negatives, -jnp.inf)], axis=1)
    cross_entropy = jax.nn.logsumexp(logits, axis=1) - positive
    tokens = outputs["text_tokens"] / jnp.linalg.norm(outputs["text_tokens"], axis=-1, keepdims=True)
    mask = outputs["text_token_mask"]
    cosine = jnp.einsum("bld,bd->bl", tokens, images)
    alignment = jnp.sum(jnp.where(mask, cosine, 0.0), axis=1) / jnp.sum(mask, axis=1)
    loss = jnp.mean(cross_entropy) + token_weight * jnp.mean(1.0 - alignment)
    return loss, {"toy/negatives_used": jnp.mean(differs), "toy/token_alignment": jnp.mean(alignment)}
