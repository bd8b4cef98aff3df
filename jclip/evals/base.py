"""The part every evaluator shares: its name, schedule, batch size, and a check of its config keys."""

from __future__ import annotations

from typing import Any

import ml_collections

#: Keys every evaluator accepts.
COMMON_OPTIONS = ("type", "every", "batch_size", "limit")


class Evaluator:
    """Base of the evaluators: `run(params, encoders) -> {metric: float}` is what subclasses add.

    `every` is in steps (0: only at the end of training); `limit` caps the examples read (None: all).
    """

    #: Keys of the evaluator's own config, besides `COMMON_OPTIONS`.
    OPTIONS: tuple[str, ...] = ()

    @classmethod
    def check_options(cls, name: str, config: ml_collections.ConfigDict) -> None:
        """Raises ValueError for a key the evaluator does not know (a typo would otherwise be ignored)."""
        unknown = sorted(set(config.keys()) - set(COMMON_OPTIONS) - set(cls.OPTIONS))
        if unknown:
            raise ValueError(
                f"evals.{name}: unknown option(s) {unknown} for a {cls.__name__}; "
                f"its options are {sorted(COMMON_OPTIONS + cls.OPTIONS)}"
            )

    def __init__(self, name: str, config: ml_collections.ConfigDict):
        self.check_options(name, config)
        self.name = name
        self.every = int(config.get("every", 0) or 0)
        if self.every < 0:
            raise ValueError(f"evals.{name}.every must be >= 0 (0 = only at the end), got {self.every}")
        self.batch_size = int(config.get("batch_size", 256) or 256)
        limit = config.get("limit")
        self.limit = None if limit is None else int(limit)

    def due(self, step: int, final: bool) -> bool:
        return final or (self.every > 0 and step % self.every == 0)

    def run(self, params: Any, encoders: Any) -> dict[str, float]:
        raise NotImplementedError
