"""The train step: gradient accumulation equal to the whole-batch gradient, the logit-scale clamp, weight
decay only on matrices, remat and bfloat16."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jclip_testing import micro_config, random_batch


def one_step(config, mesh_shape):
    from jclip import parallel
    from jclip.build import TrainSetup
    from jclip.step import compile_train_step

    size = int(np.prod(list(mesh_shape.values())))
    mesh = parallel.make_mesh(mesh_shape, devices=jax.devices()[:size])
    setup = TrainSetup.create(config, mesh)
    state = setup.init_state()
    batch = parallel.host_batch_to_global(random_batch(config), mesh)
    step = compile_train_step(setup, batch)
    new_state, metrics = step(state, batch)
    return jax.device_get(new_state["params"]), jax.device_get(metrics)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_gradient_accumulation_equals_whole_batch(loss):
    terms = {loss: {"weight": 1.0}}
    base = micro_config(losses=terms, **({"model.init_logit_bias": -10.0} if loss == "siglip" else {}))
    base.optim.grad_clip_norm = 0.0
    whole_params, whole_metrics = one_step(base, {"data": 1})
    accumulated = micro_config(losses=terms, **({"model.init_logit_bias": -10.0} if loss == "siglip" else {}))
    accumulated.optim.grad_clip_norm = 0.0
    accumulated.optim.accum_steps = 4
    accum_params, accum_metrics = one_step(accumulated, {"data": 2, "fsdp": 2})
    np.testing.assert_allclose(accum_metrics["loss/total"], whole_metrics["loss/total"], rtol=1e-5)
    np.testing.assert_allclose(accum_metrics["train/grad_norm"], whole_metrics["train/grad_norm"], rtol=1e-4)
    for got, want in zip(jax.tree.leaves(accum_params), jax.tree.leaves(whole_params)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_logit_scale_is_clamped_and_no_decay_on_norms_biases_embeddings():
    from jclip import optim

    config = micro_config()
    config.model.init_logit_scale = 6.0  # above ln 100: the first update must clamp it
    params, metrics = one_step(config, {"data": 1})
    assert float(params["logit_scale"]) <= np.log(100.0) + 1e-6
    assert metrics["train/logit_scale"] <= 100.0 + 1e-4

    from jclip.build import ModelFunctions

    names = {}
    flat = jax.tree_util.tree_flatten_with_path(ModelFunctions.create(config.model, 0).init_params())[0]
    for path, leaf in flat:
        names[optim.path_name(path)] = optim.decays(path, leaf)
    assert names["logit_scale"] is False
    assert not any(decay for name, decay in names.items() if "embedding" in name or "bias" in name or "ln_" in name)
    assert any(decay for name, decay in names.items() if "attn" in name or "mlp" in name)


def test_remat_gives_the_same_step_and_bfloat16_stays_close():
    reference_params, reference = one_step(micro_config(), {"data": 2})
    remat_params, remat = one_step(micro_config(**{"model.remat": True}), {"data": 2})
    np.testing.assert_allclose(remat["loss/total"], reference["loss/total"], rtol=1e-6)
    for got, want in zip(jax.tree.leaves(remat_params), jax.tree.leaves(reference_params)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    bf16_params, bf16 = one_step(micro_config(**{"model.dtype": "bfloat16"}), {"data": 2})
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(bf16_params)), "params stay float32"
    np.testing.assert_allclose(bf16["loss/total"], reference["loss/total"], rtol=2e-2)
    np.testing.assert_allclose(bf16["train/grad_norm"], reference["train/grad_norm"], rtol=0.1)
