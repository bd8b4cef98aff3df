"""Orbax checkpoints of a run: train state, Grain iterator state and config, kept for the last K steps.

Resume is exact: the train state (params, optimizer state, step) and each process's Grain iterator
state are saved together, so a restarted run continues the same sequence of batches. Restore takes an
abstract target with the current mesh's shardings, so a checkpoint restores onto a different mesh.
Unfinished saves (`*.orbax-checkpoint-tmp` folders left by a crash) are ignored by Orbax on restore.
"""

from __future__ import annotations

import json
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from jclip.paths import PathLike, as_path

STATE, DATA, COUNTERS, CONFIG = "state", "data", "counters", "config"


class Checkpointer:
    """A workdir's `checkpoints/` folder: save every N steps, keep K, restore the latest."""

    def __init__(self, directory: PathLike, *, keep: int, async_save: bool = True):
        self.directory = as_path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_names=(STATE, DATA, COUNTERS, CONFIG),
            item_handlers={
                STATE: ocp.StandardCheckpointHandler(),
                DATA: grain.checkpoint.CheckpointHandler(),
                COUNTERS: ocp.JsonCheckpointHandler(),
                CONFIG: ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        data_iterator: grain.DatasetIterator | None,
        config: ml_collections.ConfigDict,
        counters: dict[str, Any] | None = None,
        force: bool = False,
    ) -> None:
        """Saves asynchronously; `counters` maps `process_<i>` to each process's data counters (JSON).
        `force` saves even where Orbax's save policy would not (the preemption step)."""
        items = {STATE: ocp.args.StandardSave(state), CONFIG: ocp.args.JsonSave(config.to_dict())}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        if counters is not None:
            items[COUNTERS] = ocp.args.JsonSave(counters)
        self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: Any, data_iterator: grain.DatasetIterator | None) -> Any:
        """Restores the state onto the shardings of `abstract_state`, and the iterator in place."""
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored[STATE]

    def restore_counters(self, step: int) -> dict[str, Any] | None:
        """This process's data counters saved at `step`, or None where the checkpoint has none."""
        if not (self.directory / str(step) / COUNTERS).exists():
            return None
        saved = self._manager.restore(step, args=ocp.args.Composite(**{COUNTERS: ocp.args.JsonRestore()}))[COUNTERS]
        return saved.get(f"process_{jax.process_index()}")

    def restore_config(self, step: int) -> dict[str, Any]:
        return self._manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def has_checkpoints(directory: PathLike) -> bool:
    """Whether a `checkpoints/` folder holds a finished step (a folder named by its step number; Orbax's
    `*.orbax-checkpoint-tmp*` folders of an interrupted save do not count), without opening a manager."""
    directory = as_path(directory)
    return directory.is_dir() and any(child.is_dir() and child.name.isdigit() for child in directory.iterdir())


def resolve_checkpoint(path: PathLike, step: int | None = None) -> tuple[epath.Path, int | None]:
    """(checkpoints folder, step or None for the latest) from a workdir, checkpoints folder or step folder."""
    path = as_path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist (expected a workdir or a checkpoints folder)")
    if (path / "checkpoints").is_dir():
        return path / "checkpoints", step
    if path.name.isdigit() and (path / "state").is_dir():
        if step is not None and step != int(path.name):
            raise ValueError(f"--step={step} disagrees with the step folder {path}")
        return path.parent, int(path.name)
    if any(child.name.isdigit() for child in path.iterdir()):
        return path, step
    raise FileNotFoundError(f"{path} holds no checkpoints (no checkpoints/ folder, no step folders)")


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs carrying each leaf's sharding: the restore target for the current mesh."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


# Params-only exports: the model's parameters (no optimizer state, no data iterator) and what is needed to
# use them: the model config and the preprocessing (tokenizer, image size, normalisation). Written by
# `python -m jclip.convert params` (from a training checkpoint) and `... import` (from PyTorch formats);
# read by `config.init_from`, by the exporters to PyTorch, and by `load_params`.
EXPORT_INFO = "jclip_export.json"
EXPORT_PARAMS = "params"
EXPORT_FORMAT = "jclip-params"


def is_params_export(path: PathLike) -> bool:
    return (as_path(path) / EXPORT_INFO).is_file()


def save_params(directory: PathLike, params: Any, info: dict[str, Any]) -> epath.Path:
    """Writes `params` (a model-structured pure dict) and `info` (JSON: at least `model`, the model config)
    to a params-only export `directory`, which must not exist yet (nothing is overwritten)."""
    directory = as_path(directory)
    if directory.exists():
        raise FileExistsError(f"{directory} exists; choose a new folder for the export")
    if "model" not in info:
        raise ValueError("a params export needs its model config (info['model'])")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / EXPORT_PARAMS, params)
    checkpointer.wait_until_finished()
    checkpointer.close()
    (directory / EXPORT_INFO).write_text(json.dumps({"format": EXPORT_FORMAT, "version": 1, **info}, indent=2))
    return directory


def load_export_info(directory: PathLike) -> dict[str, Any]:
    """The `jclip_export.json` of a params export (model config, preprocessing, source)."""
    path = as_path(directory) / EXPORT_INFO
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a jclip params export (no {EXPORT_INFO})")
    info = json.loads(path.read_text())
    if info.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} is not a jclip params export (format {info.get('format')!r})")
    return info


def load_params(directory: PathLike, target: Any) -> Any:
    """The parameters of a params export, restored onto `target`'s structure, shapes and shardings
    (ShapeDtypeStructs with `sharding`, as from `abstract_like`)."""
    directory = as_path(directory)
    load_export_info(directory)
    checkpointer = ocp.StandardCheckpointer()
    params = checkpointer.restore(directory / EXPORT_PARAMS, target)
    checkpointer.close()
    return params
