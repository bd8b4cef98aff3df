"""Entry point: `python -m jclip.main --config=configs/clip.py[:args] --workdir=DIR [--config.x=y ...]`.

Parses the config (unknown keys and invalid values stop here, before any compilation), starts
`jax.distributed` when running as several processes, and hands over to `jclip.train.run`. Rerunning the
same command resumes from the newest intact checkpoint in the workdir.

Exit status (README, Failure handling): 0 finished or preempted; 1 an unexpected failure or a dead peer; 2 a config
error or no checkpoint that can be restored; 3 too many bad examples; 4 a checkpoint save failed; 5 a non-finite
loss or gradient (nonfinite.policy).

A user's mistake (a config value, a model shape or mesh that cannot be built, a data path, init_from or teacher
checkpoint that does not exist) stops with one line on stderr naming the key and the path, exit status 2, before
anything is saved in the workdir or compiled; `--verbose` (JCLIP_VERBOSE=1) prints its traceback first. Any
other exception is a bug and keeps Python's traceback.

`--compile_only` (no workdir needed) compiles the train step for the config's mesh on abstract inputs and
prints its memory and FLOPs report (jclip.compile_only), then exits 0; with `--fake_devices=N` it runs on N
CPU devices, e.g. to size a pod's run on a laptop.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

from jclip.cli import initialise_distributed, parse_flags, user_error
from jclip.host_memory import keep_freed_memory

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/clip.py:model=B/32.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of checkpoints, metrics and TensorBoard logs.")
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False,
    "Compile the train step for the config's mesh on abstract inputs (no data, no weights, no checkpoints), print "
    "per-device memory and FLOPs, and exit.",
)
_FAKE_DEVICES = flags.DEFINE_integer(
    "fake_devices", int(os.environ.get("JCLIP_FAKE_DEVICES", "0")) or None,
    "Run on this many CPU devices instead of the machine's accelerators (for --compile_only on a laptop).",
)
_STATUS_FILE = flags.DEFINE_string(
    "status_file", os.environ.get("JCLIP_STATUS_FILE"),
    "A local file where process 0 writes how the run ended (JSON: state finished|preempted|failed, step, exit_code).",
)
_PREEMPTED_EXIT_CODE = flags.DEFINE_integer(
    "preempted_exit_code", int(os.environ.get("JCLIP_PREEMPTED_EXIT_CODE", "0")),
    "Exit status after a preemption save. 0 suits launchers that read --status_file (Slurm, the TPU babysitter); "
    "a non-zero value makes orchestrators that rerun only failed work (Kubernetes Jobs and JobSets) resume the run.",
)


def main(argv: list[str]) -> None:
    keep_freed_memory()  # before the JAX backend starts its threads
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config=configs/clip.py")
    if _FAKE_DEVICES.value:
        _use_fake_devices(_FAKE_DEVICES.value)
    if _COMPILE_ONLY.value:
        _compile_only(_CONFIG.value)
        return
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    from absl import logging as absl_logging

    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax/TFDS INFO lines would drown the progress line.
        from jclip.checkpoint import quiet_orbax_errors

        quiet_orbax_errors()  # a failed save is reported in one line, not a traceback per Orbax thread
    from jclip.config_validation import validate_config
    from jclip.errors import ConfigError

    config = _CONFIG.value
    outcome = {"state": "failed", "step": None, "exit_code": 1}
    try:
        try:
            validate_config(config)
        except ConfigError as error:
            _stop(outcome, 2, f"jclip: invalid config: {error}", error)
        _train(config, _WORKDIR.value, outcome)
    finally:
        _write_status(outcome)


def _train(config, workdir: str, outcome: dict) -> None:
    """Runs training and records its outcome for the status file; exits with jclip's status codes."""
    from jclip.errors import ConfigError

    initialise_distributed()
    import jax

    from jclip import train
    from jclip.data.robust import TooManyBadExamples
    from jclip.errors import CheckpointSaveError, NoIntactCheckpoint
    from jclip.nonfinite import EXIT_CODE as NONFINITE_EXIT_CODE
    from jclip.nonfinite import NonfiniteHalt

    try:
        result = train.run(config, workdir)
        outcome.update(state="preempted" if result.preempted else "finished", step=result.step, exit_code=0)
        if result.preempted and _PREEMPTED_EXIT_CODE.value:
            _stop(outcome, _PREEMPTED_EXIT_CODE.value,
                  f"jclip: exiting with status {_PREEMPTED_EXIT_CODE.value} (--preempted_exit_code) so that the job is "
                  "rerun; the rerun resumes from the saved step")
    except ConfigError as error:
        _stop(outcome, 2, f"jclip: invalid config: {error}", error)
    except TooManyBadExamples as error:
        _stop(outcome, 3, f"jclip: stopped: {error}", error)
    except CheckpointSaveError as error:
        _stop(outcome, 4, f"jclip: stopped: {error}. Free some space (or fix the path) and rerun the same command: "
                          "it resumes from the last good checkpoint", error)
    except NoIntactCheckpoint as error:
        _stop(outcome, 2, f"jclip: cannot resume: {error}", error)
    except NonfiniteHalt as error:
        outcome["step"] = error.step
        _stop(outcome, NONFINITE_EXIT_CODE, f"jclip: stopped: {error}", error)
    except jax.errors.JaxRuntimeError as error:
        if jax.process_count() == 1:
            raise
        # A peer that died makes the next collective fail (CPU) or hang until jax.distributed's heartbeat
        # timeout ends every process (TPU, GPU). Either way the message should point at the other logs.
        _stop(outcome, 1, f"jclip: stopped: process {jax.process_index()} of {jax.process_count()} lost contact "
                          f"with the others ({str(error).splitlines()[0]}); another process has probably died: see "
                          "its log. Rerun the job to resume from the last checkpoint.", error)


def _use_fake_devices(count: int) -> None:
    """N CPU devices instead of the accelerators; before anything asks jax for its devices."""
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", int(count))


def _compile_only(config) -> None:
    """Prints the compile report of the config's train step (process 0) and exits 0; 2 for a config error."""
    from jclip.errors import ConfigError

    if not _FAKE_DEVICES.value:
        initialise_distributed()
    import jax

    from jclip import compile_only

    try:
        report = compile_only.compile_report(config)
    except ConfigError as error:
        _stop({}, 2, f"jclip: invalid config: {error}", error)
    if jax.process_index() == 0:
        print(f"jclip compile_only: {compile_only.describe(config)}")
        print("\n".join(report.lines()), flush=True)


def _stop(outcome: dict, code: int, message: str, error: BaseException | None = None) -> None:
    """Records `code` for the status file and exits with it after `message`, one line on stderr (with --verbose,
    after `error`'s traceback)."""
    outcome["exit_code"] = code
    user_error(message, error, code=code)


def _write_status(outcome: dict) -> None:
    """Process 0 records how the run ended in --status_file, for launchers that requeue or resume (Slurm's
    batch script, the TPU babysitter): `{"state": "finished"|"preempted"|"failed", "step": N, "exit_code": N}`."""
    if not _STATUS_FILE.value or ("jax" in sys.modules and sys.modules["jax"].process_index() != 0):
        return
    path = pathlib.Path(_STATUS_FILE.value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(outcome) + "\n")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
