"""Grain input pipelines: a seeded global shuffle, per-process sharding, preprocessing, batching, prefetch.

Training: the source is shuffled globally (a new order every epoch, from one seed) and repeated; process p
of P reads elements p, p+P, p+2P, ... of that stream, so the P host batches of step k together hold
exactly elements [k·B, (k+1)·B) of the shuffled stream and no host reads another's part. The iterator is
a Grain `DatasetIterator` whose state goes into the checkpoint (exact resume). Every training example
reaches the preprocessing ops with `EPOCH_FIELD` (`_epoch`): how many full passes over its own source came
before it (0 in the first), a pure function of its place in the stream, so a resumed iterator sees the same
epochs; ops that change with the epoch (`caption_rule(rule='alternate')`) read it. It is never batched.
Every training batch also carries its examples' keys as text (`jclip.data.robust.KEY_FIELD`, host only: the
train loop pops it and names them when a step goes non-finite).

Evaluation: the split in its stored order, padded with masked copies to a whole number of global
batches, so that every process takes the same number of steps and each example is counted once.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import grain
import numpy as np


#: The field the training pipeline adds to every raw example: the 0-based epoch of its source it comes from.
EPOCH_FIELD = "_epoch"

#: `data.num_workers` meaning "as many Grain worker processes as the host's cores allow".
AUTO_WORKERS = -1
#: Cores that auto leaves to the main process: the training loop (step dispatch, host-to-device copies)
#: and the batches arriving from the workers.
AUTO_RESERVED_CORES = 2
#: Share of host memory that auto lets the workers' batch buffers take (see `memory_worker_limit`).
AUTO_MEMORY_SHARE = 0.5


def is_auto(setting: int) -> bool:
    """Whether a `data.num_workers` value asks for auto (-1; the config field is an integer)."""
    return setting == AUTO_WORKERS


def usable_cores() -> int:
    """CPU cores this process may run on: its affinity mask (os.cpu_count() where there is none)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def host_memory_bytes() -> int | None:
    """Physical memory of the host, or None where the OS does not say."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def memory_worker_limit(batch_bytes: int, memory_bytes: int | None, *, share: float = AUTO_MEMORY_SHARE,
                        batches_per_worker: int = 2) -> int | None:
    """The most workers whose batches fit in `share` of host memory, or None (no limit) when unknown.

    Each Grain worker makes whole batches: one waits in its output buffer (`per_worker_buffer_size=1`)
    while it builds the next, hence `batches_per_worker` batches of `batch_bytes` each. At least 1.
    """
    if memory_bytes is None or batch_bytes <= 0:
        return None
    return max(1, int(memory_bytes * share) // (batches_per_worker * batch_bytes))


def resolve_num_workers(setting: int, *, cores: int, reserved: int = AUTO_RESERVED_CORES,
                        limit: int | None = None) -> int:
    """Grain worker processes for `data.num_workers`: n >= 0 as given; auto (-1) is `cores` minus
    `reserved` for the training loop (0 below that: threads in the main process), at most `limit` (what the
    data or the memory allow). Nothing else caps it: a 240-core TPU VM host gets 238 workers.
    """
    if is_auto(setting):
        workers = max(0, int(cores) - int(reserved))
        return workers if limit is None else max(0, min(workers, int(limit)))
    try:
        workers = int(setting)
    except (TypeError, ValueError):
        raise ValueError(f"data.num_workers must be an integer >= 0, or -1 (auto), got {setting!r}") from None
    if workers < 0:
        raise ValueError(f"data.num_workers must be an integer >= 0, or -1 (auto), got {setting!r}")
    return workers


class RandomAccessSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class HostShard:
    """Which part of every global batch this process reads."""

    index: int
    count: int

    @classmethod
    def current(cls) -> "HostShard":
        import jax

        return cls(jax.process_index(), jax.process_count())


def local_batch_size(global_batch_size: int, shard: HostShard) -> int:
    if global_batch_size % shard.count:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by {shard.count} processes")
    return global_batch_size // shard.count


class _RandomPreprocess(grain.transforms.RandomMap):
    """Adapts `preprocess(example, rng)` to Grain's seeded random map (deterministic per element)."""

    def __init__(self, preprocess: Callable[[dict[str, Any], np.random.Generator], dict[str, np.ndarray]]):
        self._preprocess = preprocess

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        from jclip.data import robust

        out = self._preprocess(element, rng)
        if isinstance(out, dict):  # not a robust.Skipped marker
            out[robust.KEY_FIELD] = np.asarray(robust.example_key(element) or "")
        return out


class _HostPart(grain.MapDataset):
    """Elements p, p+P, p+2P, ... of a repeated stream (like `stream[p::P]`), each tagged with its epoch.

    One node in place of Grain's slice, so that the random map after it keeps the seeds it had before
    the tag existed (Grain derives a random map's default seed from its distance to the `.seed()` node).
    """

    def __init__(self, parent: grain.MapDataset, shard: HostShard, epoch_length: int):
        super().__init__(parent)
        self._shard = shard
        self._epoch_length = epoch_length
        self._length = len(range(shard.index, len(parent), shard.count))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return self.slice(index)
        position = self._shard.index + index * self._shard.count
        element = self._parent[position]
        return None if element is None else {**element, EPOCH_FIELD: position // self._epoch_length}

    def __str__(self) -> str:
        return f"_HostPart[{self._shard.index}::{self._shard.count}, epochs of {self._epoch_length}]"


def _host_stream(raw: Any, seed: int, shard: HostShard) -> grain.MapDataset | grain.IterDataset:
    """A random-access source: seeded global shuffle (new order each epoch), repeated, this host's p::P part,
    every example tagged with its epoch (`EPOCH_FIELD`).

    A stream (a `grain.IterDataset`, e.g. tar shards) is already shuffled, split by host and epoch-tagged.
    """
    if isinstance(raw, grain.IterDataset):
        return raw.seed(seed)
    return _HostPart(grain.MapDataset.source(raw).seed(seed).shuffle().repeat(), shard, len(raw))


def training_dataset(
    components: Sequence[tuple[Any, float, int]],
    preprocess: Callable[[dict[str, Any], np.random.Generator], Any] | Sequence[Callable[..., Any]],
    *,
    global_batch_size: int,
    shard: HostShard,
    num_workers: int = 0,
    num_threads: int = 2,
    prefetch_buffer_size: int = 4,
    max_consecutive_bad: int = 10_000,
) -> grain.IterDataset:
    """The infinite, host-sharded, batched training stream of one process.

    `components` are (raw source, weight, seed): random-access sources or `grain.IterDataset` streams of raw
    examples; several are mixed by weight. `preprocess(example, rng)` returns model inputs or a
    `jclip.data.robust.Skipped` marker; skipped examples are dropped and counted per reason in every good
    row's `skipped_before` (see `jclip.data.robust`). A sequence of preprocessors gives each component its
    own (they must produce the same fields).
    """
    from jclip.data import robust

    batch = local_batch_size(global_batch_size, shard)
    preprocessors = list(preprocess) if isinstance(preprocess, Sequence) else [preprocess] * len(components)
    if len(preprocessors) != len(components):
        raise ValueError(f"{len(preprocessors)} preprocessors for {len(components)} training components")
    streams = []
    for (raw, _, seed), component_preprocess in zip(components, preprocessors):
        if not isinstance(raw, grain.IterDataset) and len(raw) < global_batch_size:
            raise ValueError(f"a training source has {len(raw)} examples, fewer than one global batch ({global_batch_size})")
        stream = _host_stream(raw, seed, shard).random_map(_RandomPreprocess(component_preprocess))
        if isinstance(stream, grain.MapDataset):
            stream = stream.to_iter_dataset(
                grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
            )
        streams.append(stream)
    weights = [float(weight) for _, weight, _ in components]
    mixed = streams[0] if len(streams) == 1 else grain.IterDataset.mix(streams, weights)
    iterable = robust.SkipBadExamples(mixed, max_consecutive_bad=max_consecutive_bad).batch(batch, drop_remainder=True)
    if num_workers > 0:
        return iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    # Batches are assembled in a background thread, so the next one is ready while the step runs.
    return grain.experimental.ThreadPrefetchIterDataset(iterable, prefetch_buffer_size=2)


class _PaddedSplit:
    """Random access over a split padded to `padded_length`; padding repeats example 0 with mask False."""

    def __init__(self, source: RandomAccessSource, padded_length: int):
        self._source = source
        self._length = padded_length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> tuple[int, bool, dict[str, Any]]:
        real = index < len(self._source)
        return index, real, self._source[index if real else 0]


def evaluation_batches(
    source: RandomAccessSource,
    preprocess: Callable[[dict[str, Any]], dict[str, np.ndarray]],
    *,
    global_batch_size: int,
    shard: HostShard,
    limit: int | None = None,
    num_threads: int = 2,
) -> tuple[int, Iterator[dict[str, np.ndarray]]]:
    """(number of steps, host batches) over a split; batches carry `index` and `mask`."""
    num_examples = len(source) if limit is None else min(limit, len(source))
    num_steps = max(1, math.ceil(num_examples / global_batch_size))
    batch = local_batch_size(global_batch_size, shard)

    class _Limited:
        def __len__(self) -> int:
            return num_examples

        def __getitem__(self, index: int) -> dict[str, Any]:
            return source[index]

    def to_model_inputs(item: tuple[int, bool, dict[str, Any]]) -> dict[str, np.ndarray]:
        index, real, example = item
        out = preprocess(example)
        out["index"] = np.int32(index)
        out["mask"] = np.bool_(real)
        return out

    dataset = (
        grain.MapDataset.source(_PaddedSplit(_Limited(), num_steps * global_batch_size))[shard.index :: shard.count]
        .map(to_model_inputs)
        .batch(batch, drop_remainder=True)
    )
    return num_steps, iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2)))
