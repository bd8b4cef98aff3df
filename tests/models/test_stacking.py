"""Scanned towers (`model.scan_layers`, jclip/models/layers.py) and jclip/models/stacking.py: the same weights
give the same outputs and gradients stacked as per layer (remat and LoRA included); the layouts convert
both ways; stacked parameters carry the replicated `layers` axis."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util
from jax.sharding import PartitionSpec
from jclip_testing import make_small_config, rel_err

from jclip.models import abstract_model, build_model, stacking
from jclip.parallel import DEFAULT_RULES


def _flat_params(model: nnx.Module) -> dict[tuple, jax.Array]:
    return traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _pair(**overrides) -> tuple[nnx.Module, nnx.Module]:
    """A per-layer model (3 vision, 2 text layers) and a scanned one holding the same weights."""
    config = make_small_config(**overrides)
    config["vision"] = {**config["vision"], "layers": 3}
    plain = build_model(config, nnx.Rngs(0))
    scanned = build_model({**config, "scan_layers": True}, nnx.Rngs(1))
    nnx.update(scanned, traverse_util.unflatten_dict(stacking.to_layout(_flat_params(plain), _flat_params(scanned))))
    return plain, scanned


BATCH = {
    "images": jax.random.normal(jax.random.key(1), (4, 16, 16, 3)),
    "token_ids": jax.random.randint(jax.random.key(2), (4, 8), 1, 63).at[:, 5].set(63),
}


def _loss_and_grads(model: nnx.Module) -> tuple[jax.Array, dict, dict]:
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params):
        outputs = nnx.merge(graphdef, params)(BATCH, ("image_features", "text_features", "image_tokens"))
        return jnp.sum(outputs["image_features"] ** 2) + jnp.sum(jnp.sin(outputs["text_features"])) + \
            jnp.mean(outputs["image_tokens"]), outputs

    (value, outputs), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return value, outputs, traverse_util.flatten_dict(nnx.to_pure_dict(grads))


@pytest.mark.parametrize("overrides", [{}, {"remat": True}, {"lora": {"rank": 2, "alpha": 1.0}}],
                         ids=["plain", "remat", "lora"])
def test_scanned_and_per_layer_models_agree_on_outputs_and_gradients(overrides) -> None:
    plain, scanned = _pair(**overrides)
    assert stacking.is_stacked(_flat_params(scanned)) and not stacking.is_stacked(_flat_params(plain))
    value, outputs, grads = _loss_and_grads(plain)
    scanned_value, scanned_outputs, scanned_grads = _loss_and_grads(scanned)
    np.testing.assert_allclose(scanned_value, value, rtol=1e-6)
    for name in outputs:
        np.testing.assert_allclose(scanned_outputs[name], outputs[name], rtol=1e-5, atol=1e-6, err_msg=name)
    per_layer = stacking.unstack(scanned_grads)
    assert set(per_layer) == set(grads)
    for path, grad in grads.items():  # float32 sums in another order: equal to rounding, relative to the largest
        assert rel_err(per_layer[path], grad) < 2e-6, path


def test_layouts_convert_both_ways_exactly() -> None:
    rng = np.random.default_rng(0)
    per_layer = {("visual", "transformer", "blocks", i, "mlp", "c_fc", "kernel"): rng.normal(size=(2, 3))
                 for i in range(4)}
    per_layer[("visual", "ln_post", "scale")] = rng.normal(size=(3,))
    stacked = stacking.stack(per_layer)
    kernel = stacked[("visual", "transformer", "blocks", "mlp", "c_fc", "kernel")]
    assert kernel.shape == (4, 2, 3) and isinstance(kernel, np.ndarray)
    np.testing.assert_array_equal(kernel[2], per_layer[("visual", "transformer", "blocks", 2, "mlp", "c_fc", "kernel")])
    back = stacking.unstack(stacked)
    assert set(back) == set(per_layer) and all(np.array_equal(back[p], v) for p, v in per_layer.items())
    assert stacking.to_layout(per_layer, per_layer) == per_layer
    assert set(stacking.to_layout(per_layer, stacked)) == set(stacked)
    abstract = stacking.unstack({("text", "transformer", "blocks", "ln_1", "bias"): jax.ShapeDtypeStruct((5, 7), jnp.bfloat16)})
    assert abstract[("text", "transformer", "blocks", 4, "ln_1", "bias")] == jax.ShapeDtypeStruct((7,), jnp.bfloat16)
    del per_layer[("visual", "transformer", "blocks", 1, "mlp", "c_fc", "kernel")]
    with pytest.raises(ValueError, match=r"cannot stack visual/transformer/blocks/<i>/mlp/c_fc/kernel: layers \[0, 2, 3\]"):
        stacking.stack(per_layer)


def test_stacked_parameters_lead_with_the_replicated_layers_axis() -> None:
    model = abstract_model(make_small_config(scan_layers=True))
    with nnx.logical_axis_rules(DEFAULT_RULES):
        specs = dict(nnx.to_flat_state(nnx.get_partition_spec(nnx.state(model, nnx.Param))))
    blocks = ("visual", "transformer", "blocks")
    assert specs[(*blocks, "attn", "in_kernel")].get_value() == PartitionSpec(None, "fsdp", None, "tensor", None)
    assert specs[(*blocks, "mlp", "c_fc", "kernel")].get_value() == PartitionSpec(None, "fsdp", "tensor")
    assert model.visual.transformer.blocks.mlp.c_fc.kernel.shape == (2, 32, 128)


def test_a_tower_without_a_scanned_layout_is_refused() -> None:
    from jclip.models import pretrained_text_tower
    from jclip.models.towers import check_tower

    config = {**make_small_config(scan_layers=True), "text": pretrained_text_tower("minilm-l6")}
    with pytest.raises(ValueError, match="model.scan_layers is on but model.text.kind 'bert' has no scanned layout"):
        check_tower(config, "text")
    check_tower(config, "vision")
