"""Preemption: SIGTERM on any host makes every host stop after the same step, save it, and exit cleanly.

With `jax.distributed` running, JAX's preemption service catches SIGTERM on any process and all processes
agree on the step to stop at (`multihost_utils.reached_preemption_sync_point`, which must be called at every
step by every process). A single process without `jax.distributed` has no such service, so a Python SIGTERM
handler plays its part. Spot TPUs give 30 s between SIGTERM and power-off; Slurm's `--signal=TERM@300` gives
five minutes.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import jax
from jax.experimental import multihost_utils


class PreemptionWatch:
    """`reached(step)` is True at the step all processes stop at after a SIGTERM; use as a context manager."""

    def __init__(self) -> None:
        self._distributed = jax.distributed.is_initialized()
        self._signalled = False
        self._previous_handler = None

    def __enter__(self) -> "PreemptionWatch":
        # Python signal handlers can only be set from the main thread (a run inside a thread keeps the default).
        if not self._distributed and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self._signalled = True

    def reached(self, step: int) -> bool:
        """Call after every step, on every process: whether to save this step and stop."""
        if self._distributed:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self._signalled
