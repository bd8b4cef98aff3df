"""The train step: gradient accumulation equal to the whole-batch gradient, the logit-scale clamp, weight
decay only on matrices, remat and bfloat16."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jclip_testing import micro_config, random_batch


def one_step(config, mesh_shape, host_batch=None):
    from jclip import parallel
    from jclip.build import TrainSetup
    from jclip.step import compile_train_step

    size = int(np.prod(list(mesh_shape.values())))
    mesh = parallel.make_mesh(mesh_shape, devices=jax.devices()[:size])
    setup = TrainSetup.create(config, mesh)
    state = setup.init_state()
    batch = parallel.host_batch_to_global(random_batch(config) if host_batch is None else host_batch, mesh)
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


def test_gradient_accumulation_is_exact_for_extra_fields_and_token_outputs():
    """GradCache splits every batch field, [B, K, L] ones too, and pulls back the gradients of token-level
    outputs and of embeddings of extra captions (the toy method's term reads both; tests/toy_method)."""
    from toy_method import loss  # registers the toy_hard_negatives term

    assert loss.toy_hard_negatives
    terms = {"clip": {"weight": 1.0}, "toy_hard_negatives": {"weight": 0.5}}
    host_batch = random_batch(micro_config())
    rng = np.random.default_rng(1)
    shuffled = np.repeat(host_batch["token_ids"][:, None], 3, axis=1)
    for row in shuffled.reshape(-1, shuffled.shape[-1]):
        row[:-1] = rng.permutation(row[:-1])  # the end token (last) stays in place
    host_batch["shuffled_token_ids"] = shuffled
    results = []
    for accum_steps, mesh in ((1, {"data": 1}), (4, {"data": 2, "fsdp": 2})):
        config = micro_config(losses=terms)
        config.optim.grad_clip_norm = 0.0
        config.optim.accum_steps = accum_steps
        results.append(one_step(config, mesh, dict(host_batch)))
    (whole_params, whole), (accum_params, accum) = results
    assert 0.0 < whole["loss/toy_hard_negatives"] and whole["toy/negatives_used"] > 0.5
    np.testing.assert_allclose(accum["loss/toy_hard_negatives"], whole["loss/toy_hard_negatives"], rtol=1e-5)
    np.testing.assert_allclose(accum["loss/total"], whole["loss/total"], rtol=1e-5)
    np.testing.assert_allclose(accum["train/grad_norm"], whole["train/grad_norm"], rtol=1e-4)
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


@pytest.mark.parametrize("scan_layers", [False, True], ids=["per-layer", "scanned"])
def test_training_on_data_fsdp_tensor_2x2x2_equals_one_device(scan_layers):
    """A few steps on a (data 2, fsdp 2, tensor 2) mesh of 8 fake devices: parameters split over fsdp and
    tensor, the batch over data x fsdp. Same losses and weights as on one device (scanned blocks too)."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices; tests/conftest.py sets XLA_FLAGS before jax is imported")
    config = micro_config(**{"model.vision.layers": 2, "model.scan_layers": scan_layers})
    _, initial, final, history = run_steps(config, 3, {"data": 1})
    setup, sharded_initial, sharded_final, sharded_history = run_steps(config, 3, {"data": 2, "fsdp": 2, "tensor": 2})
    mlp = setup.state_shardings["params"]["visual"]["transformer"]["blocks"]
    mlp = (mlp if scan_layers else mlp[0])["mlp"]["c_fc"]["kernel"]
    assert "fsdp" in mlp.spec and "tensor" in mlp.spec
    for got, want in zip(jax.tree.leaves(sharded_initial["params"]), jax.tree.leaves(initial["params"])):
        np.testing.assert_array_equal(got, want)  # the same initialisation however it is laid out
    for sharded, single in zip(sharded_history, history):
        np.testing.assert_allclose(sharded["loss/total"], single["loss/total"], rtol=1e-5)
        np.testing.assert_allclose(sharded["train/grad_norm"], single["train/grad_norm"], rtol=1e-4)
    assert_trained_params_close(sharded_final["params"], final["params"])


def assert_trained_params_close(got_params, want_params) -> None:
    """Parameters after a few AdamW steps agree to rtol 1e-4, atol 1e-6, except the attention's key bias.

    The key bias shifts every logit of a query's row alike, so softmax cancels it: its exact gradient is 0, and
    AdamW turns the rounding noise left in its place into updates of either sign, which any change of summation
    order changes. It is compared loosely; the query and value biases as strictly as every other parameter.
    """
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(want_params), jax.tree.leaves(got_params)):
        name = jax.tree_util.keystr(path)
        got, want = np.asarray(got), np.asarray(want)
        if name.endswith("['attn']['in_bias']"):  # [..., q/k/v, heads, head_dim]
            np.testing.assert_allclose(got[..., 1, :, :], want[..., 1, :, :], atol=2e-5, err_msg=name)
            got, want = np.delete(got, 1, axis=-3), np.delete(want, 1, axis=-3)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=name)


# Parameter rules (jclip/param_rules.py): frozen parameters, learning-rate multipliers, the default table.


def run_steps(config, steps, mesh_shape):
    """`steps` compiled train steps on seeded random batches: (setup, initial state, final state, metrics)."""
    from jclip import parallel
    from jclip.build import TrainSetup
    from jclip.step import compile_train_step

    size = int(np.prod(list(mesh_shape.values())))
    mesh = parallel.make_mesh(mesh_shape, devices=jax.devices()[:size])
    setup = TrainSetup.create(config, mesh)
    state = setup.init_state()
    initial = jax.device_get(state)  # a host copy: the step donates the state's buffers
    history = []
    step = None
    for seed in range(steps):
        batch = parallel.host_batch_to_global(random_batch(config, seed), mesh)
        step = step or compile_train_step(setup, batch)
        state, metrics = step(state, batch)
        history.append(jax.device_get(metrics))
    return setup, initial, jax.device_get(state), history


def by_path(tree):
    from jclip.optim import path_name

    return {path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def reference_loss_and_grads(setup, params, batch, step=0):
    """The loss of the clip term and its gradients with respect to EVERY parameter (no rules involved);
    to be traced under `parallel.sharding_context`."""
    from jclip import losses

    config = setup.config

    def loss_fn(params):
        outputs = setup.functions.apply(params, batch)
        ctx = losses.LossContext(
            mesh=setup.mesh, step=step, total_steps=int(config.total_steps),
            rng=jax.random.fold_in(jax.random.key(int(config.seed)), step), state={},
        )
        return losses.total_loss_with_state(outputs, batch, ctx, config.losses)[0]

    return jax.value_and_grad(loss_fn)(params)


def frozen_vision_config(accum_steps):
    config = micro_config(**{"model.init_logit_scale": 6.0, "optim.warmup_steps": 0, "optim.accum_steps": accum_steps})
    config.optim.tower_locks.vision.enabled = True
    config.optim.param_rules = [["logit_scale", "frozen"], [".*", "trainable"]]
    return config


def test_frozen_parameters_stay_put_have_no_optimizer_state_and_no_gradient():
    from jclip.optim import path_name

    runs = {accum: run_steps(frozen_vision_config(accum), 3, {"data": 2}) for accum in (1, 2)}
    for accum, (setup, initial, final, history) in runs.items():
        before, after = by_path(initial["params"]), by_path(final["params"])
        frozen = {path for path in before if path.startswith("visual/") or path == "logit_scale"}
        trainable = set(before) - frozen
        assert len(frozen) == 21 and len(trainable) == 17
        for path in frozen:  # bit-identical after 3 steps; logit_scale 6.0 > ln 100 is not even clamped
            np.testing.assert_array_equal(after[path], before[path], err_msg=path)
        assert float(after["logit_scale"]) == 6.0
        for path in trainable:
            assert np.any(after[path] != before[path]), f"{path} did not move (accum_steps={accum})"
        # the optimizer state: AdamW's mu and nu for the trainable parameters only, plus integer counts
        opt_leaves = jax.tree_util.tree_flatten_with_path(final["opt_state"])[0]
        assert not any("visual/" in path_name(path) or path_name(path).endswith("logit_scale") for path, _ in opt_leaves)
        float_shapes = sorted(leaf.shape for _, leaf in opt_leaves if np.issubdtype(leaf.dtype, np.floating))
        assert float_shapes == sorted([before[path].shape for path in trainable] * 2)
        assert all(np.issubdtype(leaf.dtype, np.integer) and leaf.shape == () for _, leaf in opt_leaves
                   if not np.issubdtype(leaf.dtype, np.floating))
        assert jax.tree.structure(setup.abstract_state()) == jax.tree.structure(initial)
        # the logged gradient norm is that of the trainable parameters' gradients (first step)
        from jclip import parallel

        batch = parallel.host_batch_to_global(random_batch(setup.config, 0), setup.mesh)
        with parallel.sharding_context(setup.mesh, setup.rules):
            loss, grads = jax.jit(lambda params: reference_loss_and_grads(setup, params, batch))(initial["params"])
        grads = by_path(jax.device_get(grads))
        want_norm = np.sqrt(sum(np.sum(np.square(grads[path], dtype=np.float64)) for path in trainable))
        np.testing.assert_allclose(history[0]["train/grad_norm"], want_norm, rtol=1e-5)
        np.testing.assert_allclose(history[0]["loss/total"], loss, rtol=1e-6)
    # GradCache with frozen parameters equals the whole-batch step
    assert_trained_params_close(runs[2][2]["params"], runs[1][2]["params"])


def test_a_learning_rate_multiplier_is_that_parameters_learning_rate():
    def first_step(learning_rate, rules=None):
        config = micro_config(**{"optim.warmup_steps": 0, "optim.learning_rate": learning_rate})
        if rules is not None:
            config.optim.param_rules = rules
        _, initial, final, _ = run_steps(config, 1, {"data": 1})
        return by_path(initial["params"]), by_path(final["params"])

    scaled = {"visual/projection", "text/token_embedding", "text/transformer/blocks/0/mlp/c_fc/kernel"}
    initial, with_multiplier = first_step(1e-3, [["|".join(scaled), 0.25], [".*", "trainable"]])
    _, quarter_rate = first_step(0.25e-3)
    _, full_rate = first_step(1e-3)
    for path, value in with_multiplier.items():
        if path not in scaled:  # the others: exactly the full-rate run
            np.testing.assert_array_equal(value, full_rate[path], err_msg=path)
            continue
        # the update of the 0.25 x lr run (AdamW's decay included: visual/projection and c_fc/kernel decay).
        # Not bit-exact: XLA compiles the extra multiply into a different program; measured differences
        # are a few ulps of the parameter (below 1e-4 of the update), against 0.75 of it at the full rate.
        update, want = value - initial[path], quarter_rate[path] - initial[path]
        scale = np.max(np.abs(want))
        assert np.max(np.abs(update - want)) <= 1e-4 * scale, path
        assert np.max(np.abs(full_rate[path] - initial[path] - want)) >= 0.5 * scale, path


def test_the_default_rules_give_the_step_of_a_run_without_rules():
    """Today's step (everything differentiated, the optimizer over all parameters) written out here, against
    `make_train_step` under the default table: the same loss, parameters and optimizer state, bit for bit."""
    import optax

    from jclip import optim, parallel
    from jclip.build import TrainSetup
    from jclip.step import make_train_step

    config = micro_config(**{"optim.warmup_steps": 0})
    mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    setup = TrainSetup.create(config, mesh)
    optimizer = optim.make_optimizer(config)

    def reference_step(state, batch):
        loss, grads = reference_loss_and_grads(setup, state["params"], batch, state["step"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        params["logit_scale"] = jax.numpy.clip(params["logit_scale"], 0.0, float(config.optim.max_log_logit_scale))
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, loss

    initial = jax.device_get(setup.init_state())
    assert jax.tree.structure(initial["opt_state"]) == jax.tree.structure(optimizer.init(initial["params"]))
    ours, reference = initial, initial
    train_step = jax.jit(make_train_step(setup))
    with parallel.sharding_context(setup.mesh, setup.rules):
        for seed in range(2):
            batch = random_batch(config, seed)
            ours, metrics = train_step(ours, batch)
            reference, loss = jax.jit(reference_step)(reference, batch)
            assert float(metrics["loss/total"]) == float(loss)
    assert jax.tree.structure(ours) == jax.tree.structure(reference)
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(got, want)


def test_freezing_the_image_tower_removes_its_backward_flops():
    from jclip import parallel
    from jclip.build import TrainSetup
    from jclip.step import make_train_step

    mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    example = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), random_batch(micro_config()))

    def flops(fn, *args):
        with parallel.sharding_context(mesh, TrainSetup.create(micro_config(), mesh).rules):
            return float(jax.jit(fn).lower(*args).compile().cost_analysis()["flops"])

    def step_flops(config):
        setup = TrainSetup.create(config, mesh)
        return flops(make_train_step(setup), setup.abstract_state(), example)

    config = micro_config(**{"model.vision.layers": 2, "model.vision.width": 64, "model.vision.head_width": 16})
    everything = step_flops(config)
    config.optim.tower_locks.vision.enabled = True
    frozen_image = step_flops(config)
    setup = TrainSetup.create(config, mesh)
    image_forward = flops(setup.functions.encode_images, setup.abstract_state()["params"], example["images"])
    # Training the image tower costs its forward F plus its backward. For every matmul (and the patch
    # convolution) y = x W, the backward computes dx = dy W^T and dW = x^T dy, each as many flops as the
    # forward product: about 2F; layer norms, softmax and GELU cost the same order backward as forward.
    # Frozen, no parameter upstream of the image embeddings needs a gradient, so the whole backward through
    # the tower goes (and AdamW's update of its parameters), while its forward stays: saved ~ 2F + the
    # update. 1.5F leaves 25% for what XLA counts differently. The 64-wide tower keeps matmuls dominant
    # (measured: saved / F = 1.88 here; 1.62 with the 16-wide micro tower, where norms and softmax weigh more).
    saved = everything - frozen_image
    print(f"step flops: all trainable {everything:.0f}, image tower frozen {frozen_image:.0f}, saved {saved:.0f}, "
          f"image forward {image_forward:.0f} (saved / forward = {saved / image_forward:.2f})")
    assert saved >= 1.5 * image_forward
    assert frozen_image > image_forward  # the frozen tower's forward still runs


# Non-finite steps: the update is dropped inside the step (jclip.step's docstring).


def test_a_non_finite_step_keeps_params_and_optimizer_state_advances_the_step_and_flags_it():
    """A finite step is the plain AdamW update of the reference gradients (the guard changes nothing) with
    train/nonfinite 0. A NaN pixel makes the loss and every gradient NaN: the step returns the incoming
    parameters and optimizer state (bit-identical, through the donated buffers), step + 1 and train/nonfinite 1;
    the next finite batch trains on from there."""
    import optax

    from jclip import parallel
    from jclip.build import TrainSetup
    from jclip.step import compile_train_step

    config = micro_config()
    mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    setup = TrainSetup.create(config, mesh)
    bad = random_batch(config, 1)
    bad["images"][3, 0, 0, 0] = np.nan
    batches = [parallel.host_batch_to_global(b, mesh) for b in (random_batch(config, 0), bad, random_batch(config, 2))]
    step = compile_train_step(setup, batches[0])
    state = setup.init_state()
    initial = jax.device_get(state)  # a host copy: the step donates the state's buffers
    state, first = step(state, batches[0])
    before, first = jax.device_get(state), jax.device_get(first)
    assert int(first["train/nonfinite"]) == 0 and int(before["step"]) == 1

    def reference_update(params, opt_state):
        loss, grads = reference_loss_and_grads(setup, params, batches[0])
        updates, opt_state = setup.optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        params["logit_scale"] = jax.numpy.clip(params["logit_scale"], 0.0, float(config.optim.max_log_logit_scale))
        return loss, params, opt_state

    with parallel.sharding_context(setup.mesh, setup.rules):
        loss, params, opt_state = jax.device_get(jax.jit(reference_update)(initial["params"], initial["opt_state"]))
    np.testing.assert_allclose(first["loss/total"], loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(params)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    for got, want in zip(jax.tree.leaves(before["opt_state"]), jax.tree.leaves(opt_state)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-8)  # mu, nu: gradients to float rounding

    state, metrics = step(state, batches[1])
    after, metrics = jax.device_get(state), jax.device_get(metrics)
    assert int(metrics["train/nonfinite"]) == 1 and np.isnan(metrics["loss/total"]) and np.isnan(metrics["train/grad_norm"])
    assert int(after["step"]) == 2
    for got, want in zip(jax.tree.leaves((after["params"], after["opt_state"])),
                         jax.tree.leaves((before["params"], before["opt_state"]))):
        np.testing.assert_array_equal(got, want)
    state, metrics = step(state, batches[2])
    assert int(jax.device_get(metrics["train/nonfinite"])) == 0
    moved = jax.device_get(state["params"])
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(moved))
    assert any(np.any(g != w) for g, w in zip(jax.tree.leaves(moved), jax.tree.leaves(before["params"])))


def test_all_finite_flags_any_inf_or_nan_in_any_leaf_and_skips_integer_leaves():
    """Against NumPy's isfinite over every leaf, eager and jitted; the largest finite floats stay finite (the check
    must not overflow), integer leaves (counts) are not read."""
    from jclip.step import all_finite

    rng = np.random.default_rng(0)
    base = [rng.normal(size=(3, 5)).astype(np.float32) for _ in range(12)]
    base[2][0, :2] = np.finfo(np.float32).max  # their sum would overflow
    base[5][1, 1] = -np.finfo(np.float32).max
    base[7][2, 2] = np.finfo(np.float32).tiny / 4  # subnormal
    cases = {"finite": base}
    for name, value in (("inf", np.inf), ("-inf", -np.inf), ("nan", np.nan)):
        broken = [leaf.copy() for leaf in base]
        broken[-1][2, 4] = value  # the last element of the last leaf
        cases[name] = broken
    for name, leaves in cases.items():
        want = all(np.isfinite(leaf).all() for leaf in leaves)
        tree = {"params": leaves[:-1], "scalar": np.float32(1.0), "count": np.int32(7), "last": leaves[-1]}
        assert bool(all_finite(tree)) is want, name
        assert bool(jax.jit(all_finite)(tree, jax.numpy.float32(2.0))) is want, name
    assert bool(all_finite({"count": np.int32(1)}))
    assert not bool(all_finite(np.float32(0.0), jax.numpy.array([1.0, np.inf], jax.numpy.bfloat16)))


def test_the_finite_flag_is_computed_once_not_copied_into_every_guarded_update():
    """The step keeps every parameter where the update is finite; XLA used to copy the flag's reduction chain
    into each parameter's fused select, so the program grew with the square of the leaf count (the micro step's
    compile took 8.5 s instead of 4). Three times the leaves must give about three times the program."""
    from jclip.step import all_finite

    def guarded_program_lines(leaf_count):
        def guarded(tree):
            new = [leaf * 0.5 + 1 for leaf in tree]
            finite = all_finite(new)
            return [jax.numpy.where(finite, a, b) for a, b in zip(new, tree)]

        tree = [jax.numpy.full((4, 4), float(i)) for i in range(leaf_count)]
        return jax.jit(guarded).lower(tree).compile().as_text().count("\n")

    assert guarded_program_lines(48) < 4 * guarded_program_lines(16)


def test_adamw_of_finite_gradients_stays_finite_and_overflowing_gradients_make_the_norm_infinite():
    """Why the step checks the loss and the gradient norm but not the new state: jclip's optimizer (AdamW with
    weight decay, with and without clipping), fed for many steps the largest gradients whose global norm is
    still finite, keeps parameters and moments finite; gradients whose squares overflow make the norm infinite,
    which the step flags."""
    import jax.numpy as jnp
    import optax

    from jclip.optim import make_optimizer
    from jclip.step import all_finite

    rng = np.random.default_rng(0)
    start = {"kernel": jnp.asarray(rng.normal(size=(8, 8)), jnp.float32),
             "bias": jnp.asarray(rng.normal(size=(8,)), jnp.float32),
             "logit_scale": jnp.float32(2.6)}
    elements = sum(leaf.size for leaf in jax.tree.leaves(start))
    largest = float(np.sqrt(np.finfo(np.float32).max / elements)) * 0.99  # the sum of squares just fits
    for clip in (1.0, 0.0):
        config = micro_config()
        config.optim.grad_clip_norm = clip
        optimizer = make_optimizer(config)
        params, state = start, optimizer.init(start)
        for step in range(20):
            sign = 1.0 if step % 3 else -1.0
            grads = jax.tree.map(lambda p: jnp.full_like(p, sign * largest), params)
            assert np.isfinite(float(optax.tree.norm(grads)))
            updates, state = optimizer.update(grads, state, params)
            params = optax.apply_updates(params, updates)
            assert bool(all_finite(params, state)), (clip, step)
    overflowing = jax.tree.map(lambda p: jnp.full_like(p, 2 * largest), params)
    assert not np.isfinite(float(optax.tree.norm(overflowing)))
