"""Reading finished runs and params exports: the one restore path behind the teacher, `init_from`,
evaluation, guidance writing and conversion.

A training checkpoint's model is rebuilt from the config saved with it and its parameters are restored
onto the caller's mesh, laid out by the caller's mesh and sharding rules (`jclip.build.TrainSetup`, the
rules the step uses). A params export (`jclip.checkpoint.save_params`) carries its model config instead.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Any

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from jclip import checkpoint
from jclip.build import ModelFunctions, Params, TrainSetup
from jclip.errors import ConfigError

#: The parts of a saved config that the reader's config replaces: where the parameters are laid out.
LAYOUT_KEYS = ("mesh", "sharding_rules")


def open_run(path: str | pathlib.Path, step: int | None = None) -> tuple[pathlib.Path, int, ml_collections.ConfigDict]:
    """(checkpoints folder, step, saved config) of a workdir, its checkpoints/ folder or a step folder; the
    latest step unless `step` is given. Raises FileNotFoundError or ValueError naming what is missing."""
    directory, step = checkpoint.resolve_checkpoint(path, step)
    checkpointer = checkpoint.Checkpointer(directory, keep=1_000_000, async_save=False)
    try:
        steps = checkpointer.all_steps()
        step = checkpointer.latest_step() if step is None else step
        if step is None or step not in steps:
            raise FileNotFoundError(f"no checkpoint of step {step} in {directory}; steps there: {steps}")
        saved = ml_collections.ConfigDict(checkpointer.restore_config(step))
    finally:
        checkpointer.close()
    return directory, step, saved


def restore_params(directory: pathlib.Path, step: int, setup: TrainSetup) -> Params:
    """The parameters of checkpoint `step` in `directory`, on `setup`'s mesh and shardings."""
    checkpointer = checkpoint.Checkpointer(directory, keep=1_000_000, async_save=False)
    try:
        return checkpointer.restore(step, setup.abstract_state(), None)["params"]
    finally:
        checkpointer.close()


def with_layout(saved: ml_collections.ConfigDict, config: Any, keys: tuple[str, ...] = LAYOUT_KEYS) -> ml_collections.ConfigDict:
    """The saved config with `keys` taken from `config` where it has them."""
    merged = ml_collections.ConfigDict(saved.to_dict())
    for key in keys:
        if config is not None and key in config:
            merged[key] = config[key]
    return merged


def restore_run(path: str, step: int | None, config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[TrainSetup, Params, ml_collections.ConfigDict]:
    """A finished run's model rebuilt from its saved config and its parameters restored onto `mesh` (laid
    out by `config`'s mesh and sharding rules): (set-up, params, the saved config). ConfigError when the
    path holds no such checkpoint. Without `step`, a damaged newest step is named on stderr and the newest
    intact one is read instead (nothing is moved: the run may belong to someone else, or be read-only)."""
    try:
        step = checkpoint.resolve_checkpoint(path, step)[1]  # a step folder names its step
        directory, chosen, saved = open_run(path, step) if step is not None else _newest_readable(path)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(str(error)) from error
    if step is not None:
        candidates = [(chosen, saved)]
    else:
        checkpointer = checkpoint.Checkpointer(directory, keep=1_000_000, async_save=False)
        try:
            candidates = [(s, None) for s in sorted(checkpointer.all_steps(), reverse=True) if s <= chosen]
        finally:
            checkpointer.close()
    tried = []
    for candidate, candidate_config in candidates:
        try:
            if candidate_config is None:
                _, _, candidate_config = open_run(directory, candidate)
            merged = with_layout(candidate_config, config)
            setup = TrainSetup.create(merged, mesh)
            problem = checkpoint.inspect(directory / str(candidate), (checkpoint.STATE, checkpoint.CONFIG), 1)
            if problem is not None:
                raise ValueError(problem)
            params = restore_params(directory, candidate, setup)
        except ConfigError:
            raise
        except Exception as error:  # a damaged step: any read error
            tried.append(f"step {candidate}: {checkpoint.one_line(error)}")
            continue
        if tried:
            print(f"jclip: warning: {directory}: {'; '.join(tried)}; read step {candidate}, the newest intact one",
                  file=sys.stderr, flush=True)
        return setup, params, merged
    raise ConfigError(f"no checkpoint in {directory} can be read: {'; '.join(tried)}")


def _newest_readable(path: str) -> tuple[pathlib.Path, int, ml_collections.ConfigDict]:
    """open_run's result for the newest step whose config reads (a damaged newer one is skipped)."""
    directory, _ = checkpoint.resolve_checkpoint(path, None)
    checkpointer = checkpoint.Checkpointer(directory, keep=1_000_000, async_save=False)
    try:
        newest = checkpointer.newest_config()
        steps = checkpointer.all_steps()
    finally:
        checkpointer.close()
    if newest is None:
        raise FileNotFoundError(f"no readable checkpoint in {directory}; steps there: {steps}")
    return directory, newest[0], ml_collections.ConfigDict(newest[1])


def restore_export(path: str, setup: TrainSetup) -> tuple[dict[str, Any], Params]:
    """(model config, params) of a params export, laid out on the run's mesh by the run's sharding rules."""
    info = checkpoint.load_export_info(path)
    functions = ModelFunctions.create(ml_collections.ConfigDict(info["model"]), seed=0)
    target = jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          nnx.to_pure_dict(functions.abstract_state), functions.param_shardings(setup.mesh, setup.rules))
    return info["model"], checkpoint.load_params(path, target)
