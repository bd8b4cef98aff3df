"""The jitted train step: pure `(state, batch) -> (state, metrics)`, with exact gradient accumulation.

Loss of the configured terms over the model's outputs (shared/ARCHITECTURE.md, principle 1), gradients
with respect to the trainable parameters only (whole-batch, or accumulated over micro-batches by the
GradCache scheme; frozen parameters are constants, jclip.param_rules), the optimizer update and CLIP's
logit-scale clamp. `compile_train_step` jits it with the set-up's declared shardings and a donated state.

Non-finite steps. Every step checks its loss, its global gradient norm (NaN or infinite where any gradient is,
or where their squares overflow) and its loss terms' new state; where any of them is NaN or infinite, the update
is dropped: the returned state holds the incoming parameters, optimizer state and loss-term states (selected
with `jnp.where`, so the donated buffers are reused), the step counter still advances (the data moves on past
the batch), and the metric `train/nonfinite` is 1 (0 otherwise). The host reads that flag and applies
`config.nonfinite.policy` (jclip.nonfinite): `halt` stops the run before anything of that step is saved,
`skip` goes on. A dropped update also leaves the optimizer's own step count (the learning-rate schedule's
position) where it was.

The new parameters and AdamW moments are not checked: from finite gradients and a finite state, AdamW's update
is finite (the moments average the gradients and their squares; the step is bounded by the learning rate).
Checking them would read the whole state once more and make the selection wait for that reduction instead of
fusing into the update: 5% of `bench_step --shape=cpu-tiny`'s step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jclip import losses, optim, parallel
from jclip.build import Params, TrainSetup, TrainState
from jclip.teacher import Teacher


def _split_micro(x: jax.Array, accum_steps: int) -> jax.Array:
    """[B, ...] -> [accum, B/accum, ...]; micro-batch k takes rows k, k+accum, ... (keeps batch sharding)."""
    return jnp.swapaxes(x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]), 0, 1)


def _merge_micro(x: jax.Array) -> jax.Array:
    """Inverse of `_split_micro`."""
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def _accumulated_gradients(
    setup: TrainSetup, params: Params, frozen: Params, batch: dict[str, jax.Array], loss_fn: Callable, accum_steps: int
) -> tuple[jax.Array, Any, Params]:
    """Whole-batch gradients in `accum_steps` micro-batches, exact (the GradCache scheme).

    Contrastive losses couple every example of the global batch, so accumulating per-micro-batch losses
    would change the objective. Instead: (1) embed every micro-batch without gradients, (2) differentiate
    the loss of the whole batch with respect to the model outputs, (3) re-run each micro-batch and pull
    those output gradients back to the parameters. Activation memory is that of one micro-batch. Every
    batch field is split on its first axis ([B, K, L] fields too); outputs that are not floating point
    (masks) carry no gradient.
    `params` are the trainable parameters (the gradients' tree); `frozen` the rest, closed over as constants.
    """
    micro_batches = {name: _split_micro(value, accum_steps) for name, value in batch.items()}
    micro_size = next(iter(batch.values())).shape[0] // accum_steps

    def forward(p, micro):
        return setup.functions.apply(setup.partition.merge(p, frozen), micro)

    stacked = jax.lax.map(lambda micro: forward(params, micro), micro_batches)
    per_example = {name: value.ndim >= 2 and value.shape[1] == micro_size for name, value in stacked.items()}
    outputs = {name: _merge_micro(v) if per_example[name] else v[0] for name, v in stacked.items()}
    differentiable = {name for name, value in outputs.items() if jnp.issubdtype(value.dtype, jnp.inexact)}

    def loss_of_differentiable(float_outputs):
        return loss_fn({**outputs, **float_outputs})

    (loss, aux), output_grads = jax.value_and_grad(loss_of_differentiable, has_aux=True)(
        {name: outputs[name] for name in differentiable}
    )
    cotangents = {
        name: _split_micro(g, accum_steps)
        if per_example[name]
        else jnp.broadcast_to(g / accum_steps, (accum_steps, *g.shape))
        for name, g in output_grads.items()
    }

    def accumulate(grads, xs):
        micro, cotangent = xs
        _, pullback = jax.vjp(
            lambda p: {name: value for name, value in forward(p, micro).items() if name in differentiable},
            params,
        )
        (micro_grads,) = pullback(cotangent)
        return jax.tree.map(jnp.add, grads, micro_grads), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, _ = jax.lax.scan(accumulate, zeros, (micro_batches, cotangents))
    return loss, aux, grads


def _clamp_logit_scale(params: Params, max_log_scale: float) -> Params:
    """CLIP's clamp of the learnable log scale to [0, ln 100] after every optimizer step."""
    if "logit_scale" not in params:
        return params
    return {**params, "logit_scale": jnp.clip(params["logit_scale"], 0.0, max_log_scale)}


def all_finite(*trees: Any) -> jax.Array:
    """True where every floating-point element of `trees` is finite (integer leaves, e.g. counts, are skipped).

    Each leaf times 0 sums to 0, or to NaN where it holds an inf or a NaN. The square root ends the chain of
    sums: XLA treats it as costly and computes it once, where it would otherwise copy the chain into the fusion
    of every parameter's update that reads the flag (quadratic in the number of leaves: `bench_step`'s
    `cpu-small` step compiled in 77 s instead of 14.5 s). XLA does not fold a float `x * 0` to 0 (NaN-unsafe)."""
    leaves = [leaf for leaf in jax.tree.leaves(trees) if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    zero_or_nan = sum((jnp.sum(leaf * 0, dtype=jnp.float32) for leaf in leaves), jnp.float32(0))
    return jnp.isfinite(jnp.sqrt(zero_or_nan))


def _keep_if_finite(finite: jax.Array, new: Any, old: Any) -> Any:
    """`new` where `finite`, else `old`, leaf by leaf (the update of a non-finite step is dropped)."""
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def make_train_step(setup: TrainSetup, teacher: Teacher | None = None) -> Callable[..., tuple[TrainState, dict]]:
    """The pure train step `(state, batch, teacher_params) -> (state, metrics)`: loss of the configured
    terms (with a frozen teacher's embeddings among the outputs when there is one), gradients of the
    trainable parameters, AdamW update, logit-scale clamp."""
    config = setup.config
    accum_steps = int(config.optim.accum_steps)
    schedule = optim.learning_rate_schedule(config, int(config.total_steps))
    base_key = jax.random.key(int(config.seed))

    def train_step(state: TrainState, batch: dict[str, jax.Array], teacher_params: Any = None) -> tuple[TrainState, dict[str, jax.Array]]:
        step = state["step"]
        teacher_outputs = {} if teacher is None else teacher.outputs(teacher_params, batch)
        ctx = losses.LossContext(
            mesh=setup.mesh,
            step=step,
            total_steps=int(config.total_steps),
            rng=jax.random.fold_in(base_key, step),
            state=state.get("loss_state", {}),
        )

        def loss_from_outputs(outputs):
            return losses.total_loss_with_state({**outputs, **teacher_outputs}, batch, ctx, config.losses)

        trainable, frozen = setup.partition.split(state["params"])  # gradients and updates: trainable only
        if accum_steps == 1:
            def loss_from_params(params):
                params = setup.partition.merge(params, frozen)
                return loss_from_outputs(setup.functions.apply(params, batch))

            (loss, (metrics, loss_state)), grads = jax.value_and_grad(loss_from_params, has_aux=True)(trainable)
        else:
            loss, (metrics, loss_state), grads = _accumulated_gradients(
                setup, trainable, frozen, batch, loss_from_outputs, accum_steps
            )
        updates, opt_state = setup.optimizer.update(grads, state["opt_state"], trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        new_trainable = _clamp_logit_scale(new_trainable, float(config.optim.max_log_logit_scale))  # a frozen one stays put
        grad_norm = optax.tree.norm(grads)
        finite = all_finite(loss, grad_norm, loss_state)
        new_trainable, opt_state = _keep_if_finite(finite, (new_trainable, opt_state), (trainable, state["opt_state"]))
        if loss_state:
            loss_state = _keep_if_finite(finite, loss_state, state["loss_state"])
        params = setup.partition.merge(new_trainable, frozen)
        metrics = dict(metrics)
        metrics["train/grad_norm"] = grad_norm
        metrics["train/learning_rate"] = schedule(step)
        metrics["train/nonfinite"] = jnp.logical_not(finite).astype(jnp.int32)
        if "logit_scale" in params:
            metrics["train/logit_scale"] = jnp.exp(params["logit_scale"])
        new_state = {"step": step + 1, "params": params, "opt_state": opt_state}
        if loss_state:
            new_state["loss_state"] = loss_state
        return new_state, metrics

    return train_step


def jit_train_step(setup: TrainSetup, example_batch: dict[str, Any], teacher: Teacher | None = None) -> Any:
    """The train step under `jax.jit` with the declared shardings of the state, the batch (fields like
    `example_batch`'s: arrays or ShapeDtypeStructs) and the teacher; the state is donated. Trace, lower or call it
    inside `parallel.sharding_context(setup.mesh, setup.rules)`."""
    batch_shardings = {name: setup.batch_sharding(x.ndim) for name, x in example_batch.items()}
    return jax.jit(
        make_train_step(setup, teacher),
        in_shardings=(setup.state_shardings, batch_shardings, None if teacher is None else teacher.shardings),
        out_shardings=(setup.state_shardings, None),
        donate_argnums=(0,),
    )


def compile_train_step(setup: TrainSetup, example_batch: dict[str, jax.Array], teacher: Teacher | None = None) -> Callable:
    """`step(state, batch)` jitted with declared shardings; the state is donated so its buffers are updated
    in place. A teacher's parameters are an argument (not constants baked into the program)."""
    jitted = jit_train_step(setup, example_batch, teacher)
    teacher_params = None if teacher is None else teacher.params

    def step(state, batch):
        with parallel.sharding_context(setup.mesh, setup.rules):
            return jitted(state, batch, teacher_params)

    return step
