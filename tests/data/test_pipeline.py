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
        [(RangeSource(n), 1.0, seed)], take_values(), global_batch_size=batch, shard=shard, num_threads=1
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
        [(RangeSource(50), 1.0, 1)], take_values(), global_batch_size=10, shard=pipeline.HostShard(0, 1), num_threads=1
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


def test_weighted_mixture_draws_by_weight_and_resumes():
    class Offset(RangeSource):
        def __init__(self, n, offset):
            super().__init__(n)
            self.offset = offset

        def __getitem__(self, index):
            return {"value": np.int64(self.offset + index)}

    def make():
        return pipeline.training_dataset(
            [(Offset(40, 0), 3.0, 1), (Offset(40, 1000), 1.0, 2)], take_values(),
            global_batch_size=8, shard=pipeline.HostShard(0, 1), num_threads=1,
        )

    iterator = iter(make())
    values = np.concatenate([next(iterator)["value"] for _ in range(10)])
    from_second = np.mean(values >= 1000)
    assert 0.2 <= from_second <= 0.3, f"weight 1 of 4 should give ~25% of examples, got {from_second:.2f}"
    state = iterator.get_state()
    expected = [next(iterator)["value"] for _ in range(3)]
    resumed = iter(make())
    resumed.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["value"], want)


def test_bad_examples_are_skipped_and_counted_in_batches():
    from jclip.data import robust

    def preprocess(example, rng):
        if int(example["value"]) % 5 == 0:
            return robust.Skipped("missing_caption", str(int(example["value"])))
        return {"value": np.asarray(example["value"])}

    dataset = pipeline.training_dataset(
        [(RangeSource(50), 1.0, 0)], preprocess, global_batch_size=8, shard=pipeline.HostShard(0, 1), num_threads=1
    )
    batches = [b for b, _ in zip(iter(dataset), range(5))]
    assert all(int(v) % 5 for b in batches for v in b["value"])
    good = sum(len(b["value"]) for b in batches)
    assert good == 40  # all the good examples of the first epoch of 0..49
    # Each skip is counted on the next good row, so the 40 rows carry every multiple of 5 that comes
    # before the epoch's last good example in the shuffled order.
    import grain

    order = [int(x["value"]) for x in grain.MapDataset.source(RangeSource(50)).seed(0).shuffle()]
    last_good = max(i for i, v in enumerate(order) if v % 5)
    expected = sum(1 for v in order[:last_good] if v % 5 == 0)
    totals = robust.skip_totals(batches)
    assert totals["missing_caption"] == expected and sum(totals.values()) == expected
