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


def _sharded_abstract_params(preset: str, mesh, **overrides) -> dict:
    """The preset's parameters as ShapeDtypeStructs on `mesh` by the default rules (nothing allocated)."""
    from jclip.build import ModelFunctions

    functions = ModelFunctions.create(get_preset(preset, **overrides), seed=0)
    shardings = functions.param_shardings(mesh, DEFAULT_RULES)
    return jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        nnx.to_pure_dict(functions.abstract_state), shardings)


def _abstract_mesh(sizes: dict[str, int]):
    from jax.sharding import AbstractMesh, AxisType

    return AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


@pytest.mark.parametrize("preset,sizes,overrides", [
    ("L/14", {"data": 1, "fsdp": 8, "tensor": 1}, {}),
    ("L/14", {"data": 1, "fsdp": 4, "tensor": 2}, {"scan_layers": True}),
    ("g/14", {"data": 4, "fsdp": 64, "tensor": 1}, {"scan_layers": True}),
    ("g/14", {"data": 2, "fsdp": 64, "tensor": 2}, {}),
], ids=["L14-fsdp8", "L14-fsdp4-tensor2-scanned", "g14-data4-fsdp64-scanned", "g14-data2-fsdp64-tensor2"])
def test_big_models_shard_every_large_parameter(preset: str, sizes: dict[str, int], overrides: dict) -> None:
    """FSDP x tensor parallelism by the default rules: every large parameter (embeddings, patch convolution,
    q/k/v and output projections, MLP, tower projections) is split over `fsdp` (and `tensor` where it has a
    head, MLP or vocabulary axis), so a device holds about total / (fsdp x tensor) of the weights."""
    from jclip.parallel import per_device_bytes

    devices = int(np.prod(list(sizes.values())))
    mesh = make_mesh(sizes, devices=jax.devices()[:devices]) if devices <= len(jax.devices()) else _abstract_mesh(sizes)
    params = _sharded_abstract_params(preset, mesh, **overrides)
    model_shards = sizes["fsdp"] * sizes["tensor"]
    total = independent = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        size = int(np.prod(leaf.shape))
        spec = tuple(leaf.sharding.spec)
        split = int(np.prod([sizes[a] for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)]))
        total += 4 * size
        independent += 4 * size // split  # the shapes divide evenly (checked by the first test above)
        if size >= 2 ** 20:
            assert "fsdp" in spec, (path, spec)
            name = jax.tree_util.keystr(path)
            wants_tensor = any(part in name for part in ("token_embedding", "attn", "mlp"))
            assert not wants_tensor or sizes["tensor"] == 1 or "tensor" in spec, (path, spec)
    assert per_device_bytes(params) == independent
    # What is over total / (fsdp x tensor): the small leaves that are not split over fsdp (the q/k/v and MLP
    # biases, split over `tensor` only; the logit scale): 2.7% (2.3 MB) for g/14 on 64-way FSDP, 3.0% with tensor=2.
    assert total / model_shards <= independent <= 1.04 * total / model_shards, (independent, total / model_shards)
