"""DOCCI (Descriptions of Connected and Contrasting Images) as a random-access source of raw examples.

DOCCI ships `docci_descriptions.jsonlines`, one JSON object per line:
`{"example_id": "test_00001", "split": "test", "image_file": "test_00001.jpg", "description": "..."}`
(splits `train`, `test`, `qual_dev`, `qual_test`), and its images in `images/` next to that file.

`DocciSource(path, "test")` is the entries whose `split` is `test`, in file order; a TFDS-style slice
takes a contiguous part of them (`test[:100]`, `test[90%:]`, see `jclip.data.sources.splits`), not a shuffled one,
so that a benchmark's first N examples are the same everywhere. Examples are
`{"image": the file's bytes (None when missing), "caption": the description, "key": example_id}`; the long
descriptions suit long-caption retrieval evaluation.
"""

from __future__ import annotations

import operator
from typing import Any

from etils import epath

from jclip.data.sources import folder, splits

_KEYS = ("example_id", "split", "image_file", "description")


class DocciSource:
    """The entries of one DOCCI split (optionally sliced), with images read per `__getitem__`.

    Args:
      path: the `docci_descriptions.jsonlines` file.
      split: a split name found in the file's `split` values, with an optional slice: `test[:100]`.
      image_root: the image folder (default: `images/` beside `path`).
    """

    def __init__(self, path: str, split: str, *, image_root: str | None = None):
        jsonlines = epath.Path(path)
        if not jsonlines.is_file():
            raise FileNotFoundError(f"DOCCI descriptions file {path} does not exist (or is not a file)")
        root = epath.Path(image_root) if image_root is not None else jsonlines.parent / "images"
        if not root.is_dir():
            raise FileNotFoundError(f"DOCCI image folder {root} (for {path}) is not a folder")
        spec = splits.SplitSpec.parse(split)
        entries = _read_entries(jsonlines)
        found = sorted({entry["split"] for entry in entries})
        selected = [entry for entry in entries if entry["split"] == spec.name]
        if not selected:
            raise ValueError(f"DOCCI file {path} has no split {spec.name!r}; its splits are {found}")
        start, stop = spec.bounds(len(selected))
        selected = selected[start:stop]
        if not selected:
            raise ValueError(f"split {split!r} selects no examples of DOCCI file {path}")
        self.path = str(path)
        self.split = str(split)
        self.image_root = str(root)
        self._ids = [entry["example_id"] for entry in selected]
        self._files = [entry["image_file"] for entry in selected]
        self._descriptions = [entry["description"] for entry in selected]

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = operator.index(index)
        return {"image": self._read_image(self._files[index]), "caption": self._descriptions[index],
                "key": self._ids[index]}

    def _read_image(self, name: str) -> bytes | None:
        """The file's bytes, or None when it is missing or unreadable (preprocessing counts those)."""
        try:
            return (epath.Path(self.image_root) / name).read_bytes()
        except OSError:
            return None

    def class_names(self) -> None:
        """DOCCI has no class labels."""
        return None

    def __repr__(self) -> str:
        return f"DocciSource({self.path!r}, {self.split!r}, {len(self)} examples, images under {self.image_root})"


def _read_entries(path: epath.Path) -> list[dict[str, str]]:
    """Every line's object, checked to hold the string keys DOCCI entries have; errors name the line."""
    entries = []
    for line_number, entry in folder.jsonl_objects(path):
        where = f"{path}:{line_number}"
        missing = [key for key in _KEYS if not isinstance(entry.get(key), str)]
        if missing:
            raise ValueError(f"{where}: no string {missing} (a DOCCI entry has {list(_KEYS)})")
        entries.append({key: entry[key] for key in _KEYS})
    return entries
