"""Pooling and projection heads of the pretrained text towers, chosen by config (`pool`, `proj`).

Token ids use the pretrained tokenizers' padding, -1 (`jclip.data.tokenizer.PretrainedTokenizer`), so the mask
of real tokens is `ids >= 0`. Poolings, after OpenCLIP's HF poolers and the last-token pooling of decoder
embedding models:

- `mean`: the mean over real tokens (sentence-transformers' all-MiniLM pooling);
- `cls`: the first token (BERT's [CLS] hidden state, without BERT's dense+tanh pooler);
- `last`: the last real token (a decoder's only token that has read the whole text under a causal mask);
- `eos`: the first token whose id is `eos_id` (the last real token where there is none).

Projections onto the shared embedding space: `none` (the pooled width must equal `output_dim`), `linear`
(bias-free, OpenCLIP's `hf_proj_type="linear"`) or `mlp` (bias-free Linear, erf GELU, Linear with the hidden
width (width + output_dim) // 2, OpenCLIP's `hf_proj_type="mlp"`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jclip.models.layers import exact_gelu, logical_param, normal
from jclip.models.towers import TowerModule
from jclip.parallel import constrain

POOLS = ("mean", "cls", "last", "eos")
PROJECTIONS = ("none", "linear", "mlp")


def token_mask(token_ids: jax.Array) -> jax.Array:
    """True at real tokens (padding is -1)."""
    return token_ids >= 0


def last_positions(mask: jax.Array) -> jax.Array:
    """The index of each row's last real token (0 for a row without any)."""
    return jnp.maximum(jnp.sum(mask, axis=-1) - 1, 0)


def pool(hidden: jax.Array, token_ids: jax.Array, kind: str, eos_id: int | None = None) -> jax.Array:
    """[batch, length, width] -> [batch, width] by `kind` (see the module docstring)."""
    mask = token_mask(token_ids)
    if kind == "mean":
        weights = mask.astype(jnp.float32)[..., None]
        total = jnp.sum(hidden.astype(jnp.float32) * weights, axis=1)
        return total / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    if kind == "cls":
        return hidden[:, 0]
    positions = last_positions(mask)
    if kind == "eos":
        if eos_id is None:
            raise ValueError("pool 'eos' needs the tower's eos_id")
        is_eos = token_ids == eos_id
        positions = jnp.where(jnp.any(is_eos, axis=-1), jnp.argmax(is_eos, axis=-1), positions)
    elif kind != "last":
        raise ValueError(f"unknown pool {kind!r}; one of {POOLS}")
    return jnp.take_along_axis(hidden, positions[:, None, None], axis=1)[:, 0]


class Projection(nnx.Module):
    """`none`, `linear` or `mlp` (see the module docstring); float32 output."""

    def __init__(self, kind: str, width: int, output_dim: int, *, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs | None = None) -> None:
        if kind not in PROJECTIONS:
            raise ValueError(f"unknown projection {kind!r}; one of {PROJECTIONS}")
        if kind == "none" and width != output_dim:
            raise ValueError(f"projection 'none' needs the tower's width ({width}) to equal output_dim ({output_dim})")
        self.kind = kind
        kernel = hidden_kernel = None
        if kind == "linear":
            kernel = logical_param(rngs, normal(width ** -0.5), (width, output_dim), ("embed", "proj"), param_dtype)
        elif kind == "mlp":
            hidden = (width + output_dim) // 2
            hidden_kernel = logical_param(rngs, normal(width ** -0.5), (width, hidden), ("embed", "mlp"), param_dtype)
            kernel = logical_param(rngs, normal(hidden ** -0.5), (hidden, output_dim), ("mlp", "proj"), param_dtype)
        self.kernel = nnx.data(kernel)
        self.hidden_kernel = nnx.data(hidden_kernel)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        if self.hidden_kernel is not None:
            x = exact_gelu(jnp.dot(x, self.hidden_kernel[...].astype(jnp.float32)))
        if self.kernel is not None:
            x = jnp.dot(x, self.kernel[...].astype(jnp.float32))
        return x


class PooledTextTower(TowerModule):
    """What the pretrained text towers share: `hidden_states(token_ids)` (each tower's own), pooled by `pool`
    and projected by `projection`; the token outputs are every hidden state projected, masked as ids >= 0."""

    pool: str
    eos_id: int | None
    projection: Projection

    def hidden_states(self, token_ids: jax.Array) -> jax.Array:
        raise NotImplementedError

    def project(self, hidden: jax.Array) -> jax.Array:
        return self.projection(hidden)

    def encode(self, token_ids: jax.Array, *, tokens: bool = False) -> dict[str, jax.Array]:
        hidden = self.hidden_states(token_ids)
        pooled = constrain(pool(hidden, token_ids, self.pool, self.eos_id), ("batch", "act_embed"))
        outputs = {"features": self.project(pooled)}
        if tokens:
            outputs["tokens"] = self.project(hidden)
            outputs["token_mask"] = token_mask(token_ids)
        return outputs


def check_head(where: str, config: dict[str, Any]) -> None:
    """ValueError naming `where.pool` / `where.proj` for unknown choices."""
    if config["pool"] not in POOLS:
        raise ValueError(f"{where}.pool must be one of {POOLS}, got {config['pool']!r}")
    if config["proj"] not in PROJECTIONS:
        raise ValueError(f"{where}.proj must be one of {PROJECTIONS}, got {config['proj']!r}")
    if config["pool"] == "eos" and config.get("eos_id") is None:
        raise ValueError(f"{where}.pool 'eos' needs {where}.eos_id")
