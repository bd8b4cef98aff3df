"""Everything built once per run from the config: the model's pure functions, the optimizer, the shardings.

`TrainSetup.create(config, mesh)` is the one place a config becomes the objects the step and the loop use
(shared/ARCHITECTURE.md, "One way through"); the teacher, `init_from`, evaluation and conversion build
theirs the same way, so every reader of a checkpoint lays it out by the rules the step uses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jclip import losses, models, optim, parallel, param_rules
from jclip.data.configured import ConfiguredData
from jclip.errors import ConfigError
from jclip.evals.common import Encoders

Params = dict[str, Any]
#: Outputs a frozen teacher adds to the model's (jclip.teacher), which the student model does not produce.
TEACHER_OUTPUTS = ("teacher_image_embeddings", "teacher_text_embeddings")
# {"step": int32 [], "params": Params, "opt_state": optax state of the trainable params (jclip.param_rules),
#  "loss_state": stateful terms' states (if any)}
TrainState = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ModelFunctions:
    """Pure functions of the NNX model over a params pure-dict (the model's graph is static)."""

    graphdef: Any
    abstract_state: Any  # nnx.State of ShapeDtypeStructs, carrying the logical partition metadata
    model_config: ml_collections.ConfigDict
    seed: int
    #: The outputs `apply` returns (None: the model's defaults); the train step asks for what its terms read.
    outputs: tuple[str, ...] | None = None

    @classmethod
    def create(cls, model_config: ml_collections.ConfigDict, seed: int,
               outputs: tuple[str, ...] | None = None) -> "ModelFunctions":
        with nnx.use_eager_sharding(False):
            abstract_model = nnx.eval_shape(lambda: models.build_model(model_config, nnx.Rngs(seed)))
        graphdef, abstract_state = nnx.split(abstract_model)
        return cls(graphdef, abstract_state, model_config, seed, outputs)

    def model(self, params: Params) -> nnx.Module:
        state = jax.tree.map(lambda leaf: leaf, self.abstract_state)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)

    def init_params(self) -> Params:
        with nnx.use_eager_sharding(False):
            model = models.build_model(self.model_config, nnx.Rngs(self.seed))
        return nnx.to_pure_dict(nnx.state(model))

    def apply(self, params: Params, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """The model's outputs (`self.outputs`) on a batch mapping; the towers read their own fields."""
        return self.model(params)(batch, self.outputs)

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
    optimizer: optax.GradientTransformation  # over the trainable parameters only: `partition.trainable(params)`
    state_shardings: TrainState
    partition: param_rules.Partition  # which parameters train, which are frozen, learning-rate multipliers

    @classmethod
    def create(cls, config: ml_collections.ConfigDict, mesh: Mesh) -> "TrainSetup":
        rules = parallel.rules_from_config(config.sharding_rules)
        functions = ModelFunctions.create(config.model, config.seed, model_outputs(config.losses))
        params_sharding = functions.param_shardings(mesh, rules)
        abstract_params = nnx.to_pure_dict(functions.abstract_state)
        partition = param_rules.Partition.create(config, abstract_params)
        optimizer = optim.make_optimizer(config, partition.lr_multipliers())
        abstract_opt_state = jax.eval_shape(optimizer.init, partition.trainable(abstract_params))
        replicated = NamedSharding(mesh, PartitionSpec())
        opt_sharding = optax.tree_map_params(
            optimizer,
            lambda _, sharding: sharding,
            abstract_opt_state,
            partition.trainable(params_sharding),
            transform_non_params=lambda _: replicated,
        )
        state_shardings = {"step": replicated, "params": params_sharding, "opt_state": opt_sharding}
        try:
            loss_state = jax.eval_shape(lambda: initial_loss_state(config, functions, abstract_params))
        except ValueError as error:  # a term's knobs that only its state initialisation checks
            raise ConfigError(f"losses: {error}") from error
        if loss_state:
            state_shardings["loss_state"] = jax.tree.map(lambda _: replicated, loss_state)
        return cls(config, mesh, rules, functions, optimizer, state_shardings, partition)

    def abstract_state(self) -> TrainState:
        abstract = jax.eval_shape(self._init_state)
        return jax.tree.map(
            lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
            abstract,
            self.state_shardings,
        )

    def _init_state(self) -> TrainState:
        params = self.functions.init_params()
        opt_state = self.optimizer.init(self.partition.trainable(params))
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state}
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
            tokenizer_spec=models.tokenizer_spec(self.config.model),
        )


def model_outputs(terms_config: Any) -> tuple[str, ...]:
    """The model outputs the configured loss terms read, less those a teacher provides."""
    return tuple(name for name in losses.outputs_read(terms_config) if name not in TEACHER_OUTPUTS)


def initial_loss_state(config: ml_collections.ConfigDict, functions: ModelFunctions, params: Params) -> dict[str, Any]:
    """The states of the config's stateful loss terms (e.g. nCLIP's EMA centres), from the output shapes of
    a two-example batch of the towers' own fields (outputs of extra batch fields are not needed for states)."""
    batch = models.abstract_batch(config.model, 2)
    producible = models.model_output_names(config.model, batch)
    wanted = tuple(name for name in (functions.outputs or ()) if name in producible) or None
    abstract_outputs = jax.eval_shape(dataclasses.replace(functions, outputs=wanted).apply, params, batch)
    return losses.init_loss_state(config.losses, abstract_outputs)


def prepare_data(data: ConfiguredData, config: ml_collections.ConfigDict) -> None:
    """Opens every source the run reads (building the embedded dataset once, on process 0) so that a
    missing dataset or path fails at start-up; then the other processes open them too."""
    splits = {(entry.split, entry.get("source")) for entry in config.evals.values() if "split" in entry}
    if jax.process_index() == 0:
        data.prepare(splits)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jclip: data prepared")
        data.prepare(splits)
