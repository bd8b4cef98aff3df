"""Standalone evaluation: `python -m jclip.evaluate --checkpoint=DIR [--config=FILE] [--output=report.json]`.

Runs the configured evaluators on a saved checkpoint and writes a JSON report. `--checkpoint` is a
training workdir, its `checkpoints/` folder, or one step's folder in it; the latest step is taken unless
`--step` (or a step folder) says otherwise. The model and optimizer come from the config saved with the
checkpoint (so the state restores whatever `--config` says); the evaluators, data and mesh come from
`--config` when given, else from the saved config too. Override any field with `--config.<path>=<value>`,
e.g. `--config.evals.zeroshot.limit=1000`.

`--checkpoint` may also be a params export (`python -m jclip.convert params|import`, e.g. OpenAI's weights):
the model comes from the export, everything else from `--config`, which is then required.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from jclip.cli import initialise_distributed, parse_flags, user_error

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file whose `evals`, `data` and `mesh` to use (default: the checkpoint's own).",
    lock_config=True,
)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A workdir, its checkpoints/ folder, or a step folder.")
_STEP = flags.DEFINE_integer("step", None, "The step to evaluate (default: the latest, or the step folder given).")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the JSON report (default: <workdir>/eval_<step>.json).")


def evaluate(checkpoint: str | pathlib.Path, config: Any | None = None, step: int | None = None) -> dict[str, Any]:
    """Restores the checkpoint's params and runs every configured evaluator: the report as a dict."""
    from jclip import checkpoint as ckpt
    from jclip import restore

    if ckpt.is_params_export(checkpoint):
        return _evaluate_export(pathlib.Path(checkpoint), config, step)
    directory, step, saved = restore.open_run(checkpoint, step)
    config = restore.with_layout(saved, config, ("evals", "data", *restore.LAYOUT_KEYS))
    data, setup = _data_and_setup(config)
    params = restore.restore_params(directory, step, setup)
    report: dict[str, Any] = {"checkpoint": str(directory / str(step)), "step": step, "evaluators": {}}
    return _run_evaluators(config, data, setup, params, report)


def _evaluate_export(export: pathlib.Path, config: Any | None, step: int | None) -> dict[str, Any]:
    """A params export's model, evaluated with the given config's evaluators and data."""
    import ml_collections

    from jclip import checkpoint as ckpt
    from jclip.restore import restore_export

    if config is None:
        raise ValueError(f"{export} is a params export, which has no run config: pass --config (its evaluators "
                         "and data are used; the model comes from the export)")
    if step is not None:
        raise ValueError(f"{export} is a params export, which has no steps; drop --step")
    config = ml_collections.ConfigDict(config.to_dict())
    compute = {key: config.model[key] for key in ("dtype", "param_dtype", "remat") if key in config.model}
    config.model = ml_collections.ConfigDict({**ckpt.load_export_info(export)["model"], **compute})
    data, setup = _data_and_setup(config)
    _, params = restore_export(str(export), setup)
    return _run_evaluators(config, data, setup, params, {"checkpoint": str(export), "step": None, "evaluators": {}})


def _data_and_setup(config: Any) -> tuple[Any, Any]:
    """The validated config's data (opened) and train set-up (mesh, model functions, shardings)."""
    from jclip import parallel
    from jclip.config_validation import validate_config
    from jclip.data.configured import ConfiguredData
    from jclip.build import TrainSetup, prepare_data

    mesh = parallel.make_mesh(dict(config.mesh))
    validate_config(config, mesh)
    data = ConfiguredData(config.data, config.model)
    prepare_data(data, config)
    return data, TrainSetup.create(config, mesh)


def _run_evaluators(config: Any, data: Any, setup: Any, params: Any, report: dict[str, Any]) -> dict[str, Any]:
    """Every configured evaluator on `params`, its results added to `report` and printed."""
    import jax

    from jclip import evals

    encoders = setup.encoders()
    step = report["step"]
    for evaluator in evals.build_evaluators(config.evals, data):
        started = time.perf_counter()
        results = evaluator.run(params, encoders)
        results["seconds"] = time.perf_counter() - started
        report["evaluators"][evaluator.name] = results
        if jax.process_index() == 0:
            shown = ", ".join(f"{key} {value:.4f}" for key, value in results.items() if not key.startswith("count/"))
            print(f"eval {evaluator.name}{'' if step is None else f' @ step {step}'}: {shown}", flush=True)
    return report


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _CHECKPOINT.value:
        raise app.UsageError("--checkpoint is required (a workdir, its checkpoints/ folder or a step folder)")
    from absl import logging as absl_logging

    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    from jclip.errors import ConfigError

    initialise_distributed()
    import jax

    try:
        report = evaluate(_CHECKPOINT.value, _CONFIG.value, _STEP.value)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        user_error(f"jclip.evaluate: {error}", error)
    from jclip.checkpoint import is_params_export, resolve_checkpoint

    if _OUTPUT.value:
        output = pathlib.Path(_OUTPUT.value)
    elif is_params_export(_CHECKPOINT.value):
        output = pathlib.Path(_CHECKPOINT.value) / "eval.json"
    else:
        directory, _ = resolve_checkpoint(_CHECKPOINT.value, _STEP.value)
        output = directory.parent / f"eval_{report['step']}.json"
    if jax.process_index() == 0:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2))
        print(f"report written to {output}", flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
