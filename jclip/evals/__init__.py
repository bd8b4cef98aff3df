"""Evaluators chosen by name from `config.evals` (like big_vision's registry), each with its own schedule.

`config.evals.<name>` is a ConfigDict with `every` (steps; 0 = only at the end), `batch_size`, `limit`
and the evaluator's own options; its `type` defaults to `<name>`, so two evaluations of one kind run side
by side under different names (`evals.coco = {type: "retrieval", ...}`). Every evaluator logs
`eval/<name>/<metric>` to the run's metrics stream.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from jclip.evals.compositional import CompositionalEvaluator
from jclip.evals.retrieval import RetrievalEvaluator
from jclip.evals.zeroshot import ZeroShotEvaluator

EVALUATORS = {
    "retrieval": RetrievalEvaluator,
    "zeroshot": ZeroShotEvaluator,
    "compositional": CompositionalEvaluator,
}


def evaluator_type(name: str, config: ml_collections.ConfigDict) -> str:
    kind = config.get("type") or name
    if kind not in EVALUATORS:
        raise ValueError(f"evaluator {name!r} has unknown type {kind!r}; known: {sorted(EVALUATORS)}")
    return kind


def validate_evaluator_config(name: str, config: ml_collections.ConfigDict) -> None:
    """Type and option names of one `config.evals` entry, checked before any data is opened."""
    EVALUATORS[evaluator_type(name, config)].check_options(name, config)


def build_evaluators(evals_config: ml_collections.ConfigDict, data: Any) -> list[Any]:
    return [EVALUATORS[evaluator_type(name, cfg)](name, cfg, data) for name, cfg in evals_config.items()]
