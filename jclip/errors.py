"""Errors every floor of jclip may raise; this module imports nothing of jclip, so anyone can import it."""

from __future__ import annotations


class ConfigError(ValueError):
    """An invalid config value; the message names the field and what is expected.

    Entry points turn it into a one-line message and exit status 2, before anything is built or compiled.
    """


class CheckpointSaveError(RuntimeError):
    """A checkpoint save that failed (a full disk, a write error, a saved file that does not check out).

    The message is one line: the step, the path, the free space and the last good checkpoint. `jclip.main`
    exits with status 4 (`config.checkpoint_failure="stop"`, and the last save of a run whatever the policy).
    """

    def __init__(self, message: str, *, step: int, last_good: int | None):
        super().__init__(message)
        self.step = step
        self.last_good = last_good


class NoIntactCheckpoint(RuntimeError):
    """Every checkpoint of a run failed to read; the message lists each step and what was wrong with it.

    Nothing was moved or deleted. `jclip.main` exits with status 2 (a human has to look, rerunning will not help).
    """
