"""What every jclip command line shares: the multi-process flags, jax.distributed start-up, and flag
parsing that turns config errors into one clear line (exit status 2)."""

from __future__ import annotations

import os
import sys

from absl import flags

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


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with config errors (unknown fields, unparsable values) as one clear line."""
    try:
        return flags.FLAGS(argv)
    except Exception as error:  # ml_collections raises AttributeError/KeyError/ValueError/flags.Error here.
        reason = error.args[0] if error.args else error
        text = " ".join(str(reason).replace("\\'", "'").replace("\\n", " ").split()).strip("'\"")
        print(f"jclip: invalid command line or config: {text}", file=sys.stderr)
        sys.exit(2)
