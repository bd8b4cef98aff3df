"""Any prepared TFDS dataset, by name, as a random-access source of jclip raw examples (no TensorFlow).

`TfdsSource("coco_captions", "train[:90%]", data_dir=..., caption_field="captions/text")` reads the
dataset's ArrayRecord shards through `builder.as_data_source` and returns, per index, jclip's canonical raw
example:

    {"image": encoded bytes (Image features are not decoded here) or a uint8 [H, W, C] array (tensor
              features), or None;
     "caption": str, or list of str for a Sequence / vector field (undecodable UTF-8 stays bytes so that
              preprocessing counts it), or None;
     "label": int (only when `label_field` is set);
     "key": "name:split:index", for messages;
     and one entry per `extra_fields` key (e.g. the embedded dataset's `negative_captions` for evaluators):
       text as str (a list of str for a Sequence or string tensor), encoded images as bytes, other
       features as numpy arrays.}

The dataset is found from its files (`dataset_info.json`, `features.json`), so its builder code is not
needed and never run, except with `download=True` for builders that make their data locally (see
`LOCAL_BUILDERS`). Only ArrayRecord, TFDS's random-access format, is read: Grain shuffles globally by index.
A dataset that is absent or stored in another format fails at construction with a message that says how to
prepare it. Construction reads metadata only; records are read per `__getitem__`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import importlib
import logging
import operator
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import file_adapters, naming, registered
from tensorflow_datasets.core.utils import file_utils

from jclip.paths import is_url, upload_folder

#: Builders that make their data without network, by name -> the module whose import registers them.
#: A builder class can also declare `BUILDS_WITHOUT_NETWORK = True`. Only these may use `download=True`.
LOCAL_BUILDERS: dict[str, str] = {"jclip_scenes": "jclip.data.sources.embedded"}

_ARRAY_RECORD = file_adapters.FileFormat.ARRAY_RECORD


@dataclasses.dataclass(frozen=True)
class _Field:
    """A '/'-separated field path resolved against the dataset's features."""

    path: str
    keys: tuple[str, ...]  # keys into the decoded example (nested dicts)
    feature: Any  # the leaf FeatureConnector
    in_sequence: bool  # the leaf sits inside a tfds Sequence: its value is a list

    def get(self, example: dict[str, Any]) -> Any:
        value = example
        for key in self.keys:
            value = value[key]
        return value


class TfdsSource:
    """Random access over one split (TFDS slicing allowed) of a prepared TFDS dataset, as raw examples.

    Args:
      name: the dataset, optionally with config and version: `cifar10`, `coco_captions/2014`,
        `jclip_scenes/small:1.0.0`.
      split: a split with TFDS slicing: `train`, `train[:90%]`, `train[90%:]`, `test[:1000]`.
      data_dir: where the prepared dataset lives (None: TFDS's default, `$TFDS_DATA_DIR` or
        `~/tensorflow_datasets`).
      image_field, caption_field, label_field: '/'-separated paths into the features; a key that itself
        contains '/' (coco's `image/id`) is matched whole. A field inside a Sequence gives a list
        (`captions/text` of coco_captions). `caption_field=None` gives `caption=None`.
      extra_fields: output key -> field path, for further fields an evaluator needs (resolved the same
        way); a key may not be one of the canonical `image`, `caption`, `label`, `key`.
      manual_dir: where manually downloaded files are (datasets like imagenet2012); used in messages and
        passed to the build of a local builder.
      download: build the dataset if it is not prepared; only for builders that need no network.
    """

    def __init__(
        self,
        name: str,
        split: str,
        *,
        data_dir: str | None,
        image_field: str = "image",
        caption_field: str | None = "caption",
        label_field: str | None = None,
        manual_dir: str | None = None,
        download: bool = False,
        extra_fields: Mapping[str, str] | None = None,
    ):
        self.name = name
        self.split = split
        self.data_dir = data_dir
        self.manual_dir = manual_dir
        builder = _prepared_builder(name, data_dir, manual_dir, download)
        self.builder_dir = str(builder.data_dir)
        features = builder.info.features
        self._image = _image_field(features, image_field, name)
        self._caption = None if caption_field is None else _caption_field(features, caption_field, name)
        self._label = None if label_field is None else _label_field(features, label_field, name)
        self._extras = _extra_fields(features, extra_fields or {}, name)
        self._decoders = _skip_image_decoding(features)
        self._source = self._open(builder)
        self._length = len(self._source)

    def _open(self, builder: tfds.core.DatasetBuilder) -> Any:
        try:
            return builder.as_data_source(self.split, decoders=self._decoders, file_format=_ARRAY_RECORD)
        except (ValueError, KeyError) as error:
            raise ValueError(
                f"TFDS dataset {self.name!r} at {self.builder_dir}: cannot read split {self.split!r} ({error}); "
                f"its splits are {sorted(builder.info.splits.keys())}, sliced like 'train[:90%]' or 'train[10:]'."
            ) from error

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = operator.index(index)
        if not -self._length <= index < self._length:
            raise IndexError(f"index {index} out of range for {self!r}")
        index %= self._length
        if self._source is None:  # unpickled in a worker: reopen from the known directory
            self._source = self._open(tfds.builder_from_directory(self.builder_dir))
        record = self._source[index]
        example = {
            "image": _image_value(self._image.get(record)),
            "caption": None if self._caption is None else _text_value(self._caption.get(record)),
            "key": f"{self.name}:{self.split}:{index}",
        }
        if self._label is not None:
            example["label"] = int(np.asarray(self._label.get(record)).item())
        for key, field in self._extras.items():
            example[key] = _extra_value(field, field.get(record))
        return example

    def class_names(self) -> list[str] | None:
        """The label feature's class names when it is a ClassLabel with names (zero-shot prompts), else None."""
        if self._label is None or not isinstance(self._label.feature, tfds.features.ClassLabel):
            return None
        return list(self._label.feature.names)  # ClassLabel(num_classes=n) names its classes "0".."n-1"

    def __getstate__(self) -> dict[str, Any]:
        """Pickles the settings and resolved fields only; the reader reopens lazily in the new process."""
        state = dict(self.__dict__)
        state["_source"] = None
        return state

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, {self.split!r}, {self._length} examples, at {self.builder_dir})"


# ---------------------------------------------------------------------------------------------------------
# Finding (or, for local builders, making) the prepared dataset.


def check_prepared(name: str, data_dir: str | None, manual_dir: str | None = None) -> None:
    """FileNotFoundError saying how to prepare TFDS dataset `name` unless it is prepared (as ArrayRecord: else a
    ValueError) in `data_dir`; reads only its metadata, so that a run can check its data before it starts."""
    _prepared_builder(name, data_dir, manual_dir, download=False)


def _prepared_builder(name: str, data_dir: str | None, manual_dir: str | None,
                      download: bool) -> tfds.core.DatasetBuilder:
    """The read-only builder of the prepared dataset, in ArrayRecord; clear errors otherwise."""
    base = naming.parse_builder_name_kwargs(name)[0].name
    if base in LOCAL_BUILDERS:
        importlib.import_module(LOCAL_BUILDERS[base])  # registers the builder (default config, download)
    try:
        builder = tfds.core.read_only_builder.builder_from_files(name, data_dir=data_dir)
    except registered.DatasetNotFoundError:
        builder = None
    if builder is None and download:
        builder = _build_locally(name, base, data_dir, manual_dir)
    if builder is None:
        raise FileNotFoundError(_not_prepared_message(name, base, data_dir, manual_dir))
    formats = builder.info.available_file_formats()
    if _ARRAY_RECORD not in formats:
        found = ", ".join(sorted(f.value for f in formats)) or "unknown"
        raise ValueError(
            f"TFDS dataset {name!r} is prepared at {builder.data_dir} in format {found}, but jclip reads only "
            f"array_record (random access, which Grain's global shuffle needs). Convert it in place with "
            f"`tfds convert_format --dataset_version_dir={builder.data_dir} --out_file_format=array_record`, "
            f"or rebuild it with `tfds build {name} --file_format=array_record --data_dir=<another dir>`."
        )
    return builder


def _builder_class(base: str) -> type[tfds.core.DatasetBuilder] | None:
    """The registered builder class of `base`, or None (unknown name, or code that fails to import)."""
    try:
        return tfds.builder_cls(base)
    except Exception:  # noqa: BLE001 - any failure only means "no builder code to consult"
        return None


def _builds_locally(base: str, cls: type[tfds.core.DatasetBuilder] | None) -> bool:
    return base in LOCAL_BUILDERS or bool(getattr(cls, "BUILDS_WITHOUT_NETWORK", False))


def _build_locally(name: str, base: str, data_dir: str | None,
                   manual_dir: str | None) -> tfds.core.DatasetBuilder:
    """Builds a local builder as ArrayRecord once (a file lock serialises processes), then reopens it."""
    cls = _builder_class(base)
    if cls is None or not _builds_locally(base, cls):
        raise ValueError(
            f"download=True builds only datasets made locally without network ({sorted(LOCAL_BUILDERS)} or "
            f"builders declaring BUILDS_WITHOUT_NETWORK = True); {name!r} is not one.\n"
            + _not_prepared_message(name, base, data_dir, manual_dir)
        )
    if data_dir is not None and is_url(data_dir):
        return _build_and_upload(name, data_dir, manual_dir)
    builder = tfds.builder(name, data_dir=data_dir)
    config_dir = epath.Path(builder.data_dir).parent
    config_dir.mkdir(parents=True, exist_ok=True)
    with open(config_dir / ".build.lock", "w") as lock:  # the same lock as jclip.data.sources.embedded's builds
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not builder.is_prepared():
                logging.info("%s: building into %s (download=True, local builder)", name, builder.data_dir)
                builder.download_and_prepare(
                    file_format=_ARRAY_RECORD,
                    download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
                )
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return tfds.builder_from_directory(builder.data_dir)


def _build_and_upload(name: str, data_dir: str, manual_dir: str | None) -> tfds.core.DatasetBuilder:
    """Builds a local builder in a local temporary data dir (ArrayRecord's writer writes local files only), then
    copies it to the URL `data_dir`, dataset_info.json last, so that a reader never opens a half-copied dataset.
    Processes that start together each build and copy the same files (no lock spans hosts); the result is one
    dataset."""
    with tempfile.TemporaryDirectory(prefix="jclip-tfds-") as local_dir:
        builder = tfds.builder(name, data_dir=local_dir)
        logging.info("%s: building in %s to copy to %s (download=True, local builder)", name, local_dir, data_dir)
        builder.download_and_prepare(file_format=_ARRAY_RECORD,
                                     download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
        version_dir = os.path.relpath(os.fspath(builder.data_dir), local_dir)
        upload_folder(os.path.join(local_dir, version_dir), epath.Path(data_dir) / version_dir,
                      last=["dataset_info.json"])
        return tfds.builder_from_directory(epath.Path(data_dir) / version_dir)


def _not_prepared_message(name: str, base: str, data_dir: str | None, manual_dir: str | None) -> str:
    """What was searched, what was found (nothing), and how to prepare the dataset."""
    searched = [str(d) for d in file_utils.list_data_dirs(given_data_dir=data_dir)]
    target = data_dir or searched[0]
    lines = [
        f"TFDS dataset {name!r} is not prepared in {', '.join(searched)} (format found: none). "
        f"jclip reads prepared ArrayRecord datasets without TensorFlow and does not download by default."
    ]
    cls = _builder_class(base)
    if cls is None:
        lines.append(
            f"No TFDS builder named {base!r} is registered either: check the spelling (a custom builder's "
            f"module must be imported to register it), or point data_dir at the folder holding {base}/."
        )
    elif _builds_locally(base, cls):
        lines.append(f"{base} is made locally without network: pass download=True to build it in {target}.")
    elif cls.MANUAL_DOWNLOAD_INSTRUCTIONS:
        manual = manual_dir or str(epath.Path(target) / "downloads" / "manual")
        instructions = " ".join(str(cls.MANUAL_DOWNLOAD_INSTRUCTIONS).split())
        lines.append(
            f"{base} needs files downloaded by hand: {instructions} Put them in {manual} (manual_dir), then "
            f"prepare it with `tfds build {name} --file_format=array_record --data_dir={target} "
            f"--manual_dir={manual}` (in an environment where its builder runs, e.g. with TensorFlow)."
        )
    else:
        lines.append(
            f"Prepare it with `tfds build {name} --file_format=array_record --data_dir={target}` (where network "
            f"is available and its builder runs, e.g. with TensorFlow), then copy the data dir here."
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Fields: resolution against the features, and conversion of decoded values.


def _field_paths(feature: Any, prefix: str = "") -> list[str]:
    """All leaf paths of a feature tree (for error messages)."""
    if isinstance(feature, tfds.features.Sequence) and not isinstance(feature, tfds.features.Video):
        return _field_paths(feature.feature, prefix)
    if isinstance(feature, tfds.features.FeaturesDict):
        return [p for key in feature.keys() for p in _field_paths(feature[key], f"{prefix}{key}/")]
    return [prefix.rstrip("/")]


def _resolve(features: tfds.features.FeaturesDict, path: str, dataset: str) -> _Field:
    """Walks `path` through FeaturesDicts and Sequences; at each level the longest matching key wins."""
    feature: Any = features
    keys: list[str] = []
    in_sequence = False
    remaining = path.strip("/")
    while True:
        if isinstance(feature, tfds.features.Sequence) and not isinstance(feature, tfds.features.Video):
            in_sequence = True
            feature = feature.feature
            continue
        if not remaining:
            break
        candidates = []
        if isinstance(feature, tfds.features.FeaturesDict):
            candidates = [k for k in feature.keys() if remaining == k or remaining.startswith(k + "/")]
        if not candidates:
            raise ValueError(
                f"TFDS dataset {dataset!r} has no field {path!r}; its fields are {_field_paths(features)}."
            )
        key = max(candidates, key=len)
        keys.append(key)
        feature = feature[key]
        remaining = remaining[len(key) + 1:]
    if isinstance(feature, tfds.features.FeaturesDict):
        raise ValueError(f"field {path!r} of TFDS dataset {dataset!r} is a dict of {list(feature.keys())}, "
                         f"not a leaf: name one of its fields.")
    return _Field(path, tuple(keys), feature, in_sequence)


def _kind(feature: Any) -> str:
    return np.dtype(feature.np_dtype).kind


def _image_field(features: tfds.features.FeaturesDict, path: str, dataset: str) -> _Field:
    field = _resolve(features, path, dataset)
    is_image = isinstance(field.feature, tfds.features.Image)
    is_array = _kind(field.feature) == "u" and len(field.feature.shape) == 3
    if field.in_sequence or not (is_image or is_array):
        raise ValueError(f"image field {path!r} of TFDS dataset {dataset!r} is {field.feature!r}"
                         f"{' inside a Sequence' if field.in_sequence else ''}; expected one Image or uint8 [H, W, C].")
    return field


def _caption_field(features: tfds.features.FeaturesDict, path: str, dataset: str) -> _Field:
    field = _resolve(features, path, dataset)
    if _kind(field.feature) not in "OSU":
        raise ValueError(f"caption field {path!r} of TFDS dataset {dataset!r} is {field.feature!r}, not text.")
    return field


def _label_field(features: tfds.features.FeaturesDict, path: str, dataset: str) -> _Field:
    field = _resolve(features, path, dataset)
    if field.in_sequence or _kind(field.feature) not in "iu" or tuple(field.feature.shape) != ():
        raise ValueError(f"label field {path!r} of TFDS dataset {dataset!r} is {field.feature!r}"
                         f"{' inside a Sequence' if field.in_sequence else ''}; expected one integer or ClassLabel.")
    return field


_CANONICAL_KEYS = ("image", "caption", "label", "key")


def _extra_fields(features: tfds.features.FeaturesDict, fields: Mapping[str, str], dataset: str) -> dict[str, _Field]:
    """Output key -> resolved field; the canonical keys are refused (they would be overwritten)."""
    taken = sorted(set(fields) & set(_CANONICAL_KEYS))
    if taken:
        raise ValueError(f"extra_fields keys {taken} of TFDS dataset {dataset!r} clash with the raw example's "
                         f"own keys {list(_CANONICAL_KEYS)}; name them otherwise")
    return {str(key): _resolve(features, path, dataset) for key, path in fields.items()}


def _skip_image_decoding(feature: Any) -> dict[str, Any]:
    """Decoders that keep every uint8 Image (outside Sequences) encoded: decoding is preprocessing's job."""
    decoders: dict[str, Any] = {}
    for key in feature.keys():
        child = feature[key]
        if isinstance(child, tfds.features.Image) and child.np_dtype == np.uint8:
            decoders[key] = tfds.decode.SkipDecoding()
        elif isinstance(child, tfds.features.FeaturesDict):
            nested = _skip_image_decoding(child)
            if nested:
                decoders[key] = nested
    return decoders


def _image_value(value: Any) -> bytes | np.ndarray | None:
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value) or None
    return np.asarray(value)


def _text_value(value: Any) -> str | bytes | list[str | bytes] | None:
    """bytes -> str (UTF-8; undecodable bytes stay bytes); sequences -> list; empty -> None."""
    if isinstance(value, np.ndarray):
        value = value.item() if value.ndim == 0 else value.reshape(-1).tolist()
    if isinstance(value, (list, tuple)):
        texts = [_text_value(v) for v in value]
        return texts or None
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(value)
    return None if value is None else str(value)


def _extra_value(field: _Field, value: Any) -> Any:
    """Text -> str (nested lists of str for sequences and string arrays); encoded images -> bytes; else arrays."""
    if _kind(field.feature) in "OSU":
        return _texts(value)
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value)
    return np.asarray(value)


def _texts(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        value = value.item() if value.ndim == 0 else value.tolist()
    if isinstance(value, (list, tuple)):
        return [_texts(v) for v in value]
    return _text_value(value)
