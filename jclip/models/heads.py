"""Prototype heads for nCLIP/xCLIP (Zhou et al., arXiv 2210.09304; shared/METHODS.md section 3).

Per modality: an MLP, an L2-normalised bottleneck, and a weight-normalised linear layer onto K prototypes
(the DINO head layout the nCLIP paper adopts). The head is separate from CLIP's projections; its outputs
are prototype logits h [batch, K], turned into distributions by the nCLIP loss (`jclip.losses.noncontrastive`).
The paper uses K = 32768; the layer sizes are a reconstruction (METHODS [recon]) and all configurable.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jclip.models.layers import Dense, exact_gelu, l2_normalize, logical_param, normal

HEAD_KEYS = {"num_prototypes", "hidden_dim", "bottleneck_dim", "layers"}
HEAD_DEFAULTS = {"num_prototypes": 32768, "hidden_dim": 2048, "bottleneck_dim": 256, "layers": 3}


class PrototypeHead(nnx.Module):
    """features [batch, in_dim] -> prototype logits [batch, K] (cosine similarity to each prototype)."""

    def __init__(self, in_dim: int, *, num_prototypes: int, hidden_dim: int, bottleneck_dim: int, layers: int,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs) -> None:
        if layers < 1:
            raise ValueError(f"a prototype head needs at least 1 MLP layer, got {layers}")
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        self.mlp = nnx.List([
            Dense(a, b, logical_axes=("embed", "mlp"), stddev=0.02, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for a, b in zip(dims[:-1], dims[1:])
        ])
        # Weight normalisation with the gain fixed at 1 (DINO): only the prototype directions are learned.
        self.prototypes = logical_param(rngs, normal(0.02), (bottleneck_dim, num_prototypes), ("embed", "prototypes"), param_dtype)

    def __call__(self, features: jax.Array) -> jax.Array:
        x = features
        for index, layer in enumerate(self.mlp):
            x = layer(x)
            if index < len(self.mlp) - 1:
                x = exact_gelu(x)
        x = l2_normalize(x)
        prototypes = self.prototypes[...].astype(jnp.float32)
        prototypes = prototypes / jnp.linalg.norm(prototypes, axis=0, keepdims=True)
        return jnp.dot(x, prototypes, precision=jax.lax.Precision.HIGHEST)


def head_config(config: Mapping[str, Any] | None) -> dict[str, int] | None:
    """The head settings with defaults filled in, checked; None when the model has no heads."""
    if config is None:
        return None
    config = dict(config.items())
    unknown = set(config) - HEAD_KEYS
    if unknown:
        raise ValueError(f"unknown model.prototype_heads keys {sorted(unknown)}; allowed: {sorted(HEAD_KEYS)}")
    merged = {**HEAD_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    return {key: int(value) for key, value in merged.items()}
