"""Entry point: `python -m jclip.main --config=configs/clip.py[:args] --workdir=DIR [--config.x=y ...]`.

Parses the config (unknown keys and invalid values stop here, before any compilation), starts
`jax.distributed` when running as several processes, and hands over to `jclip.train.run`. Rerunning the
same command resumes from the latest checkpoint in the workdir.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from jclip.cli import initialise_distributed, parse_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/clip.py:model=B/32.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of checkpoints, metrics and TensorBoard logs.")


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
    from jclip.config_validation import validate_config
    from jclip.errors import ConfigError

    config = _CONFIG.value
    try:
        validate_config(config)
    except ConfigError as error:
        print(f"jclip: invalid config: {error}", file=sys.stderr)
        sys.exit(2)
    initialise_distributed()
    import jax

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
    except jax.errors.JaxRuntimeError as error:
        if jax.process_count() == 1:
            raise
        # A peer that died makes the next collective fail (CPU) or hang until jax.distributed's heartbeat
        # timeout ends every process (TPU, GPU). Either way the message should point at the other logs.
        print(f"jclip: stopped: process {jax.process_index()} of {jax.process_count()} lost contact with the "
              f"others ({str(error).splitlines()[0]}); another process has probably died: see its log. "
              "Rerun the job to resume from the last checkpoint.", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
