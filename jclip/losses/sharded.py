"""Building blocks shared by every memory-bounded, cross-example loss family (contrastive, rank, soft, ...).

A cross-example loss is written once, as a per-block computation: a device's own rows (with their global
offset) against the gathered columns of the other side. `sharded_sum` runs such a block on every batch shard
inside `jax.shard_map` and psums the partial sums, so per-device memory is O(n·N), never O(N²)
(shared/ARCHITECTURE.md, principle 4). Without a mesh the block is the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P


def batch_mask(batch: Mapping[str, Any]) -> jax.Array | None:
    return batch.get("mask") if hasattr(batch, "get") else None


def compute_dtype(*arrays: jax.Array) -> jnp.dtype:
    """At least float32 (bf16 activations are upcast); float64 stays float64 (reference tests)."""
    return jnp.result_type(jnp.float32, *(jnp.result_type(a) for a in arrays))


def prepare_pair(
    image_embeddings: jax.Array, text_embeddings: jax.Array, mask: jax.Array | None, scalars: Sequence[Any]
) -> tuple[jax.Array, jax.Array, jax.Array, list[jax.Array]]:
    """Checks shapes, casts to the compute dtype, builds the default all-valid mask, scalars to shape ()."""
    if image_embeddings.ndim != 2 or image_embeddings.shape != text_embeddings.shape:
        raise ValueError(
            f"expected image and text embeddings of the same shape [N, d], got {image_embeddings.shape} "
            f"and {text_embeddings.shape}"
        )
    dtype = compute_dtype(image_embeddings, text_embeddings)
    n = image_embeddings.shape[0]
    if mask is None:
        mask = jnp.ones((n,), bool)
    elif jnp.shape(mask) != (n,):
        raise ValueError(f"mask must have shape ({n},), got {jnp.shape(mask)}")
    scalars = [jnp.asarray(s, dtype).reshape(()) for s in scalars]
    return image_embeddings.astype(dtype), text_embeddings.astype(dtype), jnp.asarray(mask, bool), scalars


def pair_logits(rows: jax.Array, cols: jax.Array, scale: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """scale·rows·colsᵀ (+ bias), [n, m]; HIGHEST precision so TPUs do not round the logits to bf16.

    The scale multiplies the [n, d] rows, not the [n, m] product: the scale's gradient then needs no
    extra [n, m] residual (a third less loss memory in fwd+bwd, measured).
    """
    logits = jnp.einsum("nd,md->nm", rows * scale, cols, precision=jax.lax.Precision.HIGHEST)
    return logits if bias is None else logits + bias


def positive_pairs(n_rows: int, n_cols: int, row_offset: jax.Array | int, col_offset: jax.Array | int) -> jax.Array:
    """[n, m] bool: True where global row index == global column index (the matching pair)."""
    rows = row_offset + jnp.arange(n_rows)
    cols = col_offset + jnp.arange(n_cols)
    return rows[:, None] == cols[None, :]


def batch_shards(mesh: Mesh | None, batch_axes: Sequence[str]) -> int:
    if mesh is None:
        return 1
    missing = [a for a in batch_axes if a not in mesh.shape]
    if missing:
        raise ValueError(f"batch axes {missing} are not axes of the mesh {dict(mesh.shape)}")
    return int(np.prod([mesh.shape[a] for a in batch_axes]))


def pad_rows(arrays: Sequence[jax.Array], multiple: int) -> list[jax.Array]:
    """Pads the leading dimension to a multiple of `multiple` (the mask with False, so padding is ignored)."""
    n = arrays[0].shape[0]
    extra = -n % multiple
    if not extra:
        return list(arrays)
    return [jnp.pad(a, [(0, extra)] + [(0, 0)] * (a.ndim - 1)) for a in arrays]


def sharded_sum(
    per_device: Callable[..., jax.Array],
    mesh: Mesh,
    batch_axes: Sequence[str],
    row_arrays: Sequence[jax.Array],
    scalars: Sequence[jax.Array],
) -> jax.Array:
    """Runs `per_device(*row_shards, *scalars)` on each batch shard and returns the psum of its result.

    `row_arrays` (leading dimension = global batch, already padded to a multiple of the shard count) are
    split over the batch axes; `scalars` are replicated. Manual only over the batch axes, so other mesh
    axes (e.g. 'tensor', Auto) stay under GSPMD.
    """
    axes = tuple(batch_axes)

    def body(*args: jax.Array) -> jax.Array:
        return jax.lax.psum(per_device(*args), axes)

    in_specs = tuple(P(axes, *([None] * (a.ndim - 1))) for a in row_arrays) + (P(),) * len(scalars)
    mapped = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=P(), axis_names=set(axes))
    return mapped(*row_arrays, *scalars)
