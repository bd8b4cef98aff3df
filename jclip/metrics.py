"""Metrics of a run: a live progress line, `metrics.jsonl`, and TensorBoard event files in the workdir.

Only process 0 writes. JSONL lines are `{"step": int, "time": float, <name>: float, ...}`; after a resume
the steps between the last checkpoint and the interruption appear twice, and the later line is current.

Cloud Storage has no appending and tensorboardX's own GCS writer needs google-cloud-storage, so for a URL
workdir (gs://...) both files are written in a local staging folder and copied whole to the workdir every
`upload_secs` and at the end; a resumed run first downloads the `metrics.jsonl` it continues.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np
from etils import epath

from jclip.paths import PathLike, as_path, is_url, upload_folder


def _scalar(value: Any) -> float:
    return float(np.asarray(value))


class MetricsWriter:
    def __init__(self, workdir: PathLike, *, enabled: bool = True, upload_secs: float = 60.0):
        self.enabled = enabled
        self._jsonl = None
        self._tensorboard = None
        self._remote: epath.Path | None = None
        self._staging: epath.Path | None = None
        self._upload_secs = upload_secs
        self._uploaded_at = 0.0
        if not enabled:
            return
        workdir = as_path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        local = workdir
        if is_url(workdir):
            self._remote = workdir
            self._staging = local = epath.Path(tempfile.mkdtemp(prefix="jclip-metrics-"))
            if (workdir / "metrics.jsonl").exists():  # a resumed run continues the file
                (local / "metrics.jsonl").write_text((workdir / "metrics.jsonl").read_text())
        self._jsonl = open(local / "metrics.jsonl", "a", encoding="utf-8")
        from tensorboardX import SummaryWriter

        self._tensorboard = SummaryWriter(str(local / "tensorboard"), flush_secs=10)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        values = {name: _scalar(value) for name, value in metrics.items()}
        record = {"step": int(step), "time": time.time(), **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in values.items():
            if math.isfinite(value):
                # TensorBoard tag names may not hold '@' (R@1 -> R_at_1).
                self._tensorboard.add_scalar(name.replace("@", "_at_"), value, int(step))
        if self._remote is not None and time.time() - self._uploaded_at >= self._upload_secs:
            self._upload()

    def sync(self) -> None:
        """Brings a URL workdir's metrics up to date now (called at each checkpoint, so that a resumed run finds
        every step up to its checkpoint in metrics.jsonl)."""
        if self.enabled and self._remote is not None:
            self._upload()

    def _upload(self) -> None:
        """Copies the staged metrics.jsonl and event files to the URL workdir, whole (objects are immutable)."""
        self._tensorboard.flush()
        upload_folder(self._staging, self._remote)
        self._uploaded_at = time.time()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()
            if self._remote is not None:
                self._upload()
                shutil.rmtree(self._staging, ignore_errors=True)


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """The live line: step, loss, examples/s and ETA, measured between log points (compile excluded)."""

    def __init__(self, total_steps: int, global_batch_size: int, *, enabled: bool = True, stream=sys.stdout):
        self.total_steps = total_steps
        self.global_batch_size = global_batch_size
        self.enabled = enabled
        self.stream = stream
        self._last_step: int | None = None
        self._last_time = 0.0

    def start(self, step: int) -> None:
        self._last_step, self._last_time = step, time.perf_counter()

    def update(self, step: int, loss: float) -> dict[str, float]:
        """Prints the line for `step`; returns throughput metrics for the metrics stream."""
        now = time.perf_counter()
        rates: dict[str, float] = {}
        if self._last_step is not None and step > self._last_step:
            seconds_per_step = (now - self._last_time) / (step - self._last_step)
            rates = {
                "perf/examples_per_second": self.global_batch_size / seconds_per_step,
                "perf/seconds_per_step": seconds_per_step,
            }
        self._last_step, self._last_time = step, now
        if self.enabled:
            line = f"step {step}/{self.total_steps} | loss {loss:.4f}"
            if rates:
                eta = rates["perf/seconds_per_step"] * (self.total_steps - step)
                line += f" | {rates['perf/examples_per_second']:.0f} examples/s | ETA {format_duration(eta)}"
            print(line, file=self.stream, flush=True)
        return rates
