"""The `guidance` op: precomputed guidance features carried in the training batch (SoftCLIP `guidance="batch"`).

SoftCLIP softens its targets with intra-modal similarities from a guidance source (shared/METHODS.md
section 2); one source is features computed once, offline, by another model, rather than by a frozen
teacher every step. A guidance folder holds NumPy files:

    keys.npy    [M] str      the `key` of each training example, as its source names it
    image.npy   [M, d_i]     image guidance features (optional if text.npy is there)
    text.npy    [M, d_t]     text guidance features (optional if image.npy is there)

The op `guidance(dir=DIR)` gives each training example its key's rows as `guidance_image_features` /
`guidance_text_features`; the loss normalises them. `data.guidance_features=DIR` is a shorthand that appends
that op to `data.preprocess`. Local arrays are memory-mapped, so a large dataset's features are not copied into
every process; a folder in a bucket (gs://) is read whole by each process that opens it. A training example
whose key is not in the file stops the run with the key named: guidance is never silently missing for part of a
batch. `python -m jclip.write_guidance` writes the folder with a finished jclip run's embeddings;
`write_guidance_features` writes it from any arrays.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from jclip.data.ops.registry import Op, OpContext, register_op
from jclip.data.robust import example_key
from jclip.paths import load_array, save_array

#: modality -> the batch key the loss terms read (jclip.losses.soft.BATCH_GUIDANCE_KEYS).
BATCH_KEYS = {"image": "guidance_image_features", "text": "guidance_text_features"}
KEYS_FILE = "keys.npy"


class MissingGuidanceError(KeyError):
    """A training example without guidance features (its key is not in the features folder)."""

    def __str__(self) -> str:
        return str(self.args[0])


def write_guidance_features(
    directory: str | os.PathLike, keys: Sequence[str], *, image: np.ndarray | None = None,
    text: np.ndarray | None = None,
) -> epath.Path:
    """Writes a guidance folder (see the module), local or a URL (gs://); rows of `image`/`text` follow `keys`."""
    directory = epath.Path(directory)
    keys = np.asarray([str(key) for key in keys])
    arrays = {name: np.asarray(value) for name, value in (("image", image), ("text", text)) if value is not None}
    _check_arrays(keys, arrays, str(directory))
    directory.mkdir(parents=True, exist_ok=True)
    save_array(directory / KEYS_FILE, keys)
    for name, value in arrays.items():
        save_array(directory / f"{name}.npy", value)
    return directory


def _check_arrays(keys: np.ndarray, arrays: Mapping[str, np.ndarray], where: str) -> None:
    if not arrays:
        raise ValueError(f"guidance features {where}: give image and/or text features")
    if keys.ndim != 1:
        raise ValueError(f"guidance features {where}: keys must be 1-D, got shape {keys.shape}")
    for name, value in arrays.items():
        if value.ndim != 2 or value.shape[0] != len(keys):
            raise ValueError(
                f"guidance features {where}: {name} must be [{len(keys)}, dim] (one row per key), got {value.shape}"
            )
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"guidance features {where}: {name} must be floating point, got {value.dtype}")
    unique, counts = np.unique(keys, return_counts=True)
    if len(unique) != len(keys):
        raise ValueError(f"guidance features {where}: duplicate keys, e.g. {unique[counts > 1][:3].tolist()}")


class GuidanceFeatures:
    """A guidance folder opened for look-up by example key (local arrays memory-mapped; a URL's read whole)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = epath.Path(directory)
        if not (self.directory / KEYS_FILE).is_file():
            raise FileNotFoundError(f"data.guidance_features: no {KEYS_FILE} in {self.directory}")
        keys = load_array(self.directory / KEYS_FILE)
        self.arrays = {
            name: load_array(self.directory / f"{name}.npy", mmap=True)
            for name in BATCH_KEYS
            if (self.directory / f"{name}.npy").is_file()
        }
        _check_arrays(keys, self.arrays, str(self.directory))
        self.rows = {str(key): row for row, key in enumerate(keys.tolist())}

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.arrays)

    def __len__(self) -> int:
        return len(self.rows)

    def lookup(self, key: str | None) -> dict[str, np.ndarray]:
        """The batch fields of one example, float32."""
        row = self.rows.get(key) if key is not None else None
        if row is None:
            raise MissingGuidanceError(
                f"training example {key!r} has no guidance features in {self.directory} "
                f"({len(self.rows)} keys, e.g. {next(iter(self.rows))!r}); write them for every training "
                f"example (python -m jclip.write_guidance) or unset data.guidance_features"
            )
        return {BATCH_KEYS[name]: np.asarray(array[row], np.float32) for name, array in self.arrays.items()}

    def __getstate__(self) -> dict[str, Any]:  # Grain worker processes re-open the memory maps.
        return {"directory": self.directory}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["directory"])


@register_op("guidance")
class Guidance(Op):
    """The example's guidance rows by its key: `guidance_image_features` / `guidance_text_features` (float32).

    `modalities` says which the folder must hold (and so which fields the op writes, known before anything
    is opened); the folder is opened on first use, or by `prepare()` at start-up.
    """

    def __init__(self, context: OpContext, dir: str, modalities: tuple[str, ...] = ("image", "text"),
                 key_field: str = "key"):
        modalities = (modalities,) if isinstance(modalities, str) else tuple(modalities)
        unknown = [m for m in modalities if m not in BATCH_KEYS]
        if not modalities or unknown:
            raise ValueError(f"modalities must be some of {tuple(BATCH_KEYS)}, got {modalities!r}")
        self.directory = str(dir)
        self.modalities = modalities
        self.key_field = key_field
        self.reads = (key_field,)
        self.writes = tuple(BATCH_KEYS[m] for m in modalities)
        self._features: GuidanceFeatures | None = None

    def prepare(self) -> GuidanceFeatures:
        """Opens the folder (once), checking it holds every modality the op writes."""
        if self._features is None:
            features = GuidanceFeatures(self.directory)
            missing = [m for m in self.modalities if m not in features.modalities]
            if missing:
                raise ValueError(
                    f"guidance features {self.directory} have no {', '.join(f'{m}.npy' for m in missing)}; write "
                    f"them, or name what there is in data.preprocess: "
                    f"guidance(dir={self.directory!r}, modalities={features.modalities!r})")
            self._features = features
        return self._features

    def __call__(self, example: dict[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
        rows = self.prepare().lookup(example_key(example, self.key_field))
        return {**example, **{field: rows[field] for field in self.writes}}

    def __getstate__(self) -> dict[str, Any]:  # Grain worker processes re-open the memory maps.
        return {**self.__dict__, "_features": None}
