"""Declared sharding of the CLIP model: logical names -> valid mesh specs, and a sharded init + forward on
a (data=2, fsdp=2, tensor=2) mesh of 8 fake CPU devices equal to the single-device result."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jclip_testing import make_small_config
from flax import nnx
from jax.sharding import PartitionSpec

from jclip.models import CLIPModel, abstract_model, build_model, get_preset
from jclip.parallel import DEFAULT_RULES, MESH_AXES, make_mesh, sharding_context


def _flat_specs(model: CLIPModel) -> list[tuple[tuple, PartitionSpec, tuple[int, ...]]]:
    params = nnx.state(model, nnx.Param)
    with nnx.logical_axis_rules(DEFAULT_RULES):
        specs = nnx.get_partition_spec(params)
    shapes = dict(nnx.to_flat_state(params))
    return [(path, variable.get_value(), tuple(shapes[path].shape)) for path, variable in nnx.to_flat_state(specs)]


@pytest.mark.parametrize("preset", ["B/32", "tiny"])
def test_every_parameter_maps_to_a_valid_mesh_spec(preset: str) -> None:
    model = abstract_model(get_preset(preset))
    mesh_sizes = {"data": 2, "fsdp": 2, "tensor": 2}
    entries = _flat_specs(model)
    assert len(entries) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    for path, spec, shape in entries:
        assert isinstance(spec, PartitionSpec), path
        assert len(spec) <= len(shape), (path, spec, shape)
        used = []
        for dim, entry in zip(shape, spec):
            axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
            assert set(axes) <= set(MESH_AXES), (path, spec)
            used.extend(axes)
            assert dim % int(np.prod([mesh_sizes[a] for a in axes])) == 0, (path, spec, shape)
        assert len(used) == len(set(used)), f"{path}: mesh axis used twice in {spec}"


def test_weights_are_sharded_as_declared() -> None:
    specs = {path: spec for path, spec, _ in _flat_specs(abstract_model(get_preset("B/32")))}
    assert specs[("text", "token_embedding")] == PartitionSpec("tensor", "fsdp")
    assert specs[("visual", "transformer", "blocks", 0, "mlp", "c_fc", "kernel")] == PartitionSpec("fsdp", "tensor")
    assert specs[("visual", "transformer", "blocks", 0, "attn", "in_kernel")] == PartitionSpec(
        "fsdp", None, "tensor", None)
    assert specs[("logit_scale",)] == PartitionSpec()


def test_sharded_init_and_forward_equal_single_device() -> None:
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices; tests/conftest.py sets XLA_FLAGS before jax is imported")
    config = make_small_config()
    images = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
    token_ids = jax.random.randint(jax.random.key(2), (8, 8), 1, 63).at[:, 6].set(63)

    def forward(model: CLIPModel, images: jax.Array, token_ids: jax.Array) -> dict[str, jax.Array]:
        return model({"images": images, "token_ids": token_ids})

    reference = nnx.jit(forward)(build_model(config, nnx.Rngs(0)), images, token_ids)

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with sharding_context(mesh, DEFAULT_RULES):
        graphdef, abstract_state = nnx.split(abstract_model(config))
        shardings = nnx.get_named_sharding(abstract_state, mesh)

        @jax.jit
        def init() -> nnx.State:
            return nnx.state(build_model(config, nnx.Rngs(0)))

        state = jax.jit(init, out_shardings=shardings)()
        token_embedding = state["text"]["token_embedding"].get_value()
        assert token_embedding.sharding.spec == PartitionSpec("tensor", "fsdp")
        assert len(token_embedding.addressable_shards) == 8
        assert token_embedding.addressable_shards[0].data.shape == (32, 16)
        model = nnx.merge(graphdef, state)
        sharded = nnx.jit(forward)(model, images, token_ids)

    assert set(sharded) == set(reference)
    for name in reference:
        np.testing.assert_allclose(np.asarray(sharded[name]), np.asarray(reference[name]), atol=1e-5, err_msg=name)
    assert jnp.allclose(sharded["logit_scale"], reference["logit_scale"])
