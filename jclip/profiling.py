"""`config.profile_steps="FIRST,LAST"`: a `jax.profiler` trace of train steps FIRST..LAST in `<workdir>/profile`.

Each process writes its own trace (`plugins/profile/<run>/<host>.xplane.pb`, which TensorBoard's profile plugin
opens with `tensorboard --logdir=<workdir>/profile`) and a Perfetto trace (`perfetto_trace.json.gz`, for
ui.perfetto.dev). The trace starts before step FIRST is dispatched and stops once step LAST's state is computed,
so it holds those steps whole and nothing of the input pipeline's start-up. A workdir in a bucket gets the files
after the trace stops (the profiler writes locally).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from jclip import paths
from jclip.errors import ConfigError

PROFILE_FOLDER = "profile"


def parse_profile_steps(spec: str | None, total_steps: int) -> tuple[int, int] | None:
    """(first, last) of "FIRST,LAST" (or "STEP" for one step); None for an empty spec. ConfigError otherwise."""
    text = (spec or "").strip()
    if not text:
        return None
    parts = [part.strip() for part in text.split(",")]
    try:
        steps = [int(part) for part in parts]
    except ValueError:
        steps = []
    if len(steps) not in (1, 2):
        raise ConfigError(f"profile_steps must be 'FIRST,LAST' (or one step), e.g. '10,20'; got {spec!r}")
    first, last = steps[0], steps[-1]
    if not 1 <= first <= last <= total_steps:
        raise ConfigError(f"profile_steps {spec!r} must satisfy 1 <= FIRST <= LAST <= total_steps ({total_steps})")
    return first, last


class StepProfiler:
    """Starts `jax.profiler` before step `first` and stops it after step `last` (see the module docstring)."""

    def __init__(self, first: int, last: int, workdir: paths.PathLike, announce: bool = True) -> None:
        self.first, self.last, self.announce = first, last, announce
        self.destination = paths.as_path(workdir) / PROFILE_FOLDER
        self._staging: tempfile.TemporaryDirectory | None = None
        self.active = False

    @classmethod
    def from_config(cls, spec: str | None, total_steps: int, workdir: paths.PathLike,
                    announce: bool = True) -> "StepProfiler | None":
        steps = parse_profile_steps(spec, total_steps)
        return None if steps is None else cls(*steps, workdir, announce)

    def _trace_dir(self) -> str:
        if not paths.is_url(os.fspath(self.destination)):
            return os.fspath(self.destination)
        self._staging = tempfile.TemporaryDirectory(prefix="jclip-profile-")
        return self._staging.name

    def before_step(self, step: int) -> None:
        if step == self.first and not self.active:
            import jax

            jax.profiler.start_trace(self._trace_dir(), create_perfetto_trace=True)
            self.active = True

    def after_step(self, step: int, state: Any) -> None:
        if step >= self.last and self.active:
            self.stop(state)

    def stop(self, state: Any = None) -> None:
        """Ends the trace (after `state` is computed) and, for a bucket, uploads it; a no-op when not tracing."""
        if not self.active:
            return
        import jax

        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        self.active = False
        if self._staging is not None:
            paths.upload_folder(self._staging.name, self.destination)
            self._staging.cleanup()
            self._staging = None
        if self.announce:
            print(f"profile of steps {self.first}-{self.last} written to {self.destination} (TensorBoard: "
                  f"tensorboard --logdir={self.destination}; Perfetto: its perfetto_trace.json.gz)", flush=True)


__all__ = ["PROFILE_FOLDER", "StepProfiler", "parse_profile_steps"]
