"""Grain pipelines: seeded global shuffle, disjoint per-process parts, exact resume, padded evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from jclip.data import pipeline


class RangeSource:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return {"value": np.int64(index)}


def take_values(preprocess_rng_used=False):
    def preprocess(example, rng):
        out = {"value": np.asarray(example["value"])}
        out["noise"] = np.float32(rng.uniform())
        return out

    return preprocess


def training_batches(shard, steps, n=50, batch=10, seed=3):
    dataset = pipeline.training_dataset(
        RangeSource(n), take_values(), global_batch_size=batch, seed=seed, shard=shard, num_threads=1
    )
    iterator = iter(dataset)
    return [next(iterator) for _ in range(steps)]


def test_two_processes_read_disjoint_parts_that_cover_each_epoch():
    steps = 10  # two epochs of 50 examples at global batch 10
    hosts = [training_batches(pipeline.HostShard(p, 2), steps) for p in range(2)]
    single = training_batches(pipeline.HostShard(0, 1), steps)
    for step in range(steps):
        parts = [set(hosts[p][step]["value"].tolist()) for p in range(2)]
        assert not parts[0] & parts[1]
        assert parts[0] | parts[1] == set(single[step]["value"].tolist())
    for epoch in range(2):
        seen = np.concatenate([b["value"] for b in single[5 * epoch : 5 * epoch + 5]])
        assert sorted(seen.tolist()) == list(range(50))
    first, second = (np.concatenate([b["value"] for b in single[5 * e : 5 * e + 5]]) for e in range(2))
    assert not np.array_equal(first, second), "each epoch must be shuffled differently"


def test_seeded_and_resumable():
    a = training_batches(pipeline.HostShard(0, 1), 4, seed=1)
    b = training_batches(pipeline.HostShard(0, 1), 4, seed=1)
    c = training_batches(pipeline.HostShard(0, 1), 4, seed=2)
    assert all(np.array_equal(x["value"], y["value"]) and np.array_equal(x["noise"], y["noise"]) for x, y in zip(a, b))
    assert not all(np.array_equal(x["value"], y["value"]) for x, y in zip(a, c))

    dataset = pipeline.training_dataset(
        RangeSource(50), take_values(), global_batch_size=10, seed=1, shard=pipeline.HostShard(0, 1), num_threads=1
    )
    iterator = iter(dataset)
    next(iterator), next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(4)]
    resumed = iter(dataset)
    resumed.set_state(state)
    for want, got in zip(expected, (next(resumed) for _ in range(4))):
        np.testing.assert_array_equal(want["value"], got["value"])
        np.testing.assert_array_equal(want["noise"], got["noise"])


def test_batch_must_split_over_processes():
    with pytest.raises(ValueError, match="not divisible"):
        pipeline.local_batch_size(10, pipeline.HostShard(0, 3))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        training_batches(pipeline.HostShard(0, 1), 1, n=5, batch=10)


@pytest.mark.parametrize("processes", [1, 2])
def test_evaluation_pads_with_masked_rows_and_counts_each_example_once(processes):
    def preprocess(example):
        return {"value": np.asarray(example["value"])}

    seen = []
    steps_per_host = []
    for p in range(processes):
        steps, batches = pipeline.evaluation_batches(
            RangeSource(23), preprocess, global_batch_size=8, shard=pipeline.HostShard(p, processes)
        )
        batches = list(batches)
        steps_per_host.append((steps, len(batches)))
        for batch in batches:
            assert batch["value"].shape == (8 // processes,)
            seen.extend(batch["index"][batch["mask"]].tolist())
            np.testing.assert_array_equal(batch["value"][batch["mask"]], batch["index"][batch["mask"]])
    assert steps_per_host == [(3, 3)] * processes
    assert sorted(seen) == list(range(23))
