"""The training loop: one jitted, sharded, donated train step over a Grain stream, with evals and checkpoints.

The loop only (the set-up is `jclip.build`, the step `jclip.step`): one small function per phase: init or
restore, the step, evaluation, saving, logging. Data flows one way (shared/ARCHITECTURE.md): config -> mesh, model,
optimizer, input pipeline -> step -> metrics, evaluators, checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from jclip import checkpoint, evals, init_from, nonfinite, parallel, pretrained
from jclip.errors import CheckpointSaveError, ConfigError
from jclip.models.clip_model import architecture_differences
from jclip.build import TrainSetup, TrainState, prepare_data
from jclip.config_validation import check_inputs, validate_config
from jclip.data import pipeline, robust
from jclip.data.configured import ConfiguredData
from jclip.evals.common import Encoders
from jclip.metrics import MetricsWriter, Progress
from jclip.paths import PathLike, as_path, check_writable
from jclip.preemption import PreemptionWatch
from jclip.profiling import StepProfiler
from jclip.step import compile_train_step
from jclip.teacher import load_teacher

log = logging.getLogger("jclip")
#: The non-finite guard's entry in each process's checkpointed counters (jclip.nonfinite).
NONFINITE_COUNTER = "nonfinite"


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


def _run_counters(counter: robust.SkipCounter, guard: nonfinite.NonfiniteGuard) -> dict[str, dict]:
    """The checkpoint's counters: every process's data skip counters, each with the non-finite guard's state
    (the same on every process: its decisions follow the global flags)."""
    return {name: {**state, NONFINITE_COUNTER: guard.state()} for name, state in _gather_counters(counter).items()}


def _read_nonfinite_flags(guard: nonfinite.NonfiniteGuard, pending: list, keep: int) -> None:
    """Hands the flags of the `pending` steps (step, metrics, example keys), oldest first, to `guard`, all but
    the last `keep`: the loop reads a step's flag one step late (the host does not wait for every step), and
    at once before that step is logged or saved. Raises `nonfinite.NonfiniteHalt` where the policy stops."""
    while len(pending) > keep:
        step, metrics, keys = pending.pop(0)
        if int(jax.device_get(metrics[nonfinite.FLAG_METRIC])):  # one scalar; the rest only when non-finite
            guard.observe(step, jax.device_get(metrics), keys)


def _keys_file(halt: nonfinite.NonfiniteHalt, workdir) -> nonfinite.NonfiniteHalt:
    """Where the halted batch has more example keys than the message shows, writes them all to the workdir
    (`nonfinite_step_<N>_keys[.process_<i>].txt`, one per line) and names the file in the message."""
    if halt.keys is None or len(halt.keys) <= nonfinite.SHOWN_KEYS:
        return halt
    suffix = f".process_{jax.process_index()}" if jax.process_count() > 1 else ""
    path = workdir / f"nonfinite_step_{halt.step}_keys{suffix}.txt"
    path.write_text("\n".join(halt.keys) + "\n")
    return nonfinite.NonfiniteHalt(f"{halt} All {len(halt.keys)} keys: {path}", halt.step, halt.keys)


def _global_skip_metrics(counter: robust.SkipCounter) -> robust.SkipCounter:
    """A counter holding the totals of all processes (for the skip-rate check and the logged metrics)."""
    if jax.process_count() == 1:
        return counter
    return robust.SkipCounter.merged(list(_gather_counters(counter).values()), min_examples=counter.min_examples)


def run_evaluators(evaluators, state: TrainState, encoders: Encoders, step: int, writer: MetricsWriter, final: bool) -> dict:
    """Runs the evaluators due at `step`; process 0 prints `evaluating <name> at step <N>` as each starts (a slow or
    stuck evaluation shows in the log, and jclip.tools.fault_trials times its kills by it) and its results after."""
    results = {}
    for evaluator in evaluators:
        if not evaluator.due(step, final):
            continue
        if jax.process_index() == 0:
            print(f"evaluating {evaluator.name} at step {step}", flush=True)
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


def run_mesh(config: ml_collections.ConfigDict):
    """The config's mesh over every device of the job; a mismatch is a config error naming both sides."""
    try:
        return parallel.make_mesh(dict(config.mesh))
    except ValueError as error:
        raise ConfigError(
            f"config.mesh {dict(config.mesh)} does not fit the job: {error} (jax sees {jax.device_count()} "
            f"{jax.default_backend()} device(s) in {jax.process_count()} process(es), {jax.local_device_count()} "
            "per process); set config.mesh to match, e.g. --config.mesh.data=-1"
        ) from error


@dataclasses.dataclass(frozen=True)
class RunResult:
    """How `run` ended: the last step trained, whether it stopped early on SIGTERM, the final evaluations."""

    step: int
    preempted: bool
    metrics: dict[str, float]


def check_resumable(checkpointer: checkpoint.Checkpointer, model: ml_collections.ConfigDict) -> None:
    """ConfigError unless the newest readable checkpoint was saved with `model`'s architecture and layer layout
    (`scan_layers`): resuming another model would fail deep inside the restore."""
    newest = checkpointer.newest_config()
    if newest is None:  # no step's config reads: the restore names each step's damage
        return
    step, saved = newest[0], ml_collections.ConfigDict(newest[1])
    differences = architecture_differences(saved.model, model)
    if bool(saved.model.get("scan_layers", False)) != bool(model.get("scan_layers", False)):
        differences.append(f"scan_layers: {saved.model.get('scan_layers', False)!r} vs {model.get('scan_layers', False)!r}")
    if differences:
        raise ConfigError(
            f"the checkpoint of step {step} in {checkpointer.directory} holds another model than config.model (saved vs config): "
            + "; ".join(differences) + ". Resume with the model it was started with, or start a new workdir "
            "(init_from takes the weights of another run, across scan_layers too)"
        )


class SavePolicy:
    """What a failed checkpoint save does (config.checkpoint_failure): "stop" raises it (exit status 4);
    "continue" prints it as a warning and training goes on, to try again at the next save. The last save of a
    run (the final step, a preemption) always raises: nothing later would retry it."""

    def __init__(self, config: ml_collections.ConfigDict, is_main: bool):
        self.policy = str(config.get("checkpoint_failure", "stop"))
        self.is_main = is_main

    def __call__(self, action, *, last: bool = False) -> bool:
        """Runs `action` (a save or a wait); True if it raised no CheckpointSaveError."""
        try:
            action()
            return True
        except CheckpointSaveError as error:
            if self.policy == "stop" or last:
                raise
            if self.is_main:
                print(f"jclip: warning: {error}; training goes on (checkpoint_failure=\"continue\") and saves again "
                      "at the next checkpoint step", file=sys.stderr, flush=True)
            return False


def run(config: ml_collections.ConfigDict, workdir: PathLike) -> RunResult:
    """Trains (or resumes) the configured run in `workdir`, until the last step or a SIGTERM."""
    workdir = as_path(workdir)
    mesh = run_mesh(config)
    validate_config(config, mesh)
    is_main = jax.process_index() == 0
    if is_main:
        check_writable(workdir)  # first: a bucket without credentials is named as such, not by a failed read below
    check_inputs(config, fresh=not checkpoint.has_checkpoints(workdir / "checkpoints"))  # data, init_from, teacher
    if is_main:
        (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
        removed = checkpoint.remove_unfinished(workdir / "checkpoints")
        if removed:
            print(f"jclip: removed {len(removed)} unfinished checkpoint save(s) left in {workdir / 'checkpoints'} by an "
                  f"interrupted run: {', '.join(removed)}", file=sys.stderr, flush=True)

    checkpointer = checkpoint.Checkpointer(
        workdir / "checkpoints", keep=int(config.keep_checkpoints), async_save=bool(config.async_checkpointing)
    )
    try:
        return _run(config, workdir, mesh, checkpointer, is_main)
    finally:
        checkpointer.close()  # stops Orbax's writer threads on every way out (an error, Ctrl-C)


def _run(config, workdir, mesh, checkpointer: checkpoint.Checkpointer, is_main: bool) -> RunResult:
    # Pretrained tower weights for a fresh start, read first so that a bad file stops the run at once.
    fresh = not checkpointer.all_steps()
    if not fresh:
        check_resumable(checkpointer, config.model)
    weights = pretrained.load_pretrained(config.model) if fresh else {}
    data = ConfiguredData(config.data, config.model)
    prepare_data(data, config)
    shard = pipeline.HostShard.current()
    if is_main and pipeline.is_auto(config.data.num_workers):
        print(f"data.num_workers=auto: {data.num_workers(shard)} Grain worker processes "
              f"({pipeline.usable_cores()} usable cores on this host)", flush=True)
    train_iterator = iter(data.training_dataset(seed=int(config.seed), shard=shard))
    try:
        return _train(config, workdir, mesh, checkpointer, is_main, data, train_iterator, weights)
    finally:
        if hasattr(train_iterator, "close"):  # stops Grain worker processes and frees their shared memory
            train_iterator.close()


def _train(config, workdir, mesh, checkpointer, is_main, data, train_iterator, weights) -> RunResult:
    skip_counter = robust.SkipCounter(min_examples=int(config.data.skip_check_after))
    nonfinite_guard = nonfinite.NonfiniteGuard.from_config(config.nonfinite)
    setup = TrainSetup.create(config, mesh)
    teacher = load_teacher(config, mesh)
    restored = checkpointer.restore_newest(setup.abstract_state(), train_iterator)
    if restored is None:
        state = setup.init_state()
        if weights:
            params, report = pretrained.place_pretrained(weights, state["params"])
            state = {**state, "params": params}
            if is_main:
                print("\n".join(report), flush=True)
        if config.get("init_from"):
            params, kept = init_from.initial_params(config, setup, state["params"])
            state = {**state, "params": params}
            if is_main:
                print(f"initialised the parameters from {config.init_from}"
                      + (f"; kept at initialisation: {', '.join(kept)}" if kept else ""), flush=True)
    else:
        latest, state, counters = restored
        if counters is not None:
            skip_counter = robust.SkipCounter.from_state(counters, min_examples=int(config.data.skip_check_after))
            nonfinite_guard = nonfinite.NonfiniteGuard.from_config(config.nonfinite, counters.get(NONFINITE_COUNTER))
        if is_main:
            print(f"resumed from {checkpointer.directory} at step {latest}", flush=True)
    start_step = int(jax.device_get(state["step"]))

    evaluators = evals.build_evaluators(config.evals, data)
    encoders = setup.encoders()
    writer = MetricsWriter(workdir, enabled=is_main)
    total_steps = int(config.total_steps)
    progress = Progress(total_steps, int(config.data.batch_size), enabled=is_main)
    if is_main:
        n_trainable, n_params = setup.partition.counts(state["params"])
        print(
            f"jclip: {n_params:,} parameters ({n_trainable:,} trainable), mesh {dict(mesh.shape)}, {jax.process_count()} process(es), "
            f"global batch {config.data.batch_size}, steps {start_step}->{total_steps}, workdir {workdir}",
            flush=True,
        )

    save_policy = SavePolicy(config, is_main)
    profiler = StepProfiler.from_config(config.get("profile_steps"), total_steps, workdir, announce=is_main)
    train_step = None
    final_metrics: dict[str, float] = {}
    step = start_step
    preempted = False
    halted: nonfinite.NonfiniteHalt | None = None
    unread_flags: list = []  # (step, metrics, example keys) of the steps whose non-finite flag is not read yet
    with PreemptionWatch() as preemption:
        for step in range(start_step + 1, total_steps + 1):
            host_batch = skip_counter.update(next(train_iterator))
            example_keys = robust.pop_example_keys(host_batch)
            batch = parallel.host_batch_to_global(host_batch, mesh)
            if train_step is None:
                train_step = compile_train_step(setup, batch, teacher)
            if profiler is not None:
                profiler.before_step(step)
            state, metrics = train_step(state, batch)
            if profiler is not None:
                profiler.after_step(step, state)
            if step == start_step + 1:
                jax.block_until_ready(metrics)
                progress.start(step)
            preempted = preemption.reached(step)
            unread_flags.append((step, metrics, example_keys))
            logs_or_saves = (step % int(config.log_every) == 0 or step % int(config.checkpoint_every) == 0
                             or step == total_steps or preempted)
            try:
                _read_nonfinite_flags(nonfinite_guard, unread_flags, keep=0 if logs_or_saves else 1)
            except nonfinite.NonfiniteHalt as halt:
                halted = _keys_file(halt, workdir)
                break
            if step % int(config.log_every) == 0 or step == total_steps or preempted:
                metrics = jax.device_get(metrics)
                loss = float(metrics["loss/total"])
                metrics.update(progress.update(step, loss))
                global_skips = _global_skip_metrics(skip_counter)
                metrics.update(global_skips.metrics())
                metrics.update(nonfinite_guard.metrics())
                writer.write(step, metrics)
                global_skips.check(float(config.data.max_skip_rate))
            if step % int(config.checkpoint_every) == 0 or step == total_steps or preempted:
                last = step == total_steps or preempted
                save_policy(checkpointer.finish)  # the previous save: checked, then old steps deleted
                counters = _run_counters(skip_counter, nonfinite_guard)
                save_policy(lambda: checkpointer.save(step, state, train_iterator, config, counters=counters,
                                                      force=preempted), last=last)
                writer.sync()
            if preempted:
                break
            final_metrics.update(run_evaluators(evaluators, state, encoders, step, writer, final=step == total_steps))
    if profiler is not None:
        profiler.stop(state)  # a run that ended (preempted, halted) inside the traced steps
    if start_step >= total_steps and is_main:
        print(f"nothing to do: the checkpoint in {checkpointer.directory} is at step {start_step} >= {total_steps}")
    save_policy(checkpointer.finish, last=True)  # waits for the last save and checks it
    if preempted and is_main and halted is None:
        print(f"preempted (SIGTERM): saved step {step} to {checkpointer.directory}; rerun the same command to resume",
              flush=True)
    writer.close()
    if halted is not None:
        raise halted
    return RunResult(step=step, preempted=preempted, metrics=final_metrics)
