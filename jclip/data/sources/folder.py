"""Image files on disk as a random-access source of jclip raw examples: a captions file, or class folders.

`FolderSource(captions_file)` lists one example per entry of a captions file, in file order:

* JSONL (`.jsonl`, `.ndjson`): one JSON object per line, e.g.
  `{"path": "img/0001.jpg", "caption": "a dog", "label": 3}`; `caption` is a string, a list of strings
  (several captions) or absent/null; `label` is an int or a class name. Blank lines are skipped.
* CSV (`.csv`; `.tsv` for tab-separated): a header row naming the columns. Several captions go in several
  columns named after the caption field with a number, `caption_1, caption_2, ...` (also `caption1`,
  `caption-1`; a plain `caption` column may be one of them); empty cells are no caption. A single caption
  column gives a str, several give a list. Text is never split on a separator, since any character may
  occur in a caption. Label cells that are all integers are ids; otherwise they are class names.

Paths are relative to `image_root` (default: the captions file's folder) or absolute. Class names, given as
strings, become ids in sorted order (or in the order of `class_names=` when given, so that several splits
agree); `class_names()` exposes them for zero-shot prompts.

`folder_from_class_dirs(root)` lists `root/<class>/<file>` (ImageNet- or CIFAR-style exports): label = the
class folder's index in sorted order, caption = None.

Examples are canonical raw examples: `image` is the file's bytes, read per `__getitem__` (None when the file
is missing or unreadable, for preprocessing to count), `caption`, `label` (when labels are known), and `key`
(the entry's path). A missing captions file or image root, or a malformed captions file, fails at
construction naming the file and line. The parsed entries are held in memory and pickled with the source
(about 100 bytes an entry), which Grain workers need.
"""

from __future__ import annotations

import csv
import io
import json
import operator
import pathlib
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from etils import epath

from jclip.paths import is_url

#: Files `folder_from_class_dirs` takes as images (lower-cased suffixes).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}

Caption = str | list[str] | None


class FolderSource:
    """Random access over image files listed in a captions file (JSONL or CSV; see the module docstring).

    Args:
      captions_file: the JSONL or CSV file listing the examples.
      image_root: the folder the paths are relative to (default: the captions file's folder).
      path_field, caption_field, label_field: the keys (JSONL) or column names (CSV) to read;
        `caption_field=None` gives `caption=None`; `label_field=None` gives no `label`.
      class_names: the class names in id order, for string labels (default: their sorted unique values);
        with integer labels they are only exposed by `class_names()`.
    """

    def __init__(
        self,
        captions_file: str,
        *,
        image_root: str | None = None,
        path_field: str = "path",
        caption_field: str | None = "caption",
        label_field: str | None = None,
        class_names: Sequence[str] | None = None,
    ):
        captions_path = epath.Path(captions_file)
        if not captions_path.is_file():
            raise FileNotFoundError(f"captions file {captions_file} does not exist (or is not a file)")
        root = epath.Path(image_root) if image_root is not None else captions_path.parent
        if not root.is_dir():
            raise FileNotFoundError(f"image root {root} (for {captions_file}) is not a folder")
        suffix = captions_path.suffix.lower()
        if suffix in _JSONL_SUFFIXES:
            rows = _read_jsonl(captions_path, path_field, caption_field, label_field)
        elif suffix in _CSV_DELIMITERS:
            rows = _read_csv(captions_path, _CSV_DELIMITERS[suffix], path_field, caption_field, label_field)
        else:
            raise ValueError(f"captions file {captions_file}: unknown format {suffix!r}; "
                             f"expected one of {sorted(_JSONL_SUFFIXES + tuple(_CSV_DELIMITERS))}")
        self.captions_file = str(captions_file)
        self.image_root = str(root)
        self._paths = [row[0] for row in rows]
        self._captions = [row[1] for row in rows]
        self._labels, self._class_names = (None, None) if label_field is None else _label_ids(
            [row[2] for row in rows], [row[3] for row in rows], class_names, str(captions_file))

    @classmethod
    def _from_entries(cls, image_root: str, paths: list[str], labels: np.ndarray,
                      class_names: list[str], origin: str) -> "FolderSource":
        """A source over already listed files (no captions file), as `folder_from_class_dirs` makes."""
        source = cls.__new__(cls)
        source.captions_file = origin
        source.image_root = image_root
        source._paths = paths
        source._captions = [None] * len(paths)
        source._labels = labels
        source._class_names = class_names
        return source

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = operator.index(index)
        path = self._paths[index]
        example = {"image": self._read_image(path), "caption": self._captions[index], "key": path}
        if self._labels is not None:
            example["label"] = int(self._labels[index])
        return example

    def _read_image(self, path: str) -> bytes | None:
        """The file's bytes, or None when it is missing or unreadable (preprocessing counts those)."""
        try:
            return (epath.Path(self.image_root) / path).read_bytes()
        except OSError:
            return None

    def class_names(self) -> list[str] | None:
        """Class names in id order (string labels, `class_names=`, or class folders), else None."""
        return None if self._class_names is None else list(self._class_names)

    def __repr__(self) -> str:
        return f"FolderSource({self.captions_file!r}, {len(self)} examples, images under {self.image_root})"


def folder_from_class_dirs(root: str, *, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> FolderSource:
    """`root/<class>/**/<file>` as a source: label = index of the class folder in sorted order, no caption.

    Hidden files and folders (names starting with '.') and files with other extensions are not examples.
    Files are listed in sorted order within each class, so indices are the same on every host.
    """
    root_path = epath.Path(root)
    if not root_path.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    suffixes = tuple(e.lower() for e in extensions)
    if is_url(root):
        class_names, files_by_class = _listed_in_bucket(root, suffixes)
    else:
        class_names = sorted(p.name for p in root_path.iterdir() if p.is_dir() and not p.name.startswith("."))
        files_by_class = {name: _image_files(root_path / name, suffixes) for name in class_names}
    if not class_names:
        raise ValueError(f"image folder {root} has no class folders (expected {root}/<class>/<image>)")
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        files = files_by_class[name]
        paths += [f"{name}/{f}" for f in files]
        labels += [label] * len(files)
    if not paths:
        raise ValueError(f"image folder {root}: its class folders hold no files with extensions {list(suffixes)}")
    return FolderSource._from_entries(str(root_path), paths, np.asarray(labels, np.int32), class_names, str(root))


def _image_files(folder: epath.Path, suffixes: tuple[str, ...]) -> list[str]:
    """Paths (relative to `folder`, '/'-separated, sorted) of the image files under it, at any depth."""
    found: list[str] = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            found += [f"{entry.name}/{f}" for f in _image_files(entry, suffixes)]
        elif entry.suffix.lower() in suffixes:
            found.append(entry.name)
    return found


def _listed_in_bucket(root: str, suffixes: tuple[str, ...]) -> tuple[list[str], dict[str, list[str]]]:
    """(class names, class -> its image files) under a URL, from one recursive listing rather than a request per
    folder and file (ImageNet has 1.3M files). The same as the local walk: hidden names skipped at any depth,
    each folder's entries in name order (a sort by path components)."""
    import fsspec

    fs, base = fsspec.core.url_to_fs(root)
    base = base.rstrip("/")
    entries = fs.find(base, withdirs=True, detail=True)
    class_names: set[str] = set()
    files: dict[str, list[list[str]]] = {}
    for path, info in entries.items():
        parts = path[len(base):].strip("/").split("/")
        if not parts[0] or any(part.startswith(".") for part in parts):
            continue
        if info.get("type") == "directory":
            if len(parts) == 1:
                class_names.add(parts[0])
        elif len(parts) > 1:
            class_names.add(parts[0])  # a folder that only the objects under it make
            if pathlib.PurePosixPath(parts[-1]).suffix.lower() in suffixes:
                files.setdefault(parts[0], []).append(parts[1:])
    return sorted(class_names), {name: ["/".join(p) for p in sorted(files.get(name, []))] for name in class_names}


# ---------------------------------------------------------------------------------------------------------
# Captions files. Each reader returns rows (path, caption, raw label or None, line number).

Row = tuple[str, Caption, Any, int]


def jsonl_objects(path: epath.Path | str, object_pairs_hook: Any = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file; a line that is not a JSON object is
    an error naming the file and line."""
    path = epath.Path(path)
    for line_number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            entry = json.loads(line, object_pairs_hook=object_pairs_hook)
        except ValueError as error:
            raise ValueError(f"{where}: not a JSON object ({error})") from None
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(entry).__name__}")
        yield line_number, entry


def _read_jsonl(path: epath.Path, path_field: str, caption_field: str | None, label_field: str | None) -> list[Row]:
    rows: list[Row] = []
    for line_number, entry in jsonl_objects(path):
        where = f"{path}:{line_number}"
        image_path = entry.get(path_field)
        if not isinstance(image_path, str) or not image_path:
            raise ValueError(f"{where}: no {path_field!r} string (keys: {sorted(entry)})")
        caption = None if caption_field is None else _json_caption(entry.get(caption_field), where)
        label = None
        if label_field is not None:
            label = entry.get(label_field)
            if isinstance(label, bool) or not isinstance(label, (int, str)) or label == "":
                raise ValueError(f"{where}: label {label_field!r} must be an int or a class name, got {label!r}")
        rows.append((image_path, caption, label, line_number))
    return rows


def _read_text(path: epath.Path) -> str:
    """The whole file as UTF-8, without a byte-order mark if there is one."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error})") from None


def _json_caption(value: Any, where: str) -> Caption:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value) or None
    raise ValueError(f"{where}: a caption must be a string or a list of strings, got {value!r}")


def _read_csv(path: epath.Path, delimiter: str, path_field: str, caption_field: str | None,
              label_field: str | None) -> list[Row]:
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter)
    header = next(reader, None)
    if not header:
        raise ValueError(f"{path}: no header row")
    header = [h.strip() for h in header]

    def column(name: str) -> int:
        if name not in header:
            raise ValueError(f"{path}: no column {name!r} in the header {header}")
        return header.index(name)

    path_column = column(path_field)
    label_column = None if label_field is None else column(label_field)
    caption_columns: list[int] = []
    if caption_field is not None:
        numbered = re.compile(rf"{re.escape(caption_field)}([_\- ]?\d+)?")
        caption_columns = [i for i, name in enumerate(header) if numbered.fullmatch(name)]
        if not caption_columns:
            raise ValueError(f"{path}: no caption column ({caption_field!r} or {caption_field}_1, "
                             f"{caption_field}_2, ...) in the header {header}")
    rows: list[Row] = []
    for cells in reader:
        line_number = reader.line_num
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) != len(header):
            raise ValueError(f"{path}:{line_number}: {len(cells)} fields, but the header has {len(header)}")
        image_path = cells[path_column].strip()
        if not image_path:
            raise ValueError(f"{path}:{line_number}: empty {path_field!r}")
        texts = [cells[i] for i in caption_columns if cells[i].strip()]
        caption: Caption = None
        if len(caption_columns) == 1:
            caption = texts[0] if texts else None
        elif texts:
            caption = texts
        label = None
        if label_column is not None:
            label = cells[label_column].strip()
            if not label:
                raise ValueError(f"{path}:{line_number}: empty label {label_field!r}")
        rows.append((image_path, caption, label, line_number))
    return rows


def _label_ids(labels: list[Any], line_numbers: list[int], class_names: Sequence[str] | None,
               origin: str) -> tuple[np.ndarray, list[str] | None]:
    """(int32 ids, class names or None) from int labels, integer strings (CSV) or class names."""
    if all(isinstance(v, str) for v in labels) and all(re.fullmatch(r"-?\d+", v) for v in labels) \
            and not (class_names is not None and set(labels) <= set(class_names)):
        labels = [int(v) for v in labels]  # CSV cells that are all integers are ids
    odd = [(v, n) for v, n in zip(labels, line_numbers) if type(v) is not type(labels[0])]
    if odd:
        raise ValueError(f"{origin}:{odd[0][1]}: label {odd[0][0]!r} mixes with labels like {labels[0]!r} "
                         f"(line {line_numbers[0]}); use ids or class names, not both")
    names = None if class_names is None else [str(n) for n in class_names]
    if labels and isinstance(labels[0], str):
        names = names if names is not None else sorted(set(labels))
        lookup = {name: i for i, name in enumerate(names)}
        unknown = [(v, n) for v, n in zip(labels, line_numbers) if v not in lookup]
        if unknown:
            raise ValueError(f"{origin}:{unknown[0][1]}: class {unknown[0][0]!r} is not in class_names {names}")
        ids = [lookup[v] for v in labels]
    else:
        ids = labels
        bad = [(v, n) for v, n in zip(ids, line_numbers) if v < 0 or (names is not None and v >= len(names))]
        if bad:
            raise ValueError(f"{origin}:{bad[0][1]}: label {bad[0][0]} is out of range"
                             + (f" for {len(names)} class names" if names is not None else ""))
    return np.asarray(ids, dtype=np.int32), names
