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


def test_every_training_example_carries_the_epoch_of_its_own_source():
    """With 20 examples and 2 processes, element k of process p is stream position p + 2k, so its epoch is
    (p + 2k) // 20; a mixture counts each component's epochs by its own length."""
    def epochs(example, rng):
        return {"value": np.asarray(example["value"]), "epoch": np.int64(example[pipeline.EPOCH_FIELD])}

    for p in range(2):
        dataset = pipeline.training_dataset([(RangeSource(20), 1.0, 5)], epochs, global_batch_size=4,
                                            shard=pipeline.HostShard(p, 2), num_threads=1)
        iterator = iter(dataset)
        rows = np.concatenate([next(iterator)["epoch"] for _ in range(15)])  # 30 elements: 3 epochs of this part
        np.testing.assert_array_equal(rows, [(p + 2 * k) // 20 for k in range(30)])

    class Offset(RangeSource):
        def __getitem__(self, index):
            return {"value": np.int64(1000 + index)}

    dataset = pipeline.training_dataset([(RangeSource(10), 1.0, 1), (Offset(30), 1.0, 2)], epochs,
                                        global_batch_size=10, shard=pipeline.HostShard(0, 1), num_threads=1)
    iterator = iter(dataset)
    seen = {"small": [], "large": []}
    for _ in range(6):
        batch = next(iterator)
        for value, epoch in zip(batch["value"], batch["epoch"]):
            seen["large" if value >= 1000 else "small"].append(int(epoch))
    for name, length in (("small", 10), ("large", 30)):
        assert seen[name] == [k // length for k in range(len(seen[name]))], name


def test_the_epoch_tag_leaves_the_shuffle_and_the_example_seeds_as_grain_makes_them():
    """Tagging epochs must not move the per-example RNGs: compare with the plain Grain chain."""
    import grain

    def draw(example, rng):
        return {"value": np.asarray(example["value"]), "noise": np.float64(rng.uniform())}

    for p in range(2):
        dataset = pipeline.training_dataset([(RangeSource(12), 1.0, 9)], draw, global_batch_size=4,
                                            shard=pipeline.HostShard(p, 2), num_threads=1)
        iterator = iter(dataset)
        got = [next(iterator) for _ in range(9)]
        plain = grain.MapDataset.source(RangeSource(12)).seed(9).shuffle().repeat()[p::2].random_map(draw)
        want = [plain[k] for k in range(18)]
        np.testing.assert_array_equal(np.concatenate([b["value"] for b in got]), [w["value"] for w in want])
        np.testing.assert_array_equal(np.concatenate([b["noise"] for b in got]), [w["noise"] for w in want])


def test_each_component_may_have_its_own_preprocessing():
    class Offset(RangeSource):
        def __getitem__(self, index):
            return {"value": np.int64(1000 + index)}

    def tagged(tag):
        return lambda example, rng: {"value": np.asarray(example["value"]), "tag": np.int32(tag)}

    dataset = pipeline.training_dataset([(RangeSource(20), 1.0, 1), (Offset(20), 1.0, 2)], [tagged(1), tagged(2)],
                                        global_batch_size=10, shard=pipeline.HostShard(0, 1), num_threads=1)
    batch = next(iter(dataset))
    np.testing.assert_array_equal(batch["tag"], np.where(batch["value"] >= 1000, 2, 1))
    with pytest.raises(ValueError, match="1 preprocessors for 2 training components"):
        pipeline.training_dataset([(RangeSource(20), 1.0, 1), (Offset(20), 1.0, 2)], [tagged(1)],
                                  global_batch_size=10, shard=pipeline.HostShard(0, 1))


@pytest.mark.parametrize("cores, expected", [(1, 0), (2, 0), (3, 1), (8, 6), (16, 14), (240, 238), (448, 446)])
def test_auto_workers_are_the_cores_less_two_with_no_small_cap(cores, expected):
    assert pipeline.resolve_num_workers(-1, cores=cores) == expected
    assert pipeline.resolve_num_workers(-1, cores=cores, reserved=1) == cores - 1
    assert pipeline.resolve_num_workers(-1, cores=cores, limit=100) == min(expected, 100)
    assert pipeline.resolve_num_workers(-1, cores=cores, limit=0) == 0


def test_explicit_worker_counts_pass_and_bad_ones_fail():
    assert pipeline.resolve_num_workers(0, cores=240) == 0
    assert pipeline.resolve_num_workers(300, cores=2, limit=1) == 300  # as given: limits are auto's
    for bad in (-2, "many", 1.5j):
        with pytest.raises(ValueError, match="data.num_workers"):
            pipeline.resolve_num_workers(bad, cores=8)


def test_memory_limit_counts_two_batches_a_worker_in_half_the_memory():
    assert pipeline.memory_worker_limit(2**30, 400 * 2**30) == 100
    assert pipeline.memory_worker_limit(2**30, 2**30) == 1  # always at least one
    assert pipeline.memory_worker_limit(2**30, None) is None


def test_usable_cores_is_this_process_affinity():
    import os

    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert pipeline.usable_cores() == expected >= 1
