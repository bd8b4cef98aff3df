"""Entry point: `python -m jclip.main --config=configs/clip.py[:args] --workdir=DIR [--config.x=y ...]`.

Parses the config (unknown keys and invalid values stop here, before any compilation), starts
`jax.distributed` when running as several processes, and hands over to `jclip.train.run`. Rerunning the
same command resumes from the latest checkpoint in the workdir.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

# Config files import `configs.common`: make the repository root importable when run from elsewhere.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/clip.py:model=B/32.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of checkpoints, metrics and TensorBoard logs.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", os.environ.get("JCLIP_COORDINATOR_ADDRESS"),
    "host:port of process 0 for jax.distributed (set by launch/ scripts); unset = auto-detect or single process.",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", int(os.environ.get("JCLIP_NUM_PROCESSES", "0")) or None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", int(os.environ.get("JCLIP_PROCESS_ID", "-1")), "This process's index.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", os.environ.get("JCLIP_DISTRIBUTED", "auto"), ["auto", "on", "off"],
    "auto: initialise jax.distributed when a coordinator is given or a cluster (TPU pod, Slurm) is detected.",
)


def initialise_distributed() -> None:
    import jax

    if _DISTRIBUTED.value == "off":
        return
    if _COORDINATOR.value:
        # Cross-process collectives of CPU devices (local multi-process runs); no effect on TPU or GPU.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=None if _PROCESS_ID.value < 0 else _PROCESS_ID.value,
        )
    elif _DISTRIBUTED.value == "on" or _cluster_detected():
        jax.distributed.initialize()


def _cluster_detected() -> bool:
    """Multi-host TPU VMs and Slurm jobs with several tasks, which jax.distributed can auto-configure."""
    return "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ["TPU_WORKER_HOSTNAMES"] or (
        int(os.environ.get("SLURM_NTASKS", "1")) > 1
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config=configs/clip.py")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    from absl import logging as absl_logging

    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax/TFDS INFO lines would drown the progress line.
    from jclip.config_validation import ConfigError, validate_config

    config = _CONFIG.value
    try:
        validate_config(config)
    except ConfigError as error:
        print(f"jclip: invalid config: {error}", file=sys.stderr)
        sys.exit(2)
    initialise_distributed()
    from jclip import train

    from jclip.data.robust import TooManyBadExamples

    try:
        train.run(config, _WORKDIR.value)
    except ConfigError as error:
        print(f"jclip: invalid config: {error}", file=sys.stderr)
        sys.exit(2)
    except TooManyBadExamples as error:
        print(f"jclip: stopped: {error}", file=sys.stderr)
        sys.exit(3)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with config errors (unknown fields, unparsable values) as one clear line."""
    try:
        return flags.FLAGS(argv)
    except Exception as error:  # ml_collections raises AttributeError/KeyError/ValueError/flags.Error here.
        reason = error.args[0] if error.args else error
        text = " ".join(str(reason).replace("\\'", "'").replace("\\n", " ").split()).strip("'\"")
        print(f"jclip: invalid command line or config: {text}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
