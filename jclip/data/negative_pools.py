"""Hard-negative candidate pools stored beside a dataset: per caption and kind, every candidate a generator made.

FSC-CLIP (Oh et al., EMNLP 2024) draws fresh hard-negative captions every step. Parsing captions is too slow
for the input pipeline (about 0.6 s of CPU per batch of 256), so `python -m jclip.make_negatives` parses every
training caption once and writes all its candidates here; the `hard_negatives` op then draws one candidate per
kind per example with the example's seeded RNG, which keeps negatives fresh and resume exact.

A pools folder holds:

    meta.json                  backend, kinds, seed, counts, coverage, problems, jclip version, date, source
    captions_utf8.npy  [B]     uint8   the captions, sorted and unique, UTF-8 bytes end to end
    captions_bounds.npy [M+1]  int64   caption m is captions_utf8[bounds[m]:bounds[m+1]]
    <kind>_offsets.npy [M+1]   int64   caption m's candidates of that kind are texts offsets[m]:offsets[m+1]
    <kind>_utf8.npy    [B_k]   uint8   the candidate texts of that kind, UTF-8 bytes end to end
    <kind>_bounds.npy  [T_k+1] int64   candidate t is <kind>_utf8[bounds[t]:bounds[t+1]]

Texts are packed as UTF-8 with bounds and memory-mapped when local (`jclip.data.packed_texts`, shared with joined
recaptions); a caption is found by binary search over the sorted captions, decoding about log2(M) of them.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from etils import epath

from jclip.data.packed_texts import META_FILE, PackedTexts, StoredFolder, pack_texts, sorted_row, write_folder

__all__ = ["META_FILE", "CaptionNegativesLike", "MissingNegativesError", "NegativePools", "PackedTexts", "pack_texts",
           "pool_coverage", "problem_counts", "write_pools"]

FORMAT = 1
#: What makes a pools folder (named in every error about a missing or broken one).
MAKE_COMMAND = "python -m jclip.make_negatives --config=<the training config> --output=<folder>"


class CaptionNegativesLike(Protocol):
    """One caption's generator result (`jclip.data.negatives.CaptionNegatives` has this shape)."""

    caption: str
    pools: Mapping[str, Sequence[str]]
    problem: str | None


class MissingNegativesError(KeyError):
    """A training caption that is not in the pools folder."""

    def __str__(self) -> str:
        return str(self.args[0])


def pool_coverage(results: Sequence[CaptionNegativesLike], kinds: Sequence[str]) -> dict[str, float]:
    """kind -> share of captions with at least one candidate of that kind, plus "any" and "all"."""
    if not results:
        return {**{kind: 0.0 for kind in kinds}, "any": 0.0, "all": 0.0}
    has = np.array([[bool(result.pools.get(kind)) for kind in kinds] for result in results], bool)
    shares = {kind: float(has[:, k].mean()) for k, kind in enumerate(kinds)}
    return {**shares, "any": float(has.any(axis=1).mean()), "all": float(has.all(axis=1).mean())}


def problem_counts(results: Sequence[CaptionNegativesLike], kinds: Sequence[str]) -> dict[str, int]:
    """Among captions without any candidate: how many per reported problem ("no candidates" when none given)."""
    counts = collections.Counter(
        result.problem or "no candidates" for result in results if not any(result.pools.get(kind) for kind in kinds))
    return dict(counts.most_common())


def write_pools(
    directory: str | os.PathLike, results: Sequence[CaptionNegativesLike], *, backend: str, seed: int,
    source: Any = None, kinds: Sequence[str] | None = None, extra_meta: Mapping[str, Any] | None = None,
) -> epath.Path:
    """Writes a pools folder (see the module), local or a URL (gs://), from one generator result per caption.

    `kinds` defaults to every kind the results name, in the order first seen. Captions must be unique;
    `source` (e.g. the config's data sources) and `extra_meta` are recorded in meta.json as given.
    """
    directory = epath.Path(directory)
    if kinds is None:
        kinds = list(dict.fromkeys(kind for result in results for kind in result.pools))
    kinds = [str(kind) for kind in kinds]
    if not kinds or any(not kind.isidentifier() for kind in kinds) or len(set(kinds)) != len(kinds):
        raise ValueError(f"negative pools {directory}: kinds must be distinct identifiers, got {kinds}")
    by_caption = {}
    for result in results:
        if not isinstance(result.caption, str) or not result.caption:
            raise ValueError(f"negative pools {directory}: a caption must be a non-empty str, got {result.caption!r}")
        if result.caption in by_caption:
            raise ValueError(f"negative pools {directory}: caption {result.caption!r} appears twice; de-duplicate "
                             f"the captions before generating")
        unknown = set(result.pools) - set(kinds)
        if unknown:
            raise ValueError(f"negative pools {directory}: caption {result.caption!r} has kinds {sorted(unknown)} "
                             f"that are not among {kinds}")
        by_caption[result.caption] = result
    ordered = [by_caption[caption] for caption in sorted(by_caption)]

    arrays: dict[str, np.ndarray] = {}
    arrays["captions_utf8"], arrays["captions_bounds"] = pack_texts(result.caption for result in ordered)
    counts = {"captions": len(ordered)}
    for kind in kinds:
        per_caption = [[str(text) for text in result.pools.get(kind, ())] for result in ordered]
        offsets = np.zeros(len(ordered) + 1, np.int64)
        np.cumsum([len(texts) for texts in per_caption], out=offsets[1:])
        arrays[f"{kind}_offsets"] = offsets
        arrays[f"{kind}_utf8"], arrays[f"{kind}_bounds"] = pack_texts(text for texts in per_caption for text in texts)
        counts[kind] = int(offsets[-1])
    from jclip import __version__

    meta = {
        "format": FORMAT, "backend": str(backend), "kinds": kinds, "seed": int(seed), "counts": counts,
        "coverage": pool_coverage(ordered, kinds), "problems": problem_counts(ordered, kinds),
        "jclip_version": __version__, "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source, **dict(extra_meta or {}),
    }
    return write_folder(directory, arrays, meta)


class NegativePools:
    """A pools folder opened for look-up by caption text (local arrays memory-mapped; pickles as its path)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = epath.Path(directory)
        self._folder = StoredFolder(self.directory, "negative pools", MAKE_COMMAND)
        meta_path = self._folder.meta_path()
        try:
            self.meta = json.loads(meta_path.read_text())
            self.kinds = tuple(str(kind) for kind in self.meta["kinds"])
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"negative pools: {meta_path} is not a pools meta file ({type(error).__name__}: {error}); "
                             f"remake the folder with {MAKE_COMMAND}") from None
        self.captions = self._folder.texts("captions")
        self._offsets, self._texts = {}, {}
        for kind in self.kinds:
            offsets = self._folder.array(f"{kind}_offsets")
            texts = self._folder.texts(kind)
            if offsets.shape != (len(self.captions) + 1,) or offsets[0] != 0 or offsets[-1] != len(texts):
                self._folder.corrupt(f"{kind}_offsets.npy", f"shape {offsets.shape}, expected [{len(self.captions) + 1}] "
                                                            f"from 0 to {len(texts)}")
            self._offsets[kind], self._texts[kind] = offsets, texts

    def __len__(self) -> int:
        return len(self.captions)

    def row(self, caption: str) -> int | None:
        """The caption's row (exact text), or None."""
        return sorted_row(self.captions, caption)

    def candidates(self, row: int, kind: str) -> Sequence[str]:
        """The candidates of one kind of the caption in `row` (decoded on access)."""
        offsets = self._offsets[kind]
        return self._texts[kind].window(int(offsets[row]), int(offsets[row + 1]))

    def lookup(self, caption: str) -> dict[str, tuple[str, ...]] | None:
        """kind -> the caption's candidates (possibly none), or None for a caption the folder does not hold."""
        row = self.row(caption)
        return None if row is None else {kind: tuple(self.candidates(row, kind)) for kind in self.kinds}

    def missing(self, caption: str) -> MissingNegativesError:
        """The error for a caption the folder lacks, naming it and the command that makes the folder."""
        return MissingNegativesError(
            f"caption {caption!r} is not in the negative pools {self.directory} ({len(self)} captions, made by "
            f"backend {self.meta.get('backend')!r} from {self.meta.get('source')!r}); remake them for this "
            f"config's training data ({MAKE_COMMAND}), or unset data.hard_negatives")

    def __getstate__(self) -> dict[str, Any]:  # Grain worker processes re-open the memory maps.
        return {"directory": self.directory}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["directory"])
