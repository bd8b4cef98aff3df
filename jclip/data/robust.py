"""Bad input is skipped and counted by reason: never a crash mid-run, never silence.

Web-scale image-text data holds missing, truncated, undecodable and absurd examples. The pieces that deal
with them sit on the side of the pipeline where they belong:

- Preprocessing ops (`jclip.data.ops`, per example, in Grain's map workers) raise `BadExample(reason)` for
  a bad example; the op chain (`jclip.data.ops.Preprocess`) turns it into a `Skipped(reason, key)` marker.
  Ops catch decoding errors narrowly (PIL's, OSError, ValueError, ...), so a bug in jclip still raises.
- `SkipBadExamples` (a Grain `IterDataset`, after the map and before `.batch`) drops the markers and
  attaches to every good element `skipped_before`: an int32 vector over `SKIP_REASONS` counting the
  examples skipped since the previous good element. Summing it over a batch's rows gives the exact
  per-reason counts behind that batch, through any number of threads and worker processes, and its
  iterator state (parent state + pending counts) makes resume exact.
- `SkipCounter` (host side, in the train loop) pops `skipped_before` (and `caption_truncated`) from each
  batch, keeps running totals (checkpointable) and raises `TooManyBadExamples` when the skip rate passes
  `data.max_skip_rate`.

Typical training stream:

    grain.MapDataset.source(source).seed(s).shuffle().repeat()
        .random_map(...Preprocess(ops)...).to_iter_dataset(read_options)
        .pipe(SkipBadExamples).batch(batch_size, drop_remainder=True)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

log = logging.getLogger("jclip.data")

SKIP_REASONS: tuple[str, ...] = (
    "missing_image",  # None, or the image key is absent
    "empty_image",  # zero bytes, zero width or height, an empty array
    "undecodable_image",  # not an image PIL can identify, or a corrupt one
    "truncated_image",  # the file ends early
    "image_too_large",  # more pixels than `max_pixels` (checked from the header, before decoding)
    "extreme_aspect_ratio",  # long side / short side over `max_aspect_ratio` (the resize would blow up)
    "unsupported_image",  # a type, array dtype/shape or colour mode that cannot become RGB
    "missing_caption",  # None, an empty list, or the text key is absent
    "empty_caption",  # nothing left after whitespace cleaning
    "undecodable_caption",  # bytes that are not UTF-8, or not text at all
    "missing_field",  # a field an op needs (e.g. `label`) is absent
    "missing_dense_caption",  # the caption rule chose the dense caption, and the example has none (or a blank one)
    "missing_recaption",  # `joined_captions` holds no recaption for the example's key
)
SKIPPED_FIELD = "skipped_before"
TRUNCATED_FIELD = "caption_truncated"
#: The training pipeline's host-only field of example keys (str [batch]), for messages about a batch: the train
#: loop pops it (`pop_example_keys`) before the batch goes to the devices.
KEY_FIELD = "example_key"
DEFAULT_MAX_CONSECUTIVE_BAD = 10_000

_REASON_INDEX = {reason: i for i, reason in enumerate(SKIP_REASONS)}


class TooManyBadExamples(RuntimeError):
    """The input has too many bad examples to be the data the run was meant to train on."""


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A bad example's marker: why it was skipped (one of `SKIP_REASONS`), its `key` and a detail for logs."""

    reason: str
    key: str | None = None
    detail: str = ""

    def __post_init__(self):
        if self.reason not in _REASON_INDEX:
            raise ValueError(f"unknown skip reason {self.reason!r}; known: {SKIP_REASONS}")


class BadExample(Exception):
    """Raised by a preprocessing op for a bad example: `reason` (one of `SKIP_REASONS`) and a detail for logs.

    The op chain turns it into a `Skipped` marker, which `SkipBadExamples` drops and counts.
    """

    def __init__(self, reason: str, detail: str = ""):
        if reason not in _REASON_INDEX:
            raise ValueError(f"unknown skip reason {reason!r}; known: {SKIP_REASONS}")
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


def example_key(example: Mapping[str, Any], key_field: str = "key") -> str | None:
    """An example's key as text (None when it has none), for messages and look-ups."""
    key = example.get(key_field)
    if key is None:
        return None
    if isinstance(key, np.ndarray) and key.ndim == 0:
        key = key.item()
    if isinstance(key, (bytes, np.bytes_)):
        return bytes(key).decode("utf-8", errors="replace")
    return str(key)


def pop_example_keys(batch: dict[str, Any]) -> list[str] | None:
    """Pops `KEY_FIELD` from a training batch in place: its examples' keys ("" for none), or None without it."""
    keys = batch.pop(KEY_FIELD, None)
    return None if keys is None else [str(key) for key in np.asarray(keys).reshape(-1)]


def _zero_counts() -> np.ndarray:
    return np.zeros(len(SKIP_REASONS), np.int32)


def _counts_text(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in counts.items() if count) or "none"


class SkipBadExamples(grain.IterDataset):
    """Drops `Skipped` markers; every good element gets `skipped_before` (int32 [len(SKIP_REASONS)]).

    Apply after the preprocessing map and before `.batch`. Raises `TooManyBadExamples` after more than
    `max_consecutive_bad` bad examples in a row (a broken source or wrong keys would otherwise loop
    forever). Logs the first `log_first` skips of each reason per iterator, with the example's key.
    Skips after the last good element of a finite stream have no element to ride on: they are logged.
    The pending counts are part of the iterator state, though between two `next` calls they are zero
    except at the end of a finite stream (a good element takes them all).
    """

    def __init__(
        self,
        parent: grain.IterDataset,
        *,
        max_consecutive_bad: int = DEFAULT_MAX_CONSECUTIVE_BAD,
        log_first: int = 3,
    ):
        super().__init__(parent)
        self._max_consecutive_bad = max_consecutive_bad
        self._log_first = log_first

    def __iter__(self) -> _SkipBadExamplesIterator:
        return _SkipBadExamplesIterator(self._parent.__iter__(), self._max_consecutive_bad, self._log_first)

    def __str__(self) -> str:
        return f"SkipBadExamples(max_consecutive_bad={self._max_consecutive_bad})"


class _SkipBadExamplesIterator(grain.DatasetIterator):
    """State: the parent's state and the counts skipped since the last good element (exact resume)."""

    def __init__(self, parent: grain.DatasetIterator, max_consecutive_bad: int, log_first: int):
        super().__init__(parent)
        self._max_consecutive_bad = max_consecutive_bad
        self._log_first = log_first
        self._pending = _zero_counts()
        self._logged = dict.fromkeys(SKIP_REASONS, 0)
        self._warned_at_end = False

    def __next__(self) -> dict[str, Any]:
        while True:
            try:
                element = next(self._parent)
            except StopIteration:
                if self._pending.any() and not self._warned_at_end:
                    self._warned_at_end = True
                    log.warning("the stream ended after skipping %s (no good example left to carry the counts)",
                                _counts_text(dict(zip(SKIP_REASONS, self._pending.tolist()))))
                raise
            if isinstance(element, Skipped):
                self._skip(element)
                continue
            if not isinstance(element, Mapping):
                raise TypeError(f"SkipBadExamples expects dict elements or Skipped, got {type(element).__name__}")
            with self._stats.record_self_time():
                out = {**element, SKIPPED_FIELD: self._pending}
                self._pending = _zero_counts()
                return self._stats.record_output_spec(out)

    def _skip(self, skipped: Skipped) -> None:
        self._pending[_REASON_INDEX[skipped.reason]] += 1
        if self._logged[skipped.reason] < self._log_first:
            self._logged[skipped.reason] += 1
            last = self._logged[skipped.reason] == self._log_first
            log.warning("skipped example %s: %s%s%s", skipped.key or "(no key)", skipped.reason,
                        f" ({skipped.detail})" if skipped.detail else "",
                        f"; further {skipped.reason} skips are only counted" if last else "")
        consecutive = int(self._pending.sum())
        if consecutive > self._max_consecutive_bad:
            counts = _counts_text(dict(zip(SKIP_REASONS, self._pending.tolist())))
            last = f"{skipped.key or '(no key)'}{', ' + skipped.detail if skipped.detail else ''}"
            raise TooManyBadExamples(
                f"{consecutive} consecutive examples were bad ({counts}; last: {last}), more than data.max_consecutive_bad="
                f"{self._max_consecutive_bad}. The source looks broken: check data.image_field / data.caption_field "
                "and the files themselves."
            )

    def get_state(self) -> dict[str, Any]:
        return {
            "parent": self._parent.get_state(),
            "pending_skips": {reason: int(count) for reason, count in zip(SKIP_REASONS, self._pending)},
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        pending = state.get("pending_skips", {})
        self._pending = np.asarray([int(pending.get(reason, 0)) for reason in SKIP_REASONS], np.int32)

    def __str__(self) -> str:
        return "SkipBadExamplesDatasetIterator"


class SkipCounter:
    """Host-side running totals of skipped examples, from the `skipped_before` rows of each batch.

    `examples_seen` counts every example read (good rows + skipped); `skip_rate` is skipped / seen since
    the start of training (the totals are checkpointed with `state()` / `from_state`). Totals are this
    process's own; sum them over processes for global numbers.
    """

    def __init__(self, *, min_examples: int = 1000, config_key: str = "data.max_skip_rate"):
        self.min_examples = min_examples
        self.config_key = config_key
        self.good = 0
        self.caption_truncated = 0
        self._skipped = np.zeros(len(SKIP_REASONS), np.int64)

    def update(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Pops `skipped_before` (and `caption_truncated`) from `batch` in place, counts them; returns `batch`."""
        counts = np.asarray(batch.pop(SKIPPED_FIELD))
        if counts.ndim != 2 or counts.shape[1] != len(SKIP_REASONS):
            raise ValueError(f"{SKIPPED_FIELD} must be [batch, {len(SKIP_REASONS)}], got {counts.shape}")
        self._skipped += counts.sum(axis=0, dtype=np.int64)
        self.good += counts.shape[0]
        if TRUNCATED_FIELD in batch:
            self.caption_truncated += int(np.asarray(batch.pop(TRUNCATED_FIELD)).sum())
        return batch

    def totals(self) -> dict[str, int]:
        """Skipped examples so far, by reason (every reason listed, zeros included)."""
        return {reason: int(count) for reason, count in zip(SKIP_REASONS, self._skipped)}

    @property
    def skipped(self) -> int:
        return int(self._skipped.sum())

    @property
    def examples_seen(self) -> int:
        return self.good + self.skipped

    @property
    def skip_rate(self) -> float:
        return self.skipped / self.examples_seen if self.examples_seen else 0.0

    def check(self, threshold: float) -> None:
        """Raises `TooManyBadExamples` once at least `min_examples` were seen and the skip rate is over `threshold`."""
        if self.examples_seen < self.min_examples or self.skip_rate <= threshold:
            return
        raise TooManyBadExamples(
            f"{self.skip_rate:.2%} of the {self.examples_seen} examples read so far were skipped as bad "
            f"({_counts_text(self.totals())}), above the limit {self.config_key}={threshold}. Fix the data "
            f"(the first skips of each reason are logged with their keys) or raise the limit, e.g. "
            f"--config.{self.config_key}={min(1.0, max(2 * threshold, self.skip_rate + 0.01)):.2f}."
        )

    def metrics(self) -> dict[str, float]:
        """Flat numbers for the metric writer: skip rate, totals by reason, truncated captions."""
        out: dict[str, float] = {"data/skip_rate": self.skip_rate, "data/caption_truncated": self.caption_truncated}
        out.update({f"data/skipped/{reason}": count for reason, count in self.totals().items()})
        return out

    @classmethod
    def merged(cls, states: Sequence[Mapping[str, Any]], **kwargs: Any) -> SkipCounter:
        """One counter holding the sum of several counters' `state()`s (e.g. of every process)."""
        total = cls(**kwargs)
        for state in states:
            part = cls.from_state(state)
            total.good += part.good
            total.caption_truncated += part.caption_truncated
            total._skipped += part._skipped
        return total

    def state(self) -> dict[str, Any]:
        """JSON-friendly totals for the checkpoint."""
        return {"good": self.good, "skipped": self.totals(), "caption_truncated": self.caption_truncated}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], **kwargs: Any) -> SkipCounter:
        counter = cls(**kwargs)
        counter.good = int(state["good"])
        counter.caption_truncated = int(state.get("caption_truncated", 0))
        skipped = state.get("skipped", {})
        counter._skipped = np.asarray([int(skipped.get(reason, 0)) for reason in SKIP_REASONS], np.int64)
        return counter


def skip_totals(batches: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Per-reason totals of some batches' `skipped_before`, leaving the batches as they are (tests, tools)."""
    counts = np.zeros(len(SKIP_REASONS), np.int64)
    for batch in batches:
        counts += np.asarray(batch[SKIPPED_FIELD]).sum(axis=0, dtype=np.int64)
    return {reason: int(count) for reason, count in zip(SKIP_REASONS, counts)}
