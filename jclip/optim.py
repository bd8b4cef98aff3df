"""The optimizer of every config: AdamW with linear warm-up then cosine decay, global-norm clipping.

No weight decay on norms, biases, embeddings and the logit scale/bias (only on matrices and kernels).
Per-parameter learning-rate multipliers (jclip.param_rules) scale the final updates.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

NO_DECAY_NAME_PARTS = ("embedding", "logit_", "norm", "bias", "ln_")


def path_name(path: tuple[Any, ...]) -> str:
    """'/'-joined key names of a pytree path (dict keys, attributes, indices)."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def decays(path: tuple[Any, ...], leaf: Any) -> bool:
    """Weight decay only on matrices and kernels; never on norms, biases, embeddings, logit scale/bias."""
    name = path_name(path).lower()
    return getattr(leaf, "ndim", 0) >= 2 and not any(part in name for part in NO_DECAY_NAME_PARTS)


def decay_mask(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(decays, params)


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    optim = config.optim
    warmup = min(int(optim.warmup_steps), max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=float(optim.learning_rate),
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=float(optim.learning_rate) * float(optim.min_learning_rate_ratio),
    )


def scale_by_multipliers(multipliers: Any) -> optax.GradientTransformation:
    """Multiplies each update by its parameter's multiplier (a tree like the updates). After AdamW's
    learning-rate scaling this is a learning rate of multiplier x lr, decoupled decay included (to rounding;
    exactly for a power of two)."""
    return optax.stateless(lambda updates, params=None: jax.tree.map(lambda u, m: u * m, updates, multipliers))


def make_optimizer(config: ml_collections.ConfigDict, lr_multipliers: Any = None) -> optax.GradientTransformation:
    """The optimizer of the trainable parameters; `lr_multipliers` (a tree like them, or None for all 1)
    comes from `param_rules.Partition.lr_multipliers`."""
    optim = config.optim
    adamw = optax.adamw(
        learning_rate_schedule(config, int(config.total_steps)),
        b1=float(optim.b1),
        b2=float(optim.b2),
        eps=float(optim.eps),
        weight_decay=float(optim.weight_decay),
        mask=decay_mask,
    )
    if lr_multipliers is not None:
        adamw = optax.chain(adamw, scale_by_multipliers(lr_multipliers))
    if float(optim.grad_clip_norm) > 0:
        return optax.chain(optax.clip_by_global_norm(float(optim.grad_clip_norm)), adamw)
    return adamw
