"""The training loop: one jitted, sharded, donated train step over a Grain stream, with evals and checkpoints.

One small function per phase: set-up (mesh, model functions, optimizer, shardings), init or restore, the
step, evaluation, saving, logging. Data flows one way (shared/ARCHITECTURE.md): config -> mesh, model,
optimizer, input pipeline -> step -> metrics, evaluators, checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from collections.abc import Callable
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jclip import checkpoint, evals, init_from, losses, models, optim, parallel
from jclip.config_validation import ConfigError, validate_config
from jclip.data import pipeline, robust
from jclip.data.sources import ConfiguredData
from jclip.evals.common import Encoders
from jclip.metrics import MetricsWriter, Progress
from jclip.teacher import Teacher, load_teacher

Params = dict[str, Any]
# {"step": int32 [], "params": Params, "opt_state": optax state, "loss_state": stateful terms' states (if any)}
TrainState = dict[str, Any]

log = logging.getLogger("jclip")


@dataclasses.dataclass(frozen=True)
class ModelFunctions:
    """Pure functions of the NNX model over a params pure-dict (the model's graph is static)."""

    graphdef: Any
    abstract_state: Any  # nnx.State of ShapeDtypeStructs, carrying the logical partition metadata
    model_config: ml_collections.ConfigDict
    seed: int

    @classmethod
    def create(cls, model_config: ml_collections.ConfigDict, seed: int) -> "ModelFunctions":
        with nnx.use_eager_sharding(False):
            abstract_model = nnx.eval_shape(lambda: models.build_model(model_config, nnx.Rngs(seed)))
        graphdef, abstract_state = nnx.split(abstract_model)
        return cls(graphdef, abstract_state, model_config, seed)

    def model(self, params: Params) -> nnx.Module:
        state = jax.tree.map(lambda leaf: leaf, self.abstract_state)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)

    def init_params(self) -> Params:
        with nnx.use_eager_sharding(False):
            model = models.build_model(self.model_config, nnx.Rngs(self.seed))
        return nnx.to_pure_dict(nnx.state(model))

    def apply(self, params: Params, images: jax.Array, token_ids: jax.Array) -> dict[str, jax.Array]:
        return self.model(params)(images, token_ids)

    def encode_images(self, params: Params, images: jax.Array) -> jax.Array:
        return _l2_normalise(self.model(params).encode_image(images))

    def encode_texts(self, params: Params, token_ids: jax.Array) -> jax.Array:
        return _l2_normalise(self.model(params).encode_text(token_ids))

    def param_shardings(self, mesh: Mesh, rules) -> Params:
        with nnx.logical_axis_rules(rules):
            specs = nnx.get_partition_spec(self.abstract_state)
        return jax.tree.map(lambda spec: NamedSharding(mesh, spec), nnx.to_pure_dict(specs))


def _l2_normalise(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """Everything the step and the loop need, derived once from the config."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    rules: tuple
    functions: ModelFunctions
    optimizer: optax.GradientTransformation
    state_shardings: TrainState

    @classmethod
    def create(cls, config: ml_collections.ConfigDict, mesh: Mesh) -> "TrainSetup":
        rules = parallel.rules_from_config(config.sharding_rules)
        functions = ModelFunctions.create(config.model, config.seed)
        optimizer = optim.make_optimizer(config)
        params_sharding = functions.param_shardings(mesh, rules)
        abstract_params = nnx.to_pure_dict(functions.abstract_state)
        abstract_opt_state = jax.eval_shape(optimizer.init, abstract_params)
        replicated = NamedSharding(mesh, PartitionSpec())
        opt_sharding = optax.tree_map_params(
            optimizer,
            lambda _, sharding: sharding,
            abstract_opt_state,
            params_sharding,
            transform_non_params=lambda _: replicated,
        )
        state_shardings = {"step": replicated, "params": params_sharding, "opt_state": opt_sharding}
        try:
            loss_state = jax.eval_shape(lambda: initial_loss_state(config, functions, abstract_params))
        except ValueError as error:  # e.g. the nclip term without prototype heads in the model
            raise ConfigError(f"losses: {error}") from error
        if loss_state:
            state_shardings["loss_state"] = jax.tree.map(lambda _: replicated, loss_state)
        return cls(config, mesh, rules, functions, optimizer, state_shardings)

    def abstract_state(self) -> TrainState:
        abstract = jax.eval_shape(self._init_state)
        return jax.tree.map(
            lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
            abstract,
            self.state_shardings,
        )

    def _init_state(self) -> TrainState:
        params = self.functions.init_params()
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.optimizer.init(params)}
        loss_state = initial_loss_state(self.config, self.functions, params)
        if loss_state:
            state["loss_state"] = loss_state
        return state

    def init_state(self) -> TrainState:
        with parallel.sharding_context(self.mesh, self.rules):
            return jax.jit(self._init_state, out_shardings=self.state_shardings)()

    def batch_sharding(self, ndim: int) -> NamedSharding:
        return NamedSharding(self.mesh, parallel.batch_spec(ndim))

    def encoders(self) -> Encoders:
        def jitted(fn: Callable) -> Callable:
            compiled = jax.jit(fn, out_shardings=self.batch_sharding(2))

            def call(params, inputs):
                with parallel.sharding_context(self.mesh, self.rules):
                    return compiled(params, inputs)

            return call

        return Encoders(
            encode_images=jitted(self.functions.encode_images),
            encode_texts=jitted(self.functions.encode_texts),
            mesh=self.mesh,
            context_length=int(self.config.model.text.context_length),
            tokenizer_spec=str(self.config.data.tokenizer),
        )


def initial_loss_state(config: ml_collections.ConfigDict, functions: ModelFunctions, params: Params) -> dict[str, Any]:
    """The states of the config's stateful loss terms (e.g. nCLIP's EMA centres), from the output shapes."""
    size = int(config.model.vision.image_size)
    images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    token_ids = jax.ShapeDtypeStruct((2, int(config.model.text.context_length)), jnp.int32)
    abstract_outputs = jax.eval_shape(functions.apply, params, images, token_ids)
    return losses.init_loss_state(config.losses, abstract_outputs)


def _split_micro(x: jax.Array, accum_steps: int) -> jax.Array:
    """[B, ...] -> [accum, B/accum, ...]; micro-batch k takes rows k, k+accum, ... (keeps batch sharding)."""
    return jnp.swapaxes(x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]), 0, 1)


def _merge_micro(x: jax.Array) -> jax.Array:
    """Inverse of `_split_micro`."""
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def _accumulated_gradients(
    setup: TrainSetup, params: Params, batch: dict[str, jax.Array], loss_fn: Callable, accum_steps: int
) -> tuple[jax.Array, Any, Params]:
    """Whole-batch gradients in `accum_steps` micro-batches, exact (the GradCache scheme).

    Contrastive losses couple every example of the global batch, so accumulating per-micro-batch losses
    would change the objective. Instead: (1) embed every micro-batch without gradients, (2) differentiate
    the loss of the whole batch with respect to the embeddings, (3) re-run each micro-batch and pull those
    embedding gradients back to the parameters. Activation memory is that of one micro-batch.
    """
    micro_images = _split_micro(batch["images"], accum_steps)
    micro_tokens = _split_micro(batch["token_ids"], accum_steps)
    micro_size = batch["images"].shape[0] // accum_steps

    def forward(p, images, token_ids):
        return setup.functions.apply(p, images, token_ids)

    stacked = jax.lax.map(lambda xs: forward(params, *xs), (micro_images, micro_tokens))
    per_example = {name: value.ndim >= 2 and value.shape[1] == micro_size for name, value in stacked.items()}
    outputs = {name: _merge_micro(v) if per_example[name] else v[0] for name, v in stacked.items()}
    (loss, aux), output_grads = jax.value_and_grad(loss_fn, has_aux=True)(outputs)
    cotangents = {
        name: _split_micro(g, accum_steps)
        if per_example[name]
        else jnp.broadcast_to(g / accum_steps, (accum_steps, *g.shape))
        for name, g in output_grads.items()
    }

    def accumulate(grads, xs):
        images, token_ids, cotangent = xs
        _, pullback = jax.vjp(lambda p: forward(p, images, token_ids), params)
        (micro_grads,) = pullback(cotangent)
        return jax.tree.map(jnp.add, grads, micro_grads), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, _ = jax.lax.scan(accumulate, zeros, (micro_images, micro_tokens, cotangents))
    return loss, aux, grads


def _clamp_logit_scale(params: Params, max_log_scale: float) -> Params:
    """CLIP's clamp of the learnable log scale to [0, ln 100] after every optimizer step."""
    if "logit_scale" not in params:
        return params
    return {**params, "logit_scale": jnp.clip(params["logit_scale"], 0.0, max_log_scale)}


def make_train_step(setup: TrainSetup, teacher: Teacher | None = None) -> Callable[..., tuple[TrainState, dict]]:
    """The pure train step `(state, batch, teacher_params) -> (state, metrics)`: loss of the configured
    terms (with a frozen teacher's embeddings among the outputs when there is one), gradients, AdamW
    update, logit-scale clamp."""
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

        if accum_steps == 1:
            def loss_from_params(params):
                return loss_from_outputs(setup.functions.apply(params, batch["images"], batch["token_ids"]))

            (loss, (metrics, loss_state)), grads = jax.value_and_grad(loss_from_params, has_aux=True)(state["params"])
        else:
            loss, (metrics, loss_state), grads = _accumulated_gradients(
                setup, state["params"], batch, loss_from_outputs, accum_steps
            )
        updates, opt_state = setup.optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        params = _clamp_logit_scale(params, float(config.optim.max_log_logit_scale))
        metrics = dict(metrics)
        metrics["train/grad_norm"] = optax.tree.norm(grads)
        metrics["train/learning_rate"] = schedule(step)
        if "logit_scale" in params:
            metrics["train/logit_scale"] = jnp.exp(params["logit_scale"])
        new_state = {"step": step + 1, "params": params, "opt_state": opt_state}
        if loss_state:
            new_state["loss_state"] = loss_state
        return new_state, metrics

    return train_step


def compile_train_step(setup: TrainSetup, example_batch: dict[str, jax.Array], teacher: Teacher | None = None) -> Callable:
    """`step(state, batch)` jitted with declared shardings; the state is donated so its buffers are updated
    in place. A teacher's parameters are an argument (not constants baked into the program)."""
    batch_shardings = {name: setup.batch_sharding(x.ndim) for name, x in example_batch.items()}
    jitted = jax.jit(
        make_train_step(setup, teacher),
        in_shardings=(setup.state_shardings, batch_shardings, None if teacher is None else teacher.shardings),
        out_shardings=(setup.state_shardings, None),
        donate_argnums=(0,),
    )
    teacher_params = None if teacher is None else teacher.params

    def step(state, batch):
        with parallel.sharding_context(setup.mesh, setup.rules):
            return jitted(state, batch, teacher_params)

    return step


def _prepare_data(data: ConfiguredData, config: ml_collections.ConfigDict) -> None:
    """Opens every source the run reads (building the embedded dataset once, on process 0) so that a
    missing dataset or path fails at start-up; then the other processes open them too."""
    splits = {(entry.split, entry.get("source")) for entry in config.evals.values() if "split" in entry}
    if jax.process_index() == 0:
        data.prepare(splits)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jclip: data prepared")
        data.prepare(splits)


def _gather_counters(counter: robust.SkipCounter) -> dict[str, dict]:
    """Every process's skip counters, keyed `process_<i>` (all processes must call this together)."""
    states = [counter.state()]
    if jax.process_count() > 1:
        vector = np.asarray([counter.good, counter.caption_truncated, *counter.totals().values()], np.int64)
        gathered = np.asarray(multihost_utils.process_allgather(vector)).reshape(jax.process_count(), -1)
        states = [
            {"good": int(row[0]), "caption_truncated": int(row[1]),
             "skipped": dict(zip(robust.SKIP_REASONS, (int(v) for v in row[2:])))}
            for row in gathered
        ]
    return {f"process_{index}": state for index, state in enumerate(states)}


def _global_skip_metrics(counter: robust.SkipCounter) -> robust.SkipCounter:
    """A counter holding the totals of all processes (for the skip-rate check and the logged metrics)."""
    if jax.process_count() == 1:
        return counter
    return robust.SkipCounter.merged(list(_gather_counters(counter).values()), min_examples=counter.min_examples)


def run_evaluators(evaluators, state: TrainState, encoders: Encoders, step: int, writer: MetricsWriter, final: bool) -> dict:
    results = {}
    for evaluator in evaluators:
        if not evaluator.due(step, final):
            continue
        started = time.perf_counter()
        values = evaluator.run(state["params"], encoders)
        values = {f"eval/{evaluator.name}/{key}": value for key, value in values.items()}
        values[f"eval/{evaluator.name}/seconds"] = time.perf_counter() - started
        writer.write(step, values)
        results.update(values)
        if jax.process_index() == 0:
            shown = ", ".join(
                f"{key.split('/', 2)[-1]} {value:.4f}" for key, value in values.items() if "/count/" not in key
            )
            print(f"eval {evaluator.name} @ step {step}: {shown}", flush=True)
    return results


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, float]:
    """Trains (or resumes) the configured run in `workdir`; returns the final evaluation metrics."""
    workdir = pathlib.Path(workdir)
    mesh = parallel.make_mesh(dict(config.mesh))
    validate_config(config, mesh)
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))

    data = ConfiguredData(config.data, config.model)
    _prepare_data(data, config)
    train_iterator = iter(data.training_dataset(seed=int(config.seed), shard=pipeline.HostShard.current()))
    skip_counter = robust.SkipCounter(min_examples=int(config.data.skip_check_after))
    setup = TrainSetup.create(config, mesh)
    teacher = load_teacher(config, mesh)
    checkpointer = checkpoint.Checkpointer(
        workdir / "checkpoints", keep=int(config.keep_checkpoints), async_save=bool(config.async_checkpointing)
    )
    latest = checkpointer.latest_step()
    if latest is None:
        state = setup.init_state()
        if config.get("init_from"):
            params, kept = init_from.initial_params(config, setup, state["params"])
            state = {**state, "params": params}
            if is_main:
                print(f"initialised the parameters from {config.init_from}"
                      + (f"; kept at initialisation: {', '.join(kept)}" if kept else ""), flush=True)
    else:
        state = checkpointer.restore(latest, setup.abstract_state(), train_iterator)
        counters = checkpointer.restore_counters(latest)
        if counters is not None:
            skip_counter = robust.SkipCounter.from_state(counters, min_examples=int(config.data.skip_check_after))
        if is_main:
            print(f"resumed from {checkpointer.directory} at step {latest}", flush=True)
    start_step = int(jax.device_get(state["step"]))

    evaluators = evals.build_evaluators(config.evals, data)
    encoders = setup.encoders()
    writer = MetricsWriter(workdir, enabled=is_main)
    total_steps = int(config.total_steps)
    progress = Progress(total_steps, int(config.data.batch_size), enabled=is_main)
    if is_main:
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
        print(
            f"jclip: {n_params:,} parameters, mesh {dict(mesh.shape)}, {jax.process_count()} process(es), "
            f"global batch {config.data.batch_size}, steps {start_step}->{total_steps}, workdir {workdir}",
            flush=True,
        )

    train_step = None
    final_metrics: dict[str, float] = {}
    step = start_step
    for step in range(start_step + 1, total_steps + 1):
        host_batch = skip_counter.update(next(train_iterator))
        batch = parallel.host_batch_to_global(host_batch, mesh)
        if train_step is None:
            train_step = compile_train_step(setup, batch, teacher)
        state, metrics = train_step(state, batch)
        if step == start_step + 1:
            jax.block_until_ready(metrics)
            progress.start(step)
        if step % int(config.log_every) == 0 or step == total_steps:
            metrics = jax.device_get(metrics)
            loss = float(metrics["loss/total"])
            if not np.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step}; metrics: {metrics}")
            metrics.update(progress.update(step, loss))
            global_skips = _global_skip_metrics(skip_counter)
            metrics.update(global_skips.metrics())
            writer.write(step, metrics)
            global_skips.check(float(config.data.max_skip_rate))
        if step % int(config.checkpoint_every) == 0 or step == total_steps:
            checkpointer.save(step, state, train_iterator, config, counters=_gather_counters(skip_counter))
        final_metrics.update(run_evaluators(evaluators, state, encoders, step, writer, final=step == total_steps))
    if start_step >= total_steps and is_main:
        print(f"nothing to do: the checkpoint in {checkpointer.directory} is at step {start_step} >= {total_steps}")
    checkpointer.close()
    writer.close()
    if hasattr(train_iterator, "close"):  # stops Grain worker processes and frees their shared memory
        train_iterator.close()
    return final_metrics
