"""Compositional-understanding benchmarks as (image, true caption, false captions) items, and their scoring.

Readers turn a benchmark's files into `CompositionalItem`s; `CompositionalImages` serves each distinct
(image, crop) once, so a model embeds every image a single time however many items share it; and
`compositional_accuracy` counts an item right when its true caption outscores every false one.

Layouts read (each reader's docstring says which file shape it follows):
  * SugarCrepe (Hsieh et al. 2023): one `<category>.json` per perturbation type, images from COCO val2017.
  * ARO VG-Relation / VG-Attribution (Yuksekgonul et al. 2023, "When and why vision-language models behave
    like bags-of-words"): a JSON list with a Visual Genome image path and a bounding box to crop to.
  * "pairs": our own JSON-lines layout for anything else (e.g. precomputed COCO-Order negatives).

Malformed input fails with the file and the entry (or line) named: an evaluation that silently drops
or mis-reads examples reports a number for a different benchmark.
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from jclip.data.sources import folder

PathLike = str | os.PathLike

SUGARCREPE_CATEGORIES = ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj")
ARO_KINDS = ("relation", "attribution")
BBox = tuple[float, float, float, float]


@dataclasses.dataclass(frozen=True)
class CompositionalItem:
    """One test case: the image (optionally a crop of it), its true caption and one or more false ones."""

    image: str  # path relative to the image root (or absolute)
    positive: str
    negatives: tuple[str, ...]
    category: str  # e.g. "replace_att", or an ARO relation name
    bbox: BBox | None = None  # (x, y, w, h) in pixels; ARO VG-R/VG-A crop to it


# ----------------------------------------------------------------------------------------------------------
# Validation helpers: every message starts with `where` (the file, and the entry or line).


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: a repeated key would otherwise silently keep only its last value."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _load_json(path: PathLike) -> Any:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: annotation file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, object_pairs_hook=_reject_duplicate_keys)
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: not valid JSON: {error}") from error


def _require(entry: Any, keys: Sequence[str], where: str) -> None:
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    missing = [key for key in keys if key not in entry]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")


def _text(value: Any, name: str, where: str) -> str:
    """A non-empty string (captions, paths, category names)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: {name} must be a non-empty string, got {value!r}")
    return value


def _bbox(values: Sequence[Any], where: str) -> BBox:
    """(x, y, w, h) as floats: finite numbers with a positive width and height."""
    if len(values) != 4:
        raise ValueError(f"{where}: bbox must have 4 numbers (x, y, w, h), got {list(values)!r}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where}: bbox values must be finite numbers, got {list(values)!r}")
    x, y, w, h = (float(v) for v in values)
    if w <= 0 or h <= 0:
        raise ValueError(f"{where}: bbox width and height must be positive, got {list(values)!r}")
    return (x, y, w, h)


# ----------------------------------------------------------------------------------------------------------
# Readers.


def read_sugarcrepe(directory: PathLike, categories: Sequence[str] | None = None) -> list[CompositionalItem]:
    """SugarCrepe: `<directory>/<category>.json`, each `{id: {"filename", "caption", "negative_caption"}}`.

    `filename` is a COCO val2017 file name, so the image root is that folder. `categories=None` reads every
    `*.json` in the directory (sorted by name); otherwise exactly the named ones, in the order given
    (the official seven are `SUGARCREPE_CATEGORIES`). Items keep file order, then the ids' order in the file.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: SugarCrepe directory not found")
    if categories is None:
        names = sorted(name[: -len(".json")] for name in os.listdir(directory) if name.endswith(".json"))
        if not names:
            raise FileNotFoundError(f"{directory}: no SugarCrepe <category>.json files found")
    else:
        names = [categories] if isinstance(categories, str) else list(categories)
        if not names:
            raise ValueError("read_sugarcrepe: categories is empty (pass None to read every file)")
    items: list[CompositionalItem] = []
    for category in names:
        path = os.path.join(directory, f"{category}.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: SugarCrepe category file not found (category {category!r})")
        data = _load_json(path)
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: expected a JSON object of {{id: entry}}, got {type(data).__name__}")
        for key, entry in data.items():
            where = f"{path}: entry {key!r}"
            _require(entry, ("filename", "caption", "negative_caption"), where)
            items.append(CompositionalItem(
                image=_text(entry["filename"], "filename", where),
                positive=_text(entry["caption"], "caption", where),
                negatives=(_text(entry["negative_caption"], "negative_caption", where),),
                category=category,
            ))
    return items


_ARO_COMMON_KEYS = ("image_path", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "true_caption", "false_caption")


def read_aro(annotation_file: PathLike, kind: str) -> list[CompositionalItem]:
    """ARO VG-Relation (`visual_genome_relation.json`) or VG-Attribution (`visual_genome_attribution.json`).

    The file is a JSON list of `{"image_path", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "true_caption",
    "false_caption"}` plus `relation_name` (kind "relation") or a 2-element `attributes` list (kind
    "attribution"); `image_path` is relative to ARO's `images/` folder, the image root to use. The category
    is the relation name, or `"<a>_<b>"` of the two attributes, as ARO's own evaluation groups them.
    """
    if kind not in ARO_KINDS:
        raise ValueError(f"read_aro: unknown kind {kind!r}; known: {list(ARO_KINDS)}")
    path = os.fspath(annotation_file)
    data = _load_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of ARO entries, got {type(data).__name__}")
    extra_key = "relation_name" if kind == "relation" else "attributes"
    items: list[CompositionalItem] = []
    for index, entry in enumerate(data):
        where = f"{path}: entry {index}"
        _require(entry, (*_ARO_COMMON_KEYS, extra_key), where)
        if kind == "relation":
            category = _text(entry["relation_name"], "relation_name", where)
        else:
            attributes = entry["attributes"]
            if not isinstance(attributes, list) or len(attributes) != 2:
                raise ValueError(f"{where}: attributes must be a list of 2 strings, got {attributes!r}")
            category = "_".join(_text(a, "each attribute", where) for a in attributes)
        items.append(CompositionalItem(
            image=_text(entry["image_path"], "image_path", where),
            positive=_text(entry["true_caption"], "true_caption", where),
            negatives=(_text(entry["false_caption"], "false_caption", where),),
            category=category,
            bbox=_bbox([entry[k] for k in ("bbox_x", "bbox_y", "bbox_w", "bbox_h")], where),
        ))
    return items


def read_pairs_jsonl(path: PathLike) -> list[CompositionalItem]:
    """Our generic layout: one JSON object per line, blank lines skipped.

    `{"image": path, "positive": str, "negatives": [str, ...] | "negative": str,
      "category": str (default "all"), "bbox": [x, y, w, h] (optional)}`; other keys are ignored.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: pairs file not found")
    items: list[CompositionalItem] = []
    for line_number, entry in folder.jsonl_objects(path, object_pairs_hook=_reject_duplicate_keys):
        where = f"{path}:{line_number}"
        _require(entry, ("image", "positive"), where)
        if ("negatives" in entry) == ("negative" in entry):
            raise ValueError(f"{where}: needs exactly one of 'negatives' (a list) or 'negative' (a string)")
        if "negative" in entry:
            negatives = (_text(entry["negative"], "negative", where),)
        else:
            listed = entry["negatives"]
            if not isinstance(listed, list) or not listed:
                raise ValueError(f"{where}: negatives must be a non-empty list of strings, got {listed!r}")
            negatives = tuple(_text(n, "each negative", where) for n in listed)
        bbox = entry.get("bbox")
        if bbox is not None:
            if not isinstance(bbox, list):
                raise ValueError(f"{where}: bbox must be a list [x, y, w, h], got {bbox!r}")
            bbox = _bbox(bbox, where)
        items.append(CompositionalItem(
            image=_text(entry["image"], "image", where),
            positive=_text(entry["positive"], "positive", where),
            negatives=negatives,
            category=_text(entry.get("category", "all"), "category", where),
            bbox=bbox,
        ))
    return items


READERS: dict[str, Callable[..., list[CompositionalItem]]] = {
    "sugarcrepe": read_sugarcrepe,
    "aro_relation": lambda path, **options: read_aro(path, "relation", **options),
    "aro_attribution": lambda path, **options: read_aro(path, "attribution", **options),
    "pairs": read_pairs_jsonl,
}


def read_compositional(format: str, path: PathLike, **options: Any) -> list[CompositionalItem]:
    """Items of a benchmark by layout name (a key of `READERS`); `options` go to that reader."""
    if format not in READERS:
        raise ValueError(f"unknown compositional format {format!r}; known: {list(READERS)}")
    return READERS[format](path, **options)


# ----------------------------------------------------------------------------------------------------------
# Images.


def _number(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


class CompositionalImages:
    """Random access over the distinct (image, bbox) pairs of `items`, in first-appearance order.

    Example `i` is `{"image": bytes | PIL.Image, "key": str}`: the file's bytes when there is no bbox, else
    the RGB image cropped to (x, y, x + w, y + h) as ARO's loader does with PIL. `item_image_index[j]` is
    item j's example. `image_root=None` means paths are absolute or relative to the working directory.
    Holds only paths, so it pickles into data-loading workers.
    """

    def __init__(self, items: Sequence[CompositionalItem], image_root: PathLike | None):
        self.image_root = None if image_root is None else os.fspath(image_root)
        index_of: dict[tuple[str, BBox | None], int] = {}
        item_index = []
        for item in items:
            item_index.append(index_of.setdefault((item.image, item.bbox), len(index_of)))
        self._entries: list[tuple[str, BBox | None]] = list(index_of)
        self.item_image_index: np.ndarray = np.asarray(item_index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._entries)

    def path(self, index: int) -> str:
        image, _ = self._entries[index]
        if self.image_root is None or os.path.isabs(image):
            return image
        return os.path.join(self.image_root, image)

    def key(self, index: int) -> str:
        image, bbox = self._entries[index]
        return image if bbox is None else f"{image}#bbox={','.join(_number(v) for v in bbox)}"

    def check_files(self) -> None:
        """Raise FileNotFoundError before any encoding if some image is missing (names a few and the root)."""
        missing = sorted({self.path(i) for i in range(len(self)) if not os.path.isfile(self.path(i))})
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise FileNotFoundError(
                f"{len(missing)} image file(s) missing under image root {self.image_root!r}: {shown}")

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = operator.index(index)
        if not 0 <= index < len(self):
            raise IndexError(f"image index {index} out of range for {len(self)} distinct images")
        path = self.path(index)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image file {path!r} not found (image root {self.image_root!r})")
        _, bbox = self._entries[index]
        if bbox is None:
            with open(path, "rb") as f:
                image: Any = f.read()
        else:
            x, y, w, h = bbox
            with Image.open(path) as opened:
                image = opened.convert("RGB").crop((x, y, x + w, y + h))
        return {"image": image, "key": self.key(index)}


# ----------------------------------------------------------------------------------------------------------
# Scoring.


def _best_negatives(negative_scores: np.ndarray | Sequence[np.ndarray], count: int) -> np.ndarray:
    """Each item's highest negative score; a 2-D array may pad short rows with -inf."""
    if isinstance(negative_scores, np.ndarray):
        scores = negative_scores.astype(np.float64)
        if scores.ndim == 1:
            scores = scores[:, None]  # one negative per item
        if scores.ndim != 2 or scores.shape[0] != count:
            raise ValueError(f"negative_scores has shape {negative_scores.shape}; expected [{count}, K] or [{count}]")
        rows = list(scores)
    else:
        if len(negative_scores) != count:
            raise ValueError(f"{len(negative_scores)} negative score rows for {count} positive scores")
        rows = [np.atleast_1d(np.asarray(row, np.float64)) for row in negative_scores]
    best = np.empty(count)
    for i, row in enumerate(rows):
        if row.ndim != 1:
            raise ValueError(f"item {i}: negative scores must be 1-D, got shape {row.shape}")
        if np.isnan(row).any():
            raise ValueError(f"item {i}: NaN negative score")
        real = row[row != -np.inf]
        if real.size == 0:
            raise ValueError(f"item {i}: no negative scores (only -inf padding)")
        best[i] = real.max()
    return best


def compositional_accuracy(
    positive_scores: np.ndarray,
    negative_scores: np.ndarray | Sequence[np.ndarray],
    categories: Sequence[str],
    min_count: int = 0,
) -> dict[str, float]:
    """Share of items whose true caption scores strictly above every false one; ties count as wrong.

    (ARO takes the argmax over [false, true], which picks the false caption on a tie.) `negative_scores` is a
    list of per-item 1-D arrays, or a 2-D [items, K] array padded with -inf. Returns `accuracy` (micro, all
    items), `accuracy/<category>` for categories with at least `min_count` items, `accuracy_macro` (their
    mean; NaN when none qualifies) and `count/<category>` for every category.
    """
    positive = np.asarray(positive_scores, np.float64)
    if positive.ndim != 1 or positive.size == 0:
        raise ValueError(f"positive_scores must be a non-empty 1-D array, got shape {positive.shape}")
    if np.isnan(positive).any():
        raise ValueError("NaN positive score")
    if isinstance(categories, str) or len(categories) != positive.size:
        raise ValueError(f"need one category per item ({positive.size}), got {categories!r:.80}")
    correct = positive > _best_negatives(negative_scores, positive.size)
    labels = np.asarray(list(categories), dtype=object)
    out: dict[str, float] = {"accuracy": float(correct.mean())}
    reported = []
    for category in sorted(set(categories)):
        mask = labels == category
        count = int(mask.sum())
        out[f"count/{category}"] = float(count)
        if count >= min_count:
            out[f"accuracy/{category}"] = float(correct[mask].mean())
            reported.append(out[f"accuracy/{category}"])
    out["accuracy_macro"] = float(np.mean(reported)) if reported else float("nan")
    return out
