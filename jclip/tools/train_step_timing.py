"""jclip's real train step on a fixed random batch: its wall time per step, and what XLA says of it.

The step is `jclip.step.jit_train_step`, the jitted program `compile_train_step` wraps (declared shardings,
donated state), called the way `compile_train_step` calls it. It is lowered and compiled once: the timed calls
and XLA's cost and memory analyses share that one executable. The batch is a device array made once (images
from a normal distribution, token ids uniform in [1, vocab)), so no input pipeline is timed; each timed step ends
with `jax.block_until_ready` on the returned state.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jclip import models, optim, parallel
from jclip.build import TrainSetup, TrainState
from jclip.compile_only import MEMORY_FIELDS, estimated_peak_bytes
from jclip.step import jit_train_step
from jclip.train import run_mesh


def random_batch(setup: TrainSetup, batch_size: int, seed: int = 0) -> dict[str, jax.Array]:
    """The towers' fields for `batch_size` examples, random, placed with the batch sharding of the step."""
    model_config = setup.config.model
    vocab = int(model_config.text.get("vocab_size", 2))
    rng = np.random.default_rng(seed)
    batch = {}
    for name, field in models.abstract_batch(model_config, batch_size).items():
        if jnp.issubdtype(field.dtype, jnp.integer):
            values = rng.integers(1, vocab, field.shape)
        else:
            values = rng.standard_normal(field.shape)
        batch[name] = jax.device_put(np.asarray(values, field.dtype), setup.batch_sharding(field.ndim))
    return batch


def parameter_counts(setup: TrainSetup) -> tuple[int, int]:
    """(parameters, parameters under weight decay) of the model, from shapes alone."""
    params = setup.abstract_state()["params"]
    sizes = [int(leaf.size) for leaf in jax.tree.leaves(params)]
    decayed = jax.tree.leaves(optim.decay_mask(params))
    return sum(sizes), sum(size for size, decays in zip(sizes, decayed) if decays)


@dataclasses.dataclass
class CompiledStep:
    """A compiled train step with its state and batch on the devices; `time_steps` advances the state."""

    setup: TrainSetup
    state: TrainState
    batch: dict[str, jax.Array]
    jitted: Any
    compiled: Any  # jax.stages.Compiled of `jitted` for (state, batch)
    compile_seconds: float

    @classmethod
    def build(cls, config: ml_collections.ConfigDict) -> "CompiledStep":
        """Initialises the state of `config` on its mesh, makes the batch, lowers and compiles the step."""
        setup = TrainSetup.create(config, run_mesh(config))
        state = setup.init_state()
        batch = random_batch(setup, int(config.data.batch_size), int(config.seed))
        jitted = jit_train_step(setup, batch)
        started = time.perf_counter()
        with parallel.sharding_context(setup.mesh, setup.rules):
            compiled = jitted.lower(state, batch, None).compile()
        return cls(setup, state, batch, jitted, compiled, time.perf_counter() - started)

    def step(self) -> dict[str, jax.Array]:
        """One train step on the fixed batch (not waited for); returns its metrics."""
        with parallel.sharding_context(self.setup.mesh, self.setup.rules):
            self.state, metrics = self.jitted(self.state, self.batch, None)
        return metrics

    def time_steps(self, warmup: int, steps: int) -> tuple[list[float], float]:
        """`warmup` untimed steps, then `steps` timed ones, each waited for on the returned state. Returns the
        seconds of each timed step and the loss of the first of all these steps."""
        seconds, first_loss = [], float("nan")
        for index in range(warmup + steps):
            started = time.perf_counter()
            metrics = self.step()
            jax.block_until_ready(self.state)
            if index >= warmup:
                seconds.append(time.perf_counter() - started)
            if index == 0 and "loss/total" in metrics:
                first_loss = float(metrics["loss/total"])
        return seconds, first_loss

    def xla_flops(self) -> float:
        """XLA's FLOPs count of one step over all devices (its per-device program's count x devices)."""
        cost = self.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float((cost or {}).get("flops", 0.0)) * self.setup.mesh.size

    def xla_estimated_peak_bytes(self) -> int:
        """XLA's compiled memory analysis of the step: estimated peak bytes per device."""
        stats = self.compiled.memory_analysis()
        return estimated_peak_bytes({name: int(getattr(stats, name)) for name in MEMORY_FIELDS})


def device_peak_bytes_in_use() -> int | None:
    """The largest `peak_bytes_in_use` of the local devices' allocators, or None where they keep no statistics
    (the CPU backend)."""
    peaks = [(device.memory_stats() or {}).get("peak_bytes_in_use") for device in jax.local_devices()]
    peaks = [int(peak) for peak in peaks if peak is not None]
    return max(peaks) if peaks else None


def max_rss_bytes() -> int:
    """The largest resident set of this process so far (getrusage: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024
