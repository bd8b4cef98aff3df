"""Meshes from config shapes, the logical-axis rules, and host batches assembled into global arrays."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from jclip import parallel


def test_mesh_shapes_and_errors():
    mesh = parallel.make_mesh({"data": -1, "fsdp": 2})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert parallel.batch_shards(mesh) == 8
    with pytest.raises(ValueError, match="needs 6 devices"):
        parallel.make_mesh({"data": 3, "fsdp": 2})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        parallel.make_mesh({"model": 8})
    with pytest.raises(ValueError, match="at most one"):
        parallel.make_mesh({"data": -1, "fsdp": -1})


def test_rules_map_logical_names_to_mesh_axes():
    rules = parallel.DEFAULT_RULES
    assert parallel.logical_to_spec(("embed", "mlp"), rules) == PartitionSpec("fsdp", "tensor")
    assert parallel.logical_to_spec(("batch", "length", "act_embed"), rules) == PartitionSpec(("data", "fsdp"), None, None)
    assert parallel.rules_from_config([["batch", ["data", "fsdp"]], ["embed", None]]) == (
        ("batch", ("data", "fsdp")),
        ("embed", None),
    )


def test_host_batch_becomes_one_global_array_and_constraints_apply():
    mesh = parallel.make_mesh({"data": 4, "fsdp": 2})
    host = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
    global_batch = parallel.host_batch_to_global(host, mesh)["x"]
    assert global_batch.shape == (16, 3)
    assert global_batch.sharding.spec == PartitionSpec(("data", "fsdp"), None)
    assert len(global_batch.addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(global_batch), host["x"])
    with parallel.sharding_context(mesh, parallel.DEFAULT_RULES):
        out = jax.jit(lambda x: parallel.constrain(x * 2, ("batch", "act_embed")))(global_batch)
    assert out.sharding.spec == PartitionSpec(("data", "fsdp"), None)
    # Without a mesh the constraint is a no-op, so model code runs anywhere.
    np.testing.assert_array_equal(parallel.constrain(jnp.ones((2, 2)), ("batch", "act_embed")), np.ones((2, 2)))
