"""Texts stored beside a dataset as memory-mapped arrays: packed UTF-8 with bounds, looked up by sorted text.

Hard-negative pools (`jclip.data.negative_pools`, keyed by caption) and joined recaptions
(`jclip.data.recaptions`, keyed by example key) are folders of 1-D `.npy` arrays plus a `meta.json`
written last. Texts are packed as UTF-8 bytes end to end with [n+1] int64 bounds rather than as fixed-width
unicode arrays, which pad every entry to the longest at 4 bytes a character (for COCO's 500K captions with
48 negatives each, about 20 GB instead of 1.3 GB). Local arrays are memory-mapped, so Grain worker processes
share the pages (a folder in a bucket, gs://, is read whole by each process that opens it); a text is found by
binary search over sorted texts, decoding about log2(n) of them.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NoReturn

import numpy as np
from etils import epath

from jclip.paths import load_array, save_array

META_FILE = "meta.json"


class PackedTexts(Sequence[str]):
    """A read-only sequence of strings stored as UTF-8 bytes end to end plus [n+1] bounds."""

    def __init__(self, data: np.ndarray, bounds: np.ndarray):
        # Plain ndarray views of memory maps: still mapped, but slicing skips np.memmap's per-slice overhead.
        self.data, self.bounds = data.view(np.ndarray), bounds.view(np.ndarray)

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.encoded(index).decode("utf-8")

    def encoded(self, index: int) -> bytes:
        """The UTF-8 bytes of one string."""
        index = range(len(self))[index]  # negative indices, IndexError
        return self.data[self.bounds[index]:self.bounds[index + 1]].tobytes()

    def window(self, start: int, stop: int) -> "PackedTexts":
        """Strings start..stop-1 as a lazy view (nothing decoded until read)."""
        return PackedTexts(self.data, self.bounds[start:stop + 1])


class _EncodedView(Sequence[bytes]):
    """The UTF-8 bytes of packed texts: sorted like the texts (UTF-8 keeps code-point order), cheaper to compare."""

    def __init__(self, texts: PackedTexts):
        self.texts = texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: Any) -> Any:
        return self.texts.encoded(index)


def pack_texts(texts: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 UTF-8 bytes end to end, int64 [n+1] bounds) of `texts`."""
    encoded = [text.encode("utf-8") for text in texts]
    bounds = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(item) for item in encoded], out=bounds[1:])
    return np.frombuffer(b"".join(encoded), np.uint8), bounds


def sorted_row(texts: PackedTexts, text: str) -> int | None:
    """The index of `text` (exact) in `texts`, which are sorted and unique; None if absent."""
    try:
        encoded = text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: never written
        return None
    view = _EncodedView(texts)
    row = bisect.bisect_left(view, encoded)
    return row if row < len(view) and view[row] == encoded else None


def write_folder(directory: str | os.PathLike, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> epath.Path:
    """Writes `<name>.npy` per array and then meta.json, which is removed first: a folder left half-rewritten
    does not open. `directory` is local or a URL (gs://)."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / META_FILE).unlink(missing_ok=True)
    for name, array in arrays.items():
        save_array(directory / f"{name}.npy", array)
    (directory / META_FILE).write_text(json.dumps(dict(meta), indent=2, default=str) + "\n")
    return directory


@dataclasses.dataclass(frozen=True)
class StoredFolder:
    """Opens the arrays of a folder of `what` (e.g. "negative pools"), with errors naming `make_command`."""

    directory: epath.Path
    what: str
    make_command: str

    def meta_path(self) -> epath.Path:
        """meta.json's path; FileNotFoundError (with the command that makes the folder) if it or the folder is absent."""
        if not self.directory.is_dir():
            raise FileNotFoundError(f"{self.what}: no folder {self.directory}; make it with {self.make_command}")
        path = self.directory / META_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{self.what}: no {META_FILE} in {self.directory}; make the folder with "
                                    f"{self.make_command}")
        return path

    def array(self, name: str) -> np.ndarray:
        """`<name>.npy` (memory-mapped if local): 1-D uint8 for `*_utf8`, else 1-D int64."""
        path = self.directory / f"{name}.npy"
        if not path.is_file():
            raise FileNotFoundError(f"{self.what}: no {path.name} in {self.directory}; remake the folder with "
                                    f"{self.make_command}")
        try:
            array = load_array(path, mmap=True)
        except (ValueError, OSError) as error:
            self.corrupt(path.name, f"{type(error).__name__}: {error}")
        expected = np.uint8 if name.endswith("_utf8") else np.int64
        if array.ndim != 1 or array.dtype != expected:
            self.corrupt(path.name, f"a {array.ndim}-D {array.dtype} array, expected 1-D {np.dtype(expected)}")
        return array

    def texts(self, prefix: str) -> PackedTexts:
        """The texts in `<prefix>_utf8.npy` and `<prefix>_bounds.npy`, their bounds checked."""
        texts = PackedTexts(self.array(f"{prefix}_utf8"), self.array(f"{prefix}_bounds"))
        bounds = texts.bounds
        if len(bounds) < 1 or bounds[0] != 0 or bounds[-1] != len(texts.data):
            self.corrupt(f"{prefix}_bounds.npy", f"bounds must run from 0 to {len(texts.data)} (the bytes in "
                                                 f"{prefix}_utf8.npy)")
        return texts

    def corrupt(self, name: str, detail: str) -> NoReturn:
        raise ValueError(f"{self.what}: {self.directory / name} is corrupt ({detail}); remake the folder with "
                         f"{self.make_command}")
