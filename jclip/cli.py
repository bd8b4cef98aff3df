"""What every jclip command line shares: the multi-process flags, jax.distributed start-up, and flag
parsing that turns config errors into one clear line (exit status 2)."""

from __future__ import annotations

import os
import sys
import traceback
from typing import NoReturn

from absl import flags

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", os.environ.get("JCLIP_COORDINATOR_ADDRESS"),
    "host:port of process 0 for jax.distributed (set by launch/ scripts); unset = auto-detect or single process.",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", int(os.environ.get("JCLIP_NUM_PROCESSES", "0")) or None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", int(os.environ.get("JCLIP_PROCESS_ID", "-1")), "This process's index.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", os.environ.get("JCLIP_DISTRIBUTED", "auto"), ["auto", "on", "off"],
    "auto: initialise jax.distributed when a coordinator is given or a cluster (TPU pod, Slurm) is detected; "
    "on: always (also one process, so that SIGTERM goes through JAX's preemption service); off: never.",
)
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_seconds", int(os.environ.get("JCLIP_HEARTBEAT_TIMEOUT_SECONDS", "30")),
    "A process that has not been heard from for this long is dead, and every other process stops (jax.distributed).",
)
_VERBOSE = flags.DEFINE_bool(
    "verbose", os.environ.get("JCLIP_VERBOSE", "0").lower() not in ("", "0", "false", "no"),
    "Print the traceback of a user error (a bad config value, a missing path) before its one-line message; "
    "other errors always show their traceback. Also JCLIP_VERBOSE=1.",
)
_INIT_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout_seconds", int(os.environ.get("JCLIP_INITIALIZATION_TIMEOUT_SECONDS", "300")),
    "How long jax.distributed waits for every process to join before giving up.",
)


def initialise_distributed() -> None:
    if _DISTRIBUTED.value == "off":
        return
    if _COORDINATOR.value:
        _initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=None if _PROCESS_ID.value < 0 else _PROCESS_ID.value,
        )
    elif _cluster_detected():
        _initialize()
    elif _DISTRIBUTED.value == "on":
        try:  # JAX's own detection: Cloud TPU VM metadata, Slurm, Open MPI, ...
            _initialize()
        except ValueError:  # no cluster: one process with a coordination (and preemption) service of its own
            _initialize(coordinator_address=f"127.0.0.1:{free_port()}", num_processes=1, process_id=0)


def _initialize(**arguments) -> None:
    import jax

    # Cross-process collectives of CPU devices (local multi-process runs); no effect on TPU or GPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        heartbeat_timeout_seconds=_HEARTBEAT.value, initialization_timeout=_INIT_TIMEOUT.value, **arguments
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a loopback coordinator)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cluster_detected() -> bool:
    """Environments jax.distributed configures itself from: a multi-host TPU slice on GKE, multislice, or a
    Slurm job step of several tasks. (Cloud TPU VMs describe themselves only through the GCE metadata server,
    so the TPU launcher passes --distributed=on there.)"""
    environ = os.environ
    return bool(
        "," in environ.get("TPU_WORKER_HOSTNAMES", "")
        or "MEGASCALE_COORDINATOR_ADDRESS" in environ
        or ("SLURM_JOB_ID" in environ and "SLURM_STEP_NODELIST" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1)
    )


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with config errors (unknown fields, unparsable values) as one clear line."""
    try:
        return flags.FLAGS(argv)
    except Exception as error:  # ml_collections raises AttributeError/KeyError/ValueError/flags.Error here.
        reason = error.args[0] if error.args else error
        text = " ".join(str(reason).replace("\\'", "'").replace("\\n", " ").split())
        while len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # a KeyError's repr quotes its message
            text = text[1:-1]
        user_error(f"jclip: invalid command line or config: {text}", error, verbose=_verbose_in(argv))


def user_error(message: str, error: BaseException | None = None, *, code: int = 2,
               verbose: bool | None = None) -> NoReturn:
    """Stops on a user's mistake: `message` as one line on stderr and exit status `code`; with --verbose
    (JCLIP_VERBOSE=1) `error`'s traceback first. Other exceptions are left to Python (a traceback, status 1).
    `verbose` None: the --verbose flag (read from the command line itself when the flags did not parse)."""
    if verbose is None:
        verbose = _VERBOSE.value if flags.FLAGS.is_parsed() else _verbose_in(sys.argv)
    if verbose and error is not None:
        traceback.print_exception(error, file=sys.stderr)
    print(message, file=sys.stderr, flush=True)
    sys.exit(code)


def _verbose_in(argv: list[str]) -> bool:
    """--verbose as the command line gives it (its last --verbose, --noverbose or --verbose=X), for errors
    that stop the flag parsing itself; else JCLIP_VERBOSE."""
    verbose = _VERBOSE.default
    for arg in argv[1:]:
        if arg in ("--verbose", "--noverbose"):
            verbose = arg == "--verbose"
        elif arg.startswith("--verbose="):
            verbose = arg.split("=", 1)[1].lower() in ("1", "true", "t", "yes", "y")
    return verbose
