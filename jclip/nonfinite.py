"""What the train loop does after a non-finite step: halt with a clear message, or skip the update and count.

The jitted step (jclip.step) finds a NaN or infinite loss, gradient norm or updated state itself, drops
that update (it returns the incoming parameters and optimizer state, with the step counter advanced) and
sets the metric `train/nonfinite` to 1. The loop (jclip.train) reads that flag for every step, at the
latest one step later and always before that step's state is saved, and hands it to a `NonfiniteGuard`,
which applies `config.nonfinite`:

- `policy="halt"` (default): the first non-finite step stops the run with `NonfiniteHalt`. Nothing of
  that step (or later) is saved; the message names the step, every loss term, the gradient norm and the
  keys of the batch's examples, and `jclip.main` exits with status `EXIT_CODE` (5).
- `policy="skip"`: the update is dropped and the run goes on; `nonfinite/skipped` (total skipped updates)
  is logged. More than `max_skips` skipped updates within the last `window` steps halt as above.

The guard's state (the steps of the skips still inside the window, and the total) is saved with each
checkpoint among the counters (jclip.checkpoint), so a resumed run makes the same decisions.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

POLICIES = ("halt", "skip")
#: `python -m jclip.main`'s exit status after a non-finite halt.
EXIT_CODE = 5
#: The metric of the step: 1 where its update was dropped as non-finite.
FLAG_METRIC = "train/nonfinite"
#: Keys of the batch's examples shown in the message (the loop writes longer lists to a file in the workdir).
SHOWN_KEYS = 32


class NonfiniteHalt(RuntimeError):
    """The run stopped on a non-finite step; the message says where and what (jclip.main exits 5)."""

    def __init__(self, message: str, step: int, keys: Sequence[str] | None):
        super().__init__(message)
        self.step = step
        self.keys = list(keys) if keys is not None else None


@dataclasses.dataclass
class NonfiniteGuard:
    """Host-side decisions on the steps' `train/nonfinite` flags (module docstring)."""

    policy: str = "halt"
    max_skips: int = 10
    window: int = 1000
    recent: list[int] = dataclasses.field(default_factory=list)  # steps of skipped updates in the window
    total: int = 0  # skipped updates since the start of training

    @classmethod
    def from_config(cls, config: Mapping[str, Any], state: Mapping[str, Any] | None = None) -> NonfiniteGuard:
        guard = cls(policy=str(config["policy"]), max_skips=int(config["max_skips"]), window=int(config["window"]))
        if state:
            guard.recent = [int(step) for step in state.get("recent", [])]
            guard.total = int(state.get("total", 0))
        return guard

    def state(self) -> dict[str, Any]:
        """JSON-friendly, for the checkpoint's counters."""
        return {"recent": list(self.recent), "total": self.total}

    def metrics(self) -> dict[str, float]:
        return {"nonfinite/skipped": self.total}

    def observe(self, step: int, metrics: Mapping[str, Any], keys: Sequence[str] | None = None) -> None:
        """Takes step `step`'s metrics (host values; `FLAG_METRIC` says whether its update was dropped) and the
        keys of its batch's examples; counts a skip, or raises `NonfiniteHalt` where the policy stops the run."""
        if not int(np.asarray(metrics[FLAG_METRIC])):
            return
        if self.policy == "halt":
            raise NonfiniteHalt(describe(step, metrics, keys, "nonfinite.policy='halt'"), step, keys)
        self.total += 1
        self.recent = [s for s in self.recent if s > step - self.window] + [step]
        if len(self.recent) > self.max_skips:
            reason = (f"{len(self.recent)} updates skipped within the last {self.window} steps, more than "
                      f"nonfinite.max_skips={self.max_skips} (steps {', '.join(map(str, self.recent))})")
            raise NonfiniteHalt(describe(step, metrics, keys, reason), step, keys)


def _number(value: Any) -> str:
    number = float(np.asarray(value))
    return str(number) if not math.isfinite(number) else f"{number:.6g}"


def describe(step: int, metrics: Mapping[str, Any], keys: Sequence[str] | None, reason: str) -> str:
    """The halt message: the step, every loss term, the gradient norm, the learning rate, the batch's keys."""
    losses = ", ".join(f"{name} {_number(value)}" for name, value in sorted(metrics.items()) if name.startswith("loss/"))
    what = []
    if "train/grad_norm" in metrics:
        what.append(f"gradient norm {_number(metrics['train/grad_norm'])}")
    if "train/learning_rate" in metrics:
        what.append(f"learning rate {_number(metrics['train/learning_rate'])}")
    finite_inputs = all(math.isfinite(float(np.asarray(v))) for n, v in metrics.items()
                        if n.startswith("loss/") or n == "train/grad_norm")
    if finite_inputs:
        what.append("the loss and gradients were finite but the update made the parameters or optimizer state non-finite")
    if keys is None:
        shown = "unknown (the batch carries no example keys)"
    else:
        shown = ", ".join(keys[:SHOWN_KEYS]) + (f", ... ({len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else "")
        shown = f"{len(keys)} on this process: {shown}"
    return (
        f"non-finite step {step} ({reason}): {losses}; {'; '.join(what)}. The update of step {step} was not "
        f"applied and nothing of it was saved. Batch example keys: {shown}. Lower optim.learning_rate or "
        "optim.grad_clip_norm, check those examples, or set --config.nonfinite.policy=skip to drop such updates."
    )
