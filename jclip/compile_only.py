"""`python -m jclip.main --compile_only`: the real train step for the config's mesh, lowered and compiled with
abstract inputs, and what it would cost, before renting the hardware.

Nothing is loaded or materialised: the train state and the batch are ShapeDtypeStructs carrying the shardings
the run would use (`jclip.build.TrainSetup`), so a g/14 step on 256 fake CPU devices compiles on a laptop. The
report gives, per device: the bytes of parameters and optimizer state (from their shardings), XLA's compiled
memory analysis (arguments, outputs, aliased donations, temporaries, generated code) and its FLOPs count, next
to the model FLOPs of the step (`jclip.models.flops`). On fake CPU devices the memory analysis is the XLA CPU
backend's estimate, not a TPU's or GPU's: use it for the order of magnitude and to compare settings (remat,
scan_layers, sharding) against each other.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

from jclip import models, parallel
from jclip.build import TrainSetup
from jclip.config_validation import batch_fields, validate_config
from jclip.data.robust import TRUNCATED_FIELD
from jclip.errors import ConfigError
from jclip.models.flops import train_step_flops
from jclip.step import jit_train_step

#: CompiledMemoryStats fields of the report, in order.
MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                 "generated_code_size_in_bytes")


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """What compiling the train step for a mesh tells before any data or weight exists."""

    devices: int
    platform: str
    device_kind: str
    mesh: dict[str, int]
    global_batch: int
    params: int
    param_bytes: int
    param_bytes_per_device: int
    opt_state_bytes_per_device: int
    batch_bytes_per_device: int
    memory: dict[str, int]  # MEMORY_FIELDS of compiled.memory_analysis(), per device
    xla_flops_per_device: float  # compiled.cost_analysis()["flops"]
    model_flops: int  # jclip.models.flops.train_step_flops for the global batch
    lower_seconds: float
    compile_seconds: float

    @property
    def estimated_peak_bytes(self) -> int:
        """Arguments + outputs - aliased (donated state updated in place) + temporaries."""
        return estimated_peak_bytes(self.memory)

    def lines(self) -> list[str]:
        """The printed report: `name: integer (readable)` lines, then notes."""
        def size(name: str, value: int) -> str:
            return f"{name}: {value} ({_gib(value)})"

        return [
            f"devices: {self.devices} ({self.platform}, {self.device_kind})",
            f"mesh: {self.mesh}",
            f"global_batch: {self.global_batch} ({self.global_batch // _batch_shards(self.mesh)} per batch shard)",
            f"parameters: {self.params} ({self.params / 1e6:.2f} M)",
            size("param_bytes_total", self.param_bytes),
            size("param_bytes_per_device", self.param_bytes_per_device),
            size("opt_state_bytes_per_device", self.opt_state_bytes_per_device),
            size("batch_bytes_per_device", self.batch_bytes_per_device),
            *(size(f"compiled_{name.removesuffix('_size_in_bytes')}_bytes", self.memory[name]) for name in MEMORY_FIELDS),
            size("compiled_estimated_peak_bytes", self.estimated_peak_bytes),
            f"xla_flops_per_device: {self.xla_flops_per_device:.4g}",
            f"model_flops_per_step: {self.model_flops:.4g} ({self.model_flops / self.devices:.4g} per device)",
            f"lower_seconds: {self.lower_seconds:.1f}",
            f"compile_seconds: {self.compile_seconds:.1f}",
            "notes: compiled_* come from XLA's memory analysis of the compiled step on this backend "
            f"({self.platform}){'; on CPU it is the XLA CPU backend estimate, not a TPU/GPU figure' if self.platform == 'cpu' else ''}; "
            "estimated_peak = arguments + outputs - aliased + temporaries. xla_flops counts a loop body once "
            "(scan_layers, accum_steps); model_flops = 3 x forward (jclip.models.flops), remat excluded.",
        ]


def estimated_peak_bytes(memory: Mapping[str, int]) -> int:
    """Peak bytes per device estimated from MEMORY_FIELDS of a compiled program's memory analysis: arguments +
    outputs - aliased (a donated state is updated in place) + temporaries."""
    return (memory["argument_size_in_bytes"] + memory["output_size_in_bytes"] - memory["alias_size_in_bytes"]
            + memory["temp_size_in_bytes"])


def _batch_shards(mesh: Mapping[str, int]) -> int:
    return math.prod(int(mesh.get(axis, 1)) for axis in parallel.BATCH_MESH_AXES)


def _gib(value: float) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{int(value)} B"


def abstract_batch(config: ml_collections.ConfigDict, setup: TrainSetup) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch as sharded ShapeDtypeStructs: the towers' own fields. ConfigError when the pipeline
    writes further fields (hard negatives, guidance features), whose shapes only the data would tell."""
    batch = models.abstract_batch(config.model, int(config.data.batch_size))
    others = sorted(set(batch_fields(config)) - set(batch) - {TRUNCATED_FIELD})
    if others:
        raise ConfigError(f"--compile_only builds a batch of the towers' fields {sorted(batch)}; the preprocessing "
                          f"also writes {others}, whose shapes it does not know")
    return {name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=setup.batch_sharding(x.ndim))
            for name, x in batch.items()}


def compile_report(config: ml_collections.ConfigDict) -> CompileReport:
    """Builds the run's set-up on its mesh, lowers and compiles the train step on abstract inputs."""
    from jclip.train import run_mesh

    if (config.get("teacher") or {}).get("checkpoint"):
        raise ConfigError("--compile_only does not load a teacher; unset teacher.checkpoint")
    mesh = run_mesh(config)
    validate_config(config, mesh)
    setup = TrainSetup.create(config, mesh)
    state = setup.abstract_state()
    batch = abstract_batch(config, setup)
    with parallel.sharding_context(mesh, setup.rules):
        started = time.perf_counter()
        lowered = jit_train_step(setup, batch).lower(state, batch, None)
        lowered_at = time.perf_counter()
        compiled = lowered.compile()
        compiled_at = time.perf_counter()
    stats = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    device = jax.devices()[0]
    return CompileReport(
        devices=jax.device_count(),
        platform=device.platform,
        device_kind=device.device_kind,
        mesh={axis: int(size) for axis, size in mesh.shape.items()},
        global_batch=int(config.data.batch_size),
        params=sum(int(leaf.size) for leaf in jax.tree.leaves(state["params"])),
        param_bytes=sum(int(leaf.size) * leaf.dtype.itemsize for leaf in jax.tree.leaves(state["params"])),
        param_bytes_per_device=parallel.per_device_bytes(state["params"]),
        opt_state_bytes_per_device=parallel.per_device_bytes(state["opt_state"]),
        batch_bytes_per_device=parallel.per_device_bytes(batch),
        memory={name: int(getattr(stats, name)) for name in MEMORY_FIELDS},
        xla_flops_per_device=float((cost or {}).get("flops", 0.0)),
        model_flops=_model_flops(config),
        lower_seconds=lowered_at - started,
        compile_seconds=compiled_at - lowered_at,
    )


def _model_flops(config: ml_collections.ConfigDict) -> int:
    try:
        return train_step_flops(config.model, int(config.data.batch_size))
    except ValueError:  # a tower jclip.models.flops does not count (a pretrained text tower)
        return 0


def describe(config: ml_collections.ConfigDict) -> str:
    """The config's model and compute options, for the report's first line."""
    model = config.model
    options = {"model": model.get("name"), "dtype": model.get("dtype"), "param_dtype": model.get("param_dtype") or "float32",
               "remat": bool(model.get("remat")), "scan_layers": bool(model.get("scan_layers")),
               "accum_steps": int(config.optim.accum_steps), "losses": sorted(config.losses)}
    return ", ".join(f"{key} {value}" for key, value in options.items())
