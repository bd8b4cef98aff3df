"""TFDS-style split slicing (`train[:90%]`, `train[45000:]`) for random-access sources that have no splits.

A folder of images, a class-folder tree or a converted ArrayRecord directory is one whole dataset; the
config still names splits (`data.train_split`, `evals.<name>.split`). For these sources the split *name*
selects nothing and only the slice matters, so `train[:90%]` for training and `train[90%:]` for evaluation
hold out a tenth of the data.

The slice is taken over a fixed pseudo-random permutation of all indices (`default_rng(seed)`), not over
the stored order: class folders list their files class by class, and a contiguous tail would hold only the
last classes. Both halves of a cut (`[:k]` and `[k:]`) use the same permutation, so they are disjoint and
together cover everything. `shuffle=False` slices the stored order instead (for sources whose order is
already meaningless or must be kept, e.g. DOCCI's files).

Accepted forms (as in TFDS): `name`, `name[A:B]` where A and B are each empty, an integer index
(`45000`, `-100`) or an integer percent (`90%`, `-10%`). Percent boundaries round like TFDS:
`round(len * p / 100)`. Negative boundaries count from the end, as in Python slicing.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

ACCEPTED_FORMS = "'train', 'train[:90%]', 'train[90%:]', 'train[:45000]', 'train[45000:]', 'train[10%:20%]'"

_SPLIT_RE = re.compile(r"\s*(?P<name>[^\[\]\s]+)\s*(?:\[(?P<start>[^\[\]:]*):(?P<stop>[^\[\]:]*)\])?\s*")
_BOUND_RE = re.compile(r"\s*(?P<value>[-+]?\d+)\s*(?P<percent>%?)\s*")


@dataclasses.dataclass(frozen=True)
class Bound:
    """One end of a slice: an index or a percent, either possibly negative (from the end)."""

    value: int
    percent: bool

    def resolve(self, length: int) -> int:
        """The boundary as an index in [0, length] (Python slice semantics; percents rounded like TFDS)."""
        offset = round(length * self.value / 100) if self.percent else self.value
        if offset < 0:
            offset += length
        return min(max(offset, 0), length)


@dataclasses.dataclass(frozen=True)
class SplitSpec:
    """A parsed split string: the name and an optional [start:stop] slice (None ends are open)."""

    text: str
    name: str
    start: Bound | None = None
    stop: Bound | None = None
    sliced: bool = False

    @classmethod
    def parse(cls, split: str) -> "SplitSpec":
        """Parses `name` or `name[start:stop]`; ValueError naming the split and the accepted forms."""
        match = _SPLIT_RE.fullmatch(str(split))
        if match is None:
            raise _bad(split, "not a split name with an optional [start:stop] slice")
        if match["start"] is None:
            return cls(str(split), match["name"])
        return cls(str(split), match["name"], _bound(split, match["start"]), _bound(split, match["stop"]), True)

    def bounds(self, length: int) -> tuple[int, int]:
        """(start, stop) of the slice over `length` examples; (0, length) without a slice."""
        start = 0 if self.start is None else self.start.resolve(length)
        stop = length if self.stop is None else self.stop.resolve(length)
        return start, max(start, stop)


def _bound(split: str, text: str) -> Bound | None:
    if not text.strip():
        return None
    match = _BOUND_RE.fullmatch(text)
    if match is None:
        raise _bad(split, f"boundary {text!r} is not an integer or an integer percent")
    bound = Bound(int(match["value"]), bool(match["percent"]))
    if bound.percent and abs(bound.value) > 100:
        raise _bad(split, f"percent {text!r} is outside [-100%, 100%]")
    return bound


def _bad(split: Any, why: str) -> ValueError:
    return ValueError(f"bad split {split!r}: {why}; accepted forms are {ACCEPTED_FORMS}")


def slice_indices(split: str, length: int, *, seed: int = 0, shuffle: bool = True) -> np.ndarray:
    """The indices (int64) of `length` examples that `split`'s slice selects, in permuted (or stored) order."""
    spec = SplitSpec.parse(split)
    start, stop = spec.bounds(length)
    order = np.random.default_rng(seed).permutation(length) if shuffle else np.arange(length)
    return order[start:stop].astype(np.int64)


class SplitView:
    """The examples of `source` at `indices`, as a random-access source (picklable; class names kept)."""

    def __init__(self, source: Any, indices: Sequence[int] | np.ndarray, *, split: str, seed: int, shuffle: bool):
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.split = split
        self.seed = seed
        self.shuffle = shuffle

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        index = operator.index(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {self!r}")
        return self.source[int(self.indices[index])]

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """Batched reads pass through to the source when it has them (ArrayRecord reads several at once)."""
        chosen = [int(self.indices[operator.index(i)]) for i in indices]
        if hasattr(self.source, "__getitems__"):
            return list(self.source.__getitems__(chosen))
        return [self.source[i] for i in chosen]

    def class_names(self) -> list[str] | None:
        """The underlying source's class names (None when it has none)."""
        names = getattr(self.source, "class_names", None)
        return None if names is None else names()

    def __repr__(self) -> str:
        order = f"shuffled with seed {self.seed}" if self.shuffle else "stored order"
        return f"SplitView({self.split!r}: {len(self)} of {len(self.source)} examples, {order}, of {self.source!r})"


def select_split(source: Any, split: str, *, seed: int = 0, shuffle: bool = True) -> Any:
    """`source` sliced by `split`'s slice (the name is ignored); the source itself when there is no slice.

    ValueError for a malformed split, or a slice that selects no examples.
    """
    spec = SplitSpec.parse(split)
    if not spec.sliced:
        return source
    indices = slice_indices(split, len(source), seed=seed, shuffle=shuffle)
    if not len(indices):
        raise ValueError(f"split {split!r} selects no examples of the {len(source)} of {source!r}")
    return SplitView(source, indices, split=str(split), seed=seed, shuffle=shuffle)
