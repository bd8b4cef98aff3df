"""Orbax checkpoints of a run: train state, Grain iterator state and config, kept for the last K steps.

Resume is exact: the train state (params, optimizer state, step) and each process's Grain iterator
state are saved together, so a restarted run continues the same sequence of batches. Restore takes an
abstract target with the current mesh's shardings, so a checkpoint restores onto a different mesh.

Checkpoints survive damage (README, Failure handling):
- Every save is checked once Orbax has finished it (`Checkpointer.finish`, at the next save point or at the
  end): the files each item needs exist, none of the state's files is empty, the JSON metadata parses. Then
  jclip writes `jclip_manifest.json` into the step folder (every file's size, and the SHA-256 of the files up
  to 1 MiB: the metadata and small arrays). Only then are checkpoints beyond `keep` deleted, by jclip, not by
  Orbax's `max_to_keep`, so the previous good checkpoint outlives a bad write.
- Restore tries the steps newest-first and restores everything (state, data iterator, counters, config) or
  nothing. A step that fails (a file missing, truncated or changed since the manifest, metadata that does not
  parse, anything Orbax cannot read) is named with its reason in one line and, once an older step has
  restored, moved aside to `<step>.damaged-<UTC time>` (never deleted; Orbax no longer lists it). When no step
  restores, nothing is moved and `NoIntactCheckpoint` lists every step with its reason.
- A failed save (a full disk, a write error) becomes one `CheckpointSaveError` naming the step, the path, the
  free space and the last good checkpoint; its unfinished folder is removed. Unfinished saves left by a crash
  (`*.orbax-checkpoint-tmp*`, or on Cloud Storage a step folder without `commit_success.txt`) are removed at
  start-up by `remove_unfinished`.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
import sys
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jclip.errors import CheckpointSaveError, NoIntactCheckpoint
from jclip.paths import PathLike, as_path, file_sizes, is_url

STATE, DATA, COUNTERS, CONFIG = "state", "data", "counters", "config"
MANIFEST = "jclip_manifest.json"
MANIFEST_FORMAT = "jclip-checkpoint-manifest"
HASHED_BYTES = 1 << 20  # files up to this size are checksummed in the manifest
DAMAGED = ".damaged-"  # `<step>.damaged-<UTC time>`: a checkpoint moved aside
UNFINISHED = ".orbax-checkpoint-tmp"
COMMIT_MARKER = "commit_success.txt"  # Orbax's mark of a finished step on Cloud Storage
STEP_METADATA = "_CHECKPOINT_METADATA"


def one_line(error: BaseException, limit: int = 320) -> str:
    """The most specific line of an exception chain: the innermost cause's first line, shortened in the middle."""
    chain = [error]
    while True:
        nested = chain[-1].__cause__ or (None if chain[-1].__suppress_context__ else chain[-1].__context__)
        if nested is None or nested in chain:
            break
        chain.append(nested)
    chosen = next((e for e in reversed(chain) if str(e).strip()), error)
    text = " ".join(str(chosen).strip().splitlines()[0].split()) if str(chosen).strip() else ""
    name = type(chosen).__name__
    if name not in ("ValueError", "Exception", "RuntimeError") or not text:
        text = f"{name}: {text}" if text else name
    if len(text) > limit:
        text = text[: limit // 2 - 2] + " … " + text[-(limit // 2) :]
    return text


def _sha256(path: epath.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_structure(step_dir: PathLike, items: tuple[str, ...], processes: int) -> str | None:
    """What is wrong with a step folder's layout (None: nothing): the folder of each of `items`, a non-empty
    file in every place of the state, JSON metadata that parses, one data-iterator state per process."""
    step_dir = as_path(step_dir)
    files = file_sizes(step_dir)
    if not files:
        return "the folder is empty or missing"
    for item in items:
        if not any(name.startswith(item + "/") for name in files):
            return f"{item}/ is missing"
    if is_url(step_dir) and COMMIT_MARKER not in files:
        return f"{COMMIT_MARKER} is missing (an unfinished save)"
    for name, size in sorted(files.items()):
        if name.startswith(STATE + "/") and size == 0:
            return f"{name} is empty"
    json_files = [STEP_METADATA, f"{STATE}/_METADATA"]
    json_files += [f"{item}/metadata" for item in (CONFIG, COUNTERS) if item in items]
    if DATA in items:
        json_files += [f"{DATA}/process_{i}-of-{processes}.json" for i in range(processes)]
    for name in json_files:
        if name not in files:
            return f"{name} is missing"
        try:
            json.loads((step_dir / name).read_text())
        except Exception as error:  # a damaged file: any decoding error
            return f"{name} does not parse ({one_line(error, 160)})"
    return None


def write_manifest(step_dir: PathLike, step: int) -> None:
    """`jclip_manifest.json` in the step folder: each file's size, and the SHA-256 of the small ones. Written
    whole or not at all (a local file is renamed into place; a Cloud Storage object appears when complete), so a
    kill while writing it leaves a step without a manifest, checked by its layout, never a half manifest."""
    step_dir = as_path(step_dir)
    files = {
        name: {"size": size, "sha256": _sha256(step_dir / name) if size <= HASHED_BYTES else None}
        for name, size in sorted(file_sizes(step_dir).items()) if not name.startswith(MANIFEST)
    }
    text = json.dumps({"format": MANIFEST_FORMAT, "version": 1, "step": step, "files": files}, indent=1)
    if is_url(step_dir):
        (step_dir / MANIFEST).write_text(text)
        return
    partial = step_dir / f"{MANIFEST}.partial"
    partial.write_text(text)
    os.replace(partial, step_dir / MANIFEST)


def check_manifest(step_dir: PathLike) -> str | None:
    """What differs from the step's manifest (None: nothing, or no manifest); the first difference found."""
    step_dir = as_path(step_dir)
    path = step_dir / MANIFEST
    if not path.exists():
        return None
    try:
        recorded = json.loads(path.read_text())
        files = recorded["files"]
        assert recorded.get("format") == MANIFEST_FORMAT
    except Exception as error:  # a damaged manifest
        return f"{MANIFEST} does not parse ({one_line(error, 160)})"
    present = file_sizes(step_dir)
    for name, entry in sorted(files.items()):
        if name not in present:
            return f"{name} is missing"
        if present[name] != entry["size"]:
            return f"{name} has {present[name]} bytes, {entry['size']} when it was saved"
        if entry.get("sha256") and _sha256(step_dir / name) != entry["sha256"]:
            return f"{name} changed since it was saved (its SHA-256 differs)"
    return None


def inspect(step_dir: PathLike, items: tuple[str, ...], processes: int) -> str | None:
    """The cheap checks of a checkpoint before Orbax reads it: its manifest where it has one, else its layout."""
    step_dir = as_path(step_dir)
    if (step_dir / MANIFEST).exists():
        return check_manifest(step_dir)
    return check_structure(step_dir, items, processes)


def remove_unfinished(directory: PathLike) -> list[str]:
    """Removes the unfinished saves in a `checkpoints/` folder (Orbax's `*.orbax-checkpoint-tmp*` folders; on
    Cloud Storage, step folders without `commit_success.txt`) and returns their names. Process 0 only."""
    directory = as_path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for child in sorted(directory.iterdir(), key=lambda p: p.name):
        unfinished = UNFINISHED in child.name or (
            is_url(directory) and child.name.isdigit() and not (child / COMMIT_MARKER).exists()
        )
        if unfinished:
            if child.is_dir():
                child.rmtree()
            else:
                child.unlink()
            removed.append(child.name)
    return removed


def free_space(directory: PathLike) -> str:
    """'3.2 MiB free' on the disk of a local folder; for a bucket, that it is unknown."""
    if is_url(directory):
        return "free space unknown (a bucket)"
    path = os.fspath(directory)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return f"{_size(shutil.disk_usage(path).free)} free on its disk"
    except OSError:
        return "free space unknown"


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


class _QuietOrbaxErrors(logging.Filter):
    """Drops Orbax's ERROR log records (a traceback per failing thread), and asyncio's "exception was never
    retrieved" for the writes of a failed save that Orbax left ungathered: jclip reports the failure in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if "/orbax/" in record.pathname.replace(os.sep, "/"):
            return False
        if record.name == "asyncio":
            message = record.getMessage()
            return not ("never retrieved" in message and (UNFINISHED in message or "OCDBT" in message))
        return True


def _closed_loop_callback(kind, value, traceback) -> bool:
    """Whether an exception is TensorStore calling back into Orbax's closed event loop: the outermost frame is
    asyncio's call_soon_threadsafe itself (called from C++), the message asyncio's."""
    return (kind is RuntimeError and str(value) == "Event loop is closed" and traceback is not None
            and traceback.tb_frame.f_code.co_name == "call_soon_threadsafe")


def quiet_orbax_errors() -> None:
    """Keeps Orbax's own error logs (tracebacks from its writer threads) off stderr, and the late TensorStore
    callbacks of a failed save, which find Orbax's event loop closed (one "Event loop is closed" traceback per
    pending write, through `sys.unraisablehook`). `jclip.main` calls it unless `--verbosity` is given."""
    for logger in (logging.getLogger("absl"), logging.getLogger("asyncio")):
        if not any(isinstance(f, _QuietOrbaxErrors) for f in logger.filters):
            logger.addFilter(_QuietOrbaxErrors())
    if not getattr(sys.unraisablehook, "jclip_quiet", False):
        previous = sys.unraisablehook

        def unraisablehook(unraisable):
            if not _closed_loop_callback(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback):
                previous(unraisable)

        unraisablehook.jclip_quiet = True
        sys.unraisablehook = unraisablehook


def _warn(message: str) -> None:
    print(f"jclip: warning: {message}", file=sys.stderr, flush=True)


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")


class Checkpointer:
    """A workdir's `checkpoints/` folder: save every N steps, check each save, keep K, restore the newest intact."""

    def __init__(self, directory: PathLike, *, keep: int, async_save: bool = True):
        self.directory = as_path(directory)
        self.keep = int(keep)
        self._async = async_save
        # max_to_keep=None: jclip deletes old steps itself, after the newer one has been checked (finish).
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None, create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=False
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
        self._pending: tuple[int, tuple[str, ...]] | None = None  # the save in flight: step, items
        self._good: set[int] = set()  # steps this process restored from or checked after saving
        self.restored_step: int | None = None

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def last_good_step(self) -> int | None:
        """The newest step restored from or checked by this run; else the newest step there."""
        if self._good:
            return max(self._good)
        steps = self.all_steps()
        return max(steps) if steps else None

    def save(
        self,
        step: int,
        state: Any,
        data_iterator: grain.DatasetIterator | None,
        config: ml_collections.ConfigDict,
        counters: dict[str, Any] | None = None,
        force: bool = False,
    ) -> None:
        """Starts saving (asynchronously unless `async_save=False`, which also checks it at once);
        `counters` maps `process_<i>` to each process's data counters (JSON). `force` saves even where Orbax's
        save policy would not (the preemption step). Raises CheckpointSaveError for this save, or for the
        previous one if `finish` was not called since."""
        self.finish()
        items = {STATE: ocp.args.StandardSave(state), CONFIG: ocp.args.JsonSave(config.to_dict())}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        if counters is not None:
            items[COUNTERS] = ocp.args.JsonSave(counters)
        self._pending = (step, tuple(items))
        try:
            self._manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as error:  # a full disk or a write error in the synchronous part
            self._pending = None
            self._failed(step, one_line(error), written=False)
        if not self._async:
            self.finish()

    def finish(self) -> None:
        """Waits for the save in flight, checks what it wrote (process 0) and writes its manifest, then deletes
        the steps beyond `keep`. Raises CheckpointSaveError (the same on every process) if the save failed."""
        if self._pending is None:
            return
        step, items = self._pending
        self._pending = None
        reason, written = None, True
        try:
            self._manager.wait_until_finished()
        except Exception as error:  # raised by Orbax's writer threads
            reason, written = one_line(error), False
        if reason is None and jax.process_index() == 0:
            try:
                reason = check_structure(self.step_dir(step), items, jax.process_count())
                if reason is None:
                    write_manifest(self.step_dir(step), step)
            except Exception as error:  # e.g. the manifest itself does not fit on the disk
                reason = f"checking the saved files: {one_line(error)}"
        reason = _agree(reason, "jclip_checkpoint_checked")
        if reason is not None:
            self._failed(step, reason, written=written)
        self._good.add(step)
        self._prune(step)

    def _failed(self, step: int, reason: str, *, written: bool) -> None:
        """Clears a failed save away (process 0) and raises its CheckpointSaveError."""
        where = self.step_dir(step)
        aside = None
        if jax.process_index() == 0:
            try:
                if written and where.exists():  # Orbax finished it, but it does not check out: keep it, aside
                    aside = self._move_aside(step)
                else:  # unfinished: nothing in it can be restored
                    for child in self.directory.iterdir():
                        if child.name == str(step) or child.name.startswith(f"{step}{UNFINISHED}"):
                            child.rmtree()
            except Exception as error:  # report the save's failure, not this one
                reason += f" (and clearing it away failed: {one_line(error, 160)})"
        _barrier("jclip_checkpoint_failed")
        self._manager.reload()
        last = self.last_good_step()
        last_text = f"step {last} ({self.step_dir(last)})" if last is not None else "none yet"
        moved = f"; moved aside to {aside}" if aside is not None else ""
        raise CheckpointSaveError(
            f"saving the checkpoint of step {step} to {where} failed: {reason}{moved}; "
            f"{free_space(self.directory)}; the last good checkpoint is {last_text}",
            step=step, last_good=last,
        )

    def _prune(self, newest: int) -> None:
        """Deletes the steps older than the `keep` newest up to `newest` (just checked)."""
        steps = sorted(s for s in self.all_steps() if s <= newest)
        for step in steps[: max(len(steps) - self.keep, 0)]:
            if step != newest:
                self._manager.delete(step)

    def _move_aside(self, step: int) -> epath.Path:
        """Renames step folder `step` to `<step>.damaged-<UTC time>` (Cloud Storage: copy and delete)."""
        target = self.directory / f"{step}{DAMAGED}{_utc_now()}"
        suffix = 1
        while target.exists():
            target = self.directory / f"{step}{DAMAGED}{_utc_now()}-{suffix}"
            suffix += 1
        self.step_dir(step).rename(target)
        return target

    def restore_newest(
        self, abstract_state: Any, data_iterator: grain.DatasetIterator | None
    ) -> tuple[int, Any, dict[str, Any] | None] | None:
        """(step, state, this process's data counters or None) of the newest checkpoint that restores whole,
        with the data iterator set to its position; None when there is no checkpoint. Newer steps that failed
        are named on stderr and moved aside. NoIntactCheckpoint when none restores (nothing is moved)."""
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            return None
        tried: list[tuple[int, str]] = []
        for step in steps:
            try:
                state, counters = self._restore_whole(step, abstract_state, data_iterator)
                reason = None
            except Exception as error:  # damage of any kind: Orbax, TensorStore, JSON, Grain
                state, counters, reason = None, None, one_line(error)
            if reason is not None and jax.process_index() > 0:  # process 0's warning names its own reason only
                _warn(f"process {jax.process_index()} cannot restore the checkpoint of step {step} in "
                      f"{self.directory}: {reason}")
            reason = _agree(reason, f"jclip_checkpoint_restore_{step}")
            if reason is None:
                self._set_aside_damaged(tried, step)
                self._good.add(step)
                self.restored_step = step
                return step, state, counters
            tried.append((step, reason))
        listing = "; ".join(f"step {step}: {reason}" for step, reason in tried)
        raise NoIntactCheckpoint(
            f"no checkpoint in {self.directory} can be restored: {listing}. Nothing was moved or deleted; move "
            "the damaged steps aside (or the folder, to start over) and rerun"
        )

    def _restore_whole(self, step: int, abstract_state: Any, data_iterator: grain.DatasetIterator | None):
        """(state, this process's counters or None) of `step`. Each item is read by its own handler, not through
        the CheckpointManager, whose restore ends in a barrier of all processes: a process that failed to read its
        part would skip that barrier and leave the others waiting in it, or pair it with its next collective (the
        processes then disagree for good). Here a failure is this process's exception only; `restore_newest`
        then joins every process's verdict in one collective."""
        step_dir = self.step_dir(step)
        items = (STATE, CONFIG) + ((DATA,) if data_iterator is not None else ())
        problem = inspect(step_dir, items, jax.process_count())
        if problem is not None:
            raise ValueError(problem)
        state = _read_item(ocp.StandardCheckpointHandler(), step_dir / STATE, ocp.args.StandardRestore(abstract_state))
        _read_item(ocp.JsonCheckpointHandler(), step_dir / CONFIG, ocp.args.JsonRestore())  # must read, too
        counters = None
        if (step_dir / COUNTERS).exists():
            saved = _read_item(ocp.JsonCheckpointHandler(), step_dir / COUNTERS, ocp.args.JsonRestore())
            counters = saved.get(f"process_{jax.process_index()}")
        if data_iterator is not None:
            _read_item(grain.checkpoint.CheckpointHandler(), step_dir / DATA,
                       grain.checkpoint.CheckpointRestore(data_iterator))
        return state, counters

    def _set_aside_damaged(self, tried: list[tuple[int, str]], restored: int) -> None:
        """Moves the newer steps that failed to restore aside (process 0) and names each on stderr."""
        for step, reason in tried:
            if jax.process_index() == 0:
                try:
                    where = f"moved it to {self._move_aside(step)}"
                except Exception as error:  # e.g. a read-only folder: still resume from the intact step
                    where = f"could not move it aside ({one_line(error, 160)})"
                _warn(f"the checkpoint of step {step} in {self.directory} is damaged: {reason}; {where}; "
                      f"resuming from step {restored}, the newest intact checkpoint")
        if tried:
            _barrier("jclip_checkpoint_moved_aside")
            self._manager.reload()

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

    def newest_config(self) -> tuple[int, dict[str, Any]] | None:
        """(step, saved config) of the newest step whose config reads; None if none does."""
        for step in sorted(self.all_steps(), reverse=True):
            try:
                return step, self.restore_config(step)
            except Exception:  # a damaged step: restore_newest names it
                continue
        return None

    def wait(self) -> None:
        self.finish()

    def close(self) -> None:
        """Stops Orbax's asynchronous checkpointer, waiting for a save in flight. Never raises: call `finish`
        first to learn whether the last save worked (after an error elsewhere a failure here is one warning)."""
        pending, self._pending = self._pending, None
        try:
            self._manager.close()
        except Exception as error:  # the save in flight failed while the run was stopping for another reason
            step = pending[0] if pending else "?"
            _warn(f"the checkpoint save of step {step} to {self.directory} failed while stopping: {one_line(error)}")


def _read_item(handler: Any, directory: epath.Path, args: Any) -> Any:
    """One item of a checkpoint step read by its handler (no barrier: see `Checkpointer._restore_whole`)."""
    try:
        return handler.restore(directory, args=args)
    finally:
        handler.close()


def _agree(reason: str | None, name: str) -> str | None:
    """Every process's verdict on a checkpoint joined: None only if no process found a problem."""
    if jax.process_count() == 1:
        return reason
    from jax.experimental import multihost_utils

    flags = np.asarray(multihost_utils.process_allgather(np.int32(reason is not None))).reshape(-1)
    failed = [i for i, flag in enumerate(flags) if flag]
    if not failed or reason is not None:
        return reason
    return f"it failed on process(es) {failed} (see their logs)"


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


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
