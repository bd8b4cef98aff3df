"""Device mesh, logical-axis sharding rules, and host batches -> global arrays.

Sharding is declared, not coded (shared/ARCHITECTURE.md, principle 3): parameters and large
activations carry logical axis names (`batch`, `embed`, `mlp`, ...); one rules table maps them to the
mesh axes `data`, `fsdp` and `tensor`. Model code calls `constrain` and never `device_put`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax.core import spmd as flax_spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
# Mesh axes the global batch is split over; every cross-example loss gathers over these.
BATCH_MESH_AXES = ("data", "fsdp")

# logical axis name -> mesh axis (or axes, or None for replicated). Parameters use `embed`, `mlp`,
# `heads`, ...; activations use the `act_*` names so that `batch` and a feature axis never claim the
# same mesh axis (FSDP shards weights over `fsdp`, activations' batch over `data` x `fsdp`).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", None),  # grouped-query attention's key/value heads (often 1 to 3): replicated
    ("kv", None),
    ("vocab", "tensor"),
    ("length", None),
    ("patch", None),
    ("channels", None),
    ("proj", None),
    ("prototypes", "tensor"),
    ("layers", None),  # the leading axis of stacked (model.scan_layers) block parameters: every device has all
)


def make_mesh(mesh_shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a (data, fsdp, tensor) mesh; one entry may be -1 to take the remaining devices.

    Uses Auto axis types: jclip's sharding is GSPMD-style (constraints + propagation).
    """
    devices = list(jax.devices() if devices is None else devices)
    unknown = set(mesh_shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
    sizes = [int(mesh_shape.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into mesh {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, but {len(devices)} are present"
        )
    return jax.make_mesh(
        tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def rules_from_config(rules: Sequence[Sequence[Any]] | None) -> tuple[tuple[str, Any], ...]:
    """Normalises a config's rules table (lists from ml_collections) to tuples."""
    if rules is None:
        return DEFAULT_RULES
    normalised = []
    for rule in rules:
        name, target = rule
        if isinstance(target, list):
            target = tuple(target)
        normalised.append((str(name), target))
    return tuple(normalised)


def logical_to_spec(logical_axes: Sequence[str | None], rules: Sequence[tuple[str, Any]] | None = None) -> PartitionSpec:
    """Maps logical axis names to a mesh PartitionSpec with the given (or the active) rules."""
    rules = flax_spmd.get_logical_axis_rules() if rules is None else rules
    return PartitionSpec(*flax_spmd.from_sharding_rules(tuple(logical_axes), rules))


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Iterator[None]:
    """Activates `mesh` and the logical rules for tracing, so `constrain` and NNX metadata resolve."""
    with jax.set_mesh(mesh), flax_spmd.logical_axis_rules(rules):
        yield


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op without an active mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = flax_spmd.get_logical_axis_rules()
    if mesh.empty or not rules:
        return x
    if len(logical_axes) != x.ndim:
        raise ValueError(f"{len(logical_axes)} logical axes {tuple(logical_axes)} for an array of rank {x.ndim}")
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, rules))


def batch_spec(ndim: int) -> PartitionSpec:
    """Splits the leading (example) dimension over the batch mesh axes; the rest replicated."""
    return PartitionSpec(BATCH_MESH_AXES, *([None] * (ndim - 1)))


def batch_shards(mesh: Mesh) -> int:
    """How many ways the global batch is split (the product of the batch mesh axes)."""
    return math.prod(mesh.shape[axis] for axis in BATCH_MESH_AXES)


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of arrays or ShapeDtypeStructs with shardings (the largest shard of
    each leaf: every device holds one; replicated leaves count whole)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = tuple(leaf.shape) if sharding is None else sharding.shard_shape(tuple(leaf.shape))
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def host_batch_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's rows of a batch into global arrays sharded over the batch axes.

    Every process passes its own contiguous part of the global batch (equal sizes); the result's
    leading dimension is the global batch.
    """
    out = {}
    for name, local in batch.items():
        local = np.asarray(local)
        sharding = NamedSharding(mesh, batch_spec(local.ndim))
        global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
        out[name] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out
