"""Bad input is skipped and counted by reason: never a crash mid-run, never silence.

Web-scale image-text data holds missing, truncated, undecodable and absurd examples. Three pieces deal
with them, each on the side of the pipeline where it belongs:

- `SafePreprocessor` (per example, in Grain's map workers) wraps `ImageTextPreprocessor`. It returns the
  model inputs of a good example, or a `Skipped(reason, key)` marker for a bad one. It catches decoding
  errors narrowly (PIL's, OSError, ValueError, ...) around decoding only, so a bug in jclip still raises.
- `SkipBadExamples` (a Grain `IterDataset`, after the map and before `.batch`) drops the markers and
  attaches to every good element `skipped_before`: an int32 vector over `SKIP_REASONS` counting the
  examples skipped since the previous good element. Summing it over a batch's rows gives the exact
  per-reason counts behind that batch, through any number of threads and worker processes, and its
  iterator state (parent state + pending counts) makes resume exact.
- `SkipCounter` (host side, in the train loop) pops `skipped_before` from each batch, keeps running
  totals (checkpointable) and raises `TooManyBadExamples` when the skip rate passes `data.max_skip_rate`.

Typical training stream:

    grain.MapDataset.source(source).seed(s).shuffle().repeat()
        .random_map(...SafePreprocessor(preprocessor)...).to_iter_dataset(read_options)
        .pipe(SkipBadExamples).batch(batch_size, drop_remainder=True)
"""

from __future__ import annotations

import dataclasses
import io
import logging
import struct
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from jclip.data import transforms

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
    "missing_field",  # a field the preprocessor must keep (e.g. `label`) is absent
)
SKIPPED_FIELD = "skipped_before"
TRUNCATED_FIELD = "caption_truncated"
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS)
DEFAULT_MAX_ASPECT_RATIO = 50.0  # short side 224 -> at most 224 x 11,200 after the resize
DEFAULT_MAX_CONSECUTIVE_BAD = 10_000

_REASON_INDEX = {reason: i for i, reason in enumerate(SKIP_REASONS)}
# What PIL raises on bad files besides OSError (which includes UnidentifiedImageError): its plugins use
# SyntaxError ("broken PNG file"), EOFError, struct.error, zlib.error, ValueError and IndexError.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, zlib.error)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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


class _Bad(Exception):
    """Internal: raised while checking an example, turned into `Skipped` by `SafePreprocessor`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


def _png_declares_empty(data: bytes) -> bool:
    """True for a PNG whose header declares zero width or height (PIL refuses to identify those)."""
    if not data.startswith(_PNG_SIGNATURE) or len(data) < 24 or data[12:16] != b"IHDR":
        return False
    width, height = struct.unpack(">II", data[16:24])
    return width == 0 or height == 0


def _decode_reason(error: BaseException) -> str:
    text = str(error).lower()
    return "truncated_image" if isinstance(error, EOFError) or "truncated" in text else "undecodable_image"


def _short(error: BaseException) -> str:
    if isinstance(error, Image.UnidentifiedImageError):
        return "not an image format PIL can identify"
    return f"{type(error).__name__}: {error}"[:200]


def decode_image(
    raw: Any,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO,
    alpha_background: tuple[int, int, int] | None = transforms.WHITE,
) -> Image.Image:
    """An RGB PIL image of raw image input (bytes, array or PIL image), or `_Bad` with the reason.

    The size checks read the header only (`Image.open` is lazy); the pixels are decoded afterwards. PIL's
    own bomb check (at 2 x `Image.MAX_IMAGE_PIXELS`) still applies first, also counted as `image_too_large`.
    """
    if raw is None:
        raise _Bad("missing_image")
    if isinstance(raw, np.ndarray) and raw.dtype == object and raw.ndim == 0:
        raw = raw.item()
    if isinstance(raw, (bytes, bytearray, memoryview, np.bytes_)):
        data = bytes(raw)
        if not data:
            raise _Bad("empty_image", "zero bytes")
        if _png_declares_empty(data):
            raise _Bad("empty_image", "PNG header declares a zero size")
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as error:
            raise _Bad("image_too_large", _short(error)) from None
        except _DECODE_ERRORS as error:
            raise _Bad(_decode_reason(error), _short(error)) from None
        _check_size(image.size, max_pixels, max_aspect_ratio)
        try:
            image.load()
        except Image.DecompressionBombError as error:
            raise _Bad("image_too_large", _short(error)) from None
        except _DECODE_ERRORS as error:
            raise _Bad(_decode_reason(error), _short(error)) from None
    elif isinstance(raw, Image.Image):
        image = raw
        _check_size(image.size, max_pixels, max_aspect_ratio)
    elif isinstance(raw, (np.ndarray, list, tuple)):
        try:
            array = np.asarray(raw)
        except ValueError as error:  # ragged nested lists
            raise _Bad("unsupported_image", _short(error)) from None
        if array.size == 0:
            raise _Bad("empty_image", f"array of shape {array.shape}")
        try:
            image = transforms.array_to_pil(array)
        except (ValueError, TypeError) as error:
            raise _Bad("unsupported_image", _short(error)) from None
        _check_size(image.size, max_pixels, max_aspect_ratio)
    else:
        raise _Bad("unsupported_image", f"image of type {type(raw).__name__}")
    try:
        return transforms.to_rgb(image, alpha_background)
    except _DECODE_ERRORS as error:
        raise _Bad("unsupported_image", f"mode {image.mode}: {_short(error)}") from None


def _check_size(size: tuple[int, int], max_pixels: int | None, max_aspect_ratio: float | None) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise _Bad("empty_image", f"size {width}x{height}")
    if max_pixels is not None and width * height > max_pixels:
        raise _Bad("image_too_large", f"{width}x{height} = {width * height} pixels > max_pixels {max_pixels}")
    if max_aspect_ratio is not None and max(width, height) / min(width, height) > max_aspect_ratio:
        raise _Bad("extreme_aspect_ratio", f"{width}x{height} > max_aspect_ratio {max_aspect_ratio}")


def caption_text(raw: Any) -> str:
    """One caption as text, or `_Bad`: bytes must be UTF-8 and something must remain after stripping."""
    if raw is None:
        raise _Bad("missing_caption")
    if isinstance(raw, np.ndarray) and raw.ndim == 0:
        raw = raw.item()
    if isinstance(raw, (bytes, bytearray, np.bytes_)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as error:
            raise _Bad("undecodable_caption", _short(error)) from None
    if not isinstance(raw, str):
        raise _Bad("undecodable_caption", f"caption of type {type(raw).__name__}")
    if not raw.strip():
        raise _Bad("empty_caption")
    return raw


def caption_candidates(raw: Any) -> list[str]:
    """The usable captions of a caption field (one caption or a list); `_Bad` (the first reason) if none."""
    if isinstance(raw, np.ndarray) and raw.ndim > 0:
        raw = raw.tolist()
    if not isinstance(raw, (list, tuple)):
        return [caption_text(raw)]
    if not raw:
        raise _Bad("missing_caption", "empty list of captions")
    texts, first_bad = [], None
    for item in raw:
        try:
            texts.append(caption_text(item))
        except _Bad as bad:
            first_bad = first_bad or bad
    if not texts:
        raise first_bad
    return texts


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


@dataclasses.dataclass(frozen=True)
class SafePreprocessor:
    """`ImageTextPreprocessor` that returns `Skipped(reason, key)` for a bad example instead of raising.

    Call it like the wrapped one: `(example, rng)` in training (Grain's random map), `(example)` in
    evaluation. Several captions: training (an `rng` given) picks one of the usable ones uniformly with
    the example's rng; evaluation takes the first usable one. Captions longer than the context are
    truncated by the tokenizer, not skipped; with `count_truncated` the output carries
    `caption_truncated` (int32 0/1), which `SkipCounter` pops and counts.
    """

    preprocessor: transforms.ImageTextPreprocessor
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO
    count_truncated: bool = True
    key_field: str = "key"

    def __call__(
        self, example: Mapping[str, Any], rng: np.random.Generator | None = None
    ) -> dict[str, np.ndarray] | Skipped:
        try:
            return self._preprocess(example, rng)
        except _Bad as bad:
            return Skipped(bad.reason, example_key(example, self.key_field), bad.detail)

    def _preprocess(self, example: Mapping[str, Any], rng: np.random.Generator | None) -> dict[str, np.ndarray]:
        pre = self.preprocessor
        # Cheap checks first: no image is decoded for an example that would be skipped anyway.
        texts = caption_candidates(example.get(pre.text_key))
        for key in pre.keep:
            if example.get(key) is None:
                raise _Bad("missing_field", f"no {key!r}")
        image = decode_image(
            example.get(pre.image_key),
            max_pixels=self.max_pixels,
            max_aspect_ratio=self.max_aspect_ratio,
            alpha_background=pre.alpha_background,
        )
        text = texts[int(rng.integers(len(texts)))] if rng is not None and len(texts) > 1 else texts[0]
        clean = {pre.image_key: image, pre.text_key: text, **{key: example[key] for key in pre.keep}}
        out = pre(clean, rng)
        token_ids = out["token_ids"]
        tokenizer = pre.tokenizer
        if token_ids[tokenizer.num_start_tokens] == tokenizer.end_of_text:  # no tokens once cleaned ("&nbsp;")
            raise _Bad("empty_caption", "no tokens after cleaning")
        if self.count_truncated:
            # A full context ends in the end token; only then is it worth re-counting the caption's tokens.
            truncated = token_ids[-1] == tokenizer.end_of_text and tokenizer.truncates(text)
            out[TRUNCATED_FIELD] = np.int32(truncated)
        return out


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
