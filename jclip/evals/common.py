"""What every evaluator shares: sharded embedding of a split or a list of texts, gathered on every host.

Evaluation batches are padded with masked examples so every process runs the same number of steps; the
gathered rows are put back in the split's order by their `index`, and padding is dropped, so no example
is counted twice or lost. Texts (class prompts, captions) are tokenised once, padded to a whole number of
global batches and encoded sharded across every device, the same way.
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
from jclip.data.ops import image as image_ops
from jclip.data.tokenizer import Tokenizer, make_tokenizer

EncodeFn = Callable[[Any, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Encoders:
    """Jitted, sharded encoders: (params, global images or token ids) -> L2-normalised embeddings."""

    encode_images: EncodeFn
    encode_texts: EncodeFn
    mesh: Mesh
    context_length: int
    tokenizer_spec: str = "clip"

    @property
    def tokenizer(self) -> Tokenizer:
        return make_tokenizer(self.tokenizer_spec, self.context_length)


class EvaluationDataError(ValueError):
    """An evaluation example that cannot be read or preprocessed (evaluations never skip examples)."""


@dataclasses.dataclass(frozen=True)
class ImagesOnly:
    """Evaluation preprocessing of the image alone (captions are embedded separately), plus `keep` keys."""

    preprocessor: image_ops.ImageTextPreprocessor
    keep: tuple[str, ...] = ()

    def __call__(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
        out = {"images": self.preprocessor.image(example["image"])}
        for key in self.keep:
            out[key] = np.asarray(example[key])
        return out


def _explained(preprocess: Callable[[dict[str, Any]], dict[str, np.ndarray]], source: Any):
    """`preprocess` whose failures name the example, so a bad file is found rather than guessed at."""

    def call(example: dict[str, Any]) -> dict[str, np.ndarray]:
        try:
            return preprocess(example)
        except Exception as error:  # decoding errors come from PIL, numpy, the tokenizer...
            raise EvaluationDataError(
                f"evaluation example {example.get('key')!r} of {source!r} cannot be preprocessed: "
                f"{type(error).__name__}: {error}"
            ) from error

    return call


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
    """Image embeddings (and `extra_keys`) of a split, in split order, on every host. Captions and prompts
    are embedded separately (`embed_token_ids`), since an image may have any number of them."""
    shard = pipeline.HostShard.current()
    _, batches = pipeline.evaluation_batches(
        source, _explained(preprocess, source), global_batch_size=batch_size, shard=shard, limit=limit
    )
    collected: dict[str, list[np.ndarray]] = {}
    for host_batch in batches:
        global_batch = parallel.host_batch_to_global(host_batch, encoders.mesh)
        rows = {
            "image_embeddings": encoders.encode_images(params, global_batch["images"]),
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


def trim_padding(token_ids: np.ndarray, pad_id: int, multiple: int = 16) -> np.ndarray:
    """`token_ids` [n, context] without the trailing columns that hold only `pad_id` (rounded up to `multiple`)."""
    used = np.flatnonzero(np.any(token_ids != pad_id, axis=0))
    length = min(token_ids.shape[1], max(multiple, -(-(int(used[-1]) + 1 if used.size else 1) // multiple) * multiple))
    return token_ids[:, :length]


def embed_token_ids(params: Any, encoders: Encoders, token_ids: np.ndarray, *, batch_size: int) -> np.ndarray:
    """Embeddings of tokenised texts [n, context], computed sharded over every device, on every host.

    Columns that are padding in every row are cut first (to a multiple of 16 tokens): the towers never let
    padding change a real token (CLIP's causal mask ends at the end token, the pretrained towers mask pad
    keys), and short prompts then cost their own length, not the long-caption context.
    """
    token_ids = trim_padding(token_ids, encoders.tokenizer.pad_id)
    count = len(token_ids)
    shards = parallel.batch_shards(encoders.mesh)
    batch_size = max(shards, batch_size - batch_size % shards)
    padded = max(1, -(-count // batch_size)) * batch_size
    token_ids = np.concatenate([token_ids, np.zeros((padded - count, token_ids.shape[1]), np.int32)])
    shard = pipeline.HostShard.current()
    local = batch_size // shard.count
    outputs = []
    for start in range(0, padded, batch_size):
        rows = token_ids[start + shard.index * local : start + (shard.index + 1) * local]
        global_ids = parallel.host_batch_to_global({"token_ids": rows}, encoders.mesh)["token_ids"]
        outputs.append(gather_to_host(encoders.encode_texts(params, global_ids)))
    return np.concatenate(outputs)[:count]


def embed_texts(params: Any, encoders: Encoders, texts: Sequence[str], *, batch_size: int) -> np.ndarray:
    """Embeddings of a list of texts (class prompts, captions), computed sharded, on every host."""
    return embed_token_ids(params, encoders, encoders.tokenizer.batch(list(texts)), batch_size=batch_size)

