"""The benchmark's batch and memory readings (the timed step itself runs in tests/tools/test_bench_step.py)."""

from __future__ import annotations

import numpy as np

from jclip import models
from jclip.build import TrainSetup
from jclip.tools import bench_shapes, train_step_timing
from jclip.train import run_mesh


def test_random_batch_has_the_towers_fields_sharded_with_token_ids_in_range():
    config = bench_shapes.train_config("cpu-tiny", 16)
    setup = TrainSetup.create(config, run_mesh(config))
    batch = train_step_timing.random_batch(setup, 16)
    expected = models.abstract_batch(config.model, 16)
    assert {name: (x.shape, x.dtype) for name, x in batch.items()} == {
        name: (x.shape, x.dtype) for name, x in expected.items()}
    tokens = np.asarray(batch["token_ids"])
    assert tokens.min() >= 1 and tokens.max() < 49408 and len(np.unique(tokens)) > 100
    assert batch["images"].sharding == setup.batch_sharding(batch["images"].ndim)


def test_memory_readings_on_cpu():
    assert train_step_timing.device_peak_bytes_in_use() is None  # the CPU backend keeps no allocator statistics
    assert train_step_timing.max_rss_bytes() > 50 * 2 ** 20  # this process has jax loaded
