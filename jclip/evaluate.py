"""Standalone evaluation: `python -m jclip.evaluate --checkpoint=DIR [--config=FILE] [--output=report.json]`.

Runs the configured evaluators on a saved checkpoint and writes a JSON report. `--checkpoint` is a
training workdir, its `checkpoints/` folder, or one step's folder in it; the latest step is taken unless
`--step` (or a step folder) says otherwise. The model and optimizer come from the config saved with the
checkpoint (so the state restores whatever `--config` says); the evaluators, data and mesh come from
`--config` when given, else from the saved config too. Override any field with `--config.<path>=<value>`,
e.g. `--config.evals.zeroshot.limit=1000`.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from jclip.cli import initialise_distributed, parse_flags

# Config files import `configs.common`: make the repository root importable when run from elsewhere.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file whose `evals`, `data` and `mesh` to use (default: the checkpoint's own).",
    lock_config=True,
)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A workdir, its checkpoints/ folder, or a step folder.")
_STEP = flags.DEFINE_integer("step", None, "The step to evaluate (default: the latest, or the step folder given).")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the JSON report (default: <workdir>/eval_<step>.json).")


def merged_config(saved: dict[str, Any], given: Any | None) -> Any:
    """The saved config, with `evals`, `data`, `mesh` and `sharding_rules` taken from `given` if any."""
    import ml_collections

    config = ml_collections.ConfigDict(saved)
    if given is not None:
        for key in ("evals", "data", "mesh", "sharding_rules"):
            if key in given:
                config[key] = given[key]
    return config


def evaluate(checkpoint: str | pathlib.Path, config: Any | None = None, step: int | None = None) -> dict[str, Any]:
    """Restores the checkpoint's params and runs every configured evaluator: the report as a dict."""
    import jax

    from jclip import checkpoint as ckpt
    from jclip import evals, parallel
    from jclip.config_validation import validate_config
    from jclip.data.sources import ConfiguredData
    from jclip.train import TrainSetup, _prepare_data

    directory, step = ckpt.resolve_checkpoint(checkpoint, step)
    checkpointer = ckpt.Checkpointer(directory, keep=1_000_000, async_save=False)
    step = checkpointer.latest_step() if step is None else step
    if step is None or step not in checkpointer.all_steps():
        raise FileNotFoundError(f"no checkpoint of step {step} in {directory}; steps there: {checkpointer.all_steps()}")
    config = merged_config(checkpointer.restore_config(step), config)
    mesh = parallel.make_mesh(dict(config.mesh))
    validate_config(config, mesh)
    data = ConfiguredData(config.data, config.model)
    _prepare_data(data, config)
    setup = TrainSetup.create(config, mesh)
    state = checkpointer.restore(step, setup.abstract_state(), None)
    checkpointer.close()
    encoders = setup.encoders()
    report: dict[str, Any] = {"checkpoint": str(directory / str(step)), "step": step, "evaluators": {}}
    for evaluator in evals.build_evaluators(config.evals, data):
        started = time.perf_counter()
        results = evaluator.run(state["params"], encoders)
        results["seconds"] = time.perf_counter() - started
        report["evaluators"][evaluator.name] = results
        if jax.process_index() == 0:
            shown = ", ".join(f"{key} {value:.4f}" for key, value in results.items() if not key.startswith("count/"))
            print(f"eval {evaluator.name} @ step {step}: {shown}", flush=True)
    return report


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _CHECKPOINT.value:
        raise app.UsageError("--checkpoint is required (a workdir, its checkpoints/ folder or a step folder)")
    from absl import logging as absl_logging

    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    from jclip.config_validation import ConfigError

    initialise_distributed()
    import jax

    try:
        report = evaluate(_CHECKPOINT.value, _CONFIG.value, _STEP.value)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        print(f"jclip.evaluate: {error}", file=sys.stderr)
        sys.exit(2)
    from jclip.checkpoint import resolve_checkpoint

    directory, _ = resolve_checkpoint(_CHECKPOINT.value, _STEP.value)
    output = pathlib.Path(_OUTPUT.value) if _OUTPUT.value else directory.parent / f"eval_{report['step']}.json"
    if jax.process_index() == 0:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2))
        print(f"report written to {output}", flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
