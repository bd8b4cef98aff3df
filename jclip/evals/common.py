"""What every evaluator shares: sharded embedding of a split or a list of texts, gathered on every host.

Evaluation batches are padded with masked examples so every process runs the same number of steps; the
gathered rows are put back in the split's order by their `index`, and padding is dropped, so no example
is counted twice or lost.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jclip import parallel
from jclip.data import pipeline
from jclip.data.tokenizer import make_tokenizer

EncodeFn = Callable[[Any, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Encoders:
    """Jitted, sharded encoders: (params, global images or token ids) -> L2-normalised embeddings."""

    encode_images: EncodeFn
    encode_texts: EncodeFn
    mesh: Mesh
    context_length: int
    tokenizer_spec: str = "clip"


def gather_to_host(array: jax.Array) -> np.ndarray:
    """A global (batch-sharded) array as a full NumPy array on every process."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(array))
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def embed_split(
    params: Any,
    encoders: Encoders,
    source: pipeline.RandomAccessSource,
    preprocess: Callable[[dict[str, Any]], dict[str, np.ndarray]],
    *,
    batch_size: int,
    limit: int | None = None,
    extra_keys: Sequence[str] = (),
) -> dict[str, np.ndarray]:
    """Image and text embeddings (and `extra_keys`) of a split, in split order, on every host."""
    shard = pipeline.HostShard.current()
    _, batches = pipeline.evaluation_batches(source, preprocess, global_batch_size=batch_size, shard=shard, limit=limit)
    collected: dict[str, list[np.ndarray]] = {}
    for host_batch in batches:
        global_batch = parallel.host_batch_to_global(host_batch, encoders.mesh)
        rows = {
            "image_embeddings": encoders.encode_images(params, global_batch["images"]),
            "text_embeddings": encoders.encode_texts(params, global_batch["token_ids"]),
            "index": global_batch["index"],
            "mask": global_batch["mask"],
            **{key: global_batch[key] for key in extra_keys},
        }
        for key, value in rows.items():
            collected.setdefault(key, []).append(gather_to_host(value))
    merged = {key: np.concatenate(values) for key, values in collected.items()}
    keep = merged.pop("mask")
    order = np.argsort(merged["index"][keep], kind="stable")
    return {key: value[keep][order] for key, value in merged.items()}


def embed_texts(params: Any, encoders: Encoders, texts: Sequence[str], *, batch_size: int) -> np.ndarray:
    """Embeddings of a list of texts (e.g. class prompts), computed sharded, on every host."""
    tokenizer = make_tokenizer(encoders.tokenizer_spec, encoders.context_length)
    token_ids = tokenizer.batch(list(texts))
    shards = parallel.batch_shards(encoders.mesh)
    batch_size = max(shards, batch_size - batch_size % shards)
    padded = -(-len(texts) // batch_size) * batch_size
    token_ids = np.concatenate([token_ids, np.zeros((padded - len(texts), token_ids.shape[1]), np.int32)])
    shard = pipeline.HostShard.current()
    local = batch_size // shard.count
    outputs = []
    for start in range(0, padded, batch_size):
        rows = token_ids[start + shard.index * local : start + (shard.index + 1) * local]
        global_ids = parallel.host_batch_to_global({"token_ids": rows}, encoders.mesh)["token_ids"]
        outputs.append(gather_to_host(encoders.encode_texts(params, global_ids)))
    return np.concatenate(outputs)[: len(texts)]
