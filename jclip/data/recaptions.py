"""Recaptions joined onto a dataset: one caption per example key, stored beside the data, images untouched.

Stone et al. (arXiv 2412.15396) train on dense recaptions that a vision-language model wrote for every
image. `python -m jclip.join_captions` takes such captions from any captioner as a JSONL of
`{"key": ..., "caption": ...}`, keeps those whose key is an example of the config's training source, and
writes this folder; the `joined_captions` op (`jclip.data.ops.recaptions`) then looks each example's `key`
up and writes its recaption into a caption field, for `caption_rule` to choose from.

A recaptions folder holds (texts packed as in `jclip.data.packed_texts`, memory-mapped when local):

    meta.json                  format, field, counts, the join's report, captions file, source, jclip version, date
    keys_utf8.npy     [B]      uint8   the example keys, sorted and unique, UTF-8 bytes end to end
    keys_bounds.npy   [M+1]    int64   key m is keys_utf8[bounds[m]:bounds[m+1]]
    captions_utf8.npy [C]      uint8   the recaptions, caption m belonging to key m
    captions_bounds.npy [M+1]  int64
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping
from typing import Any

from etils import epath

from jclip.data.packed_texts import PackedTexts, StoredFolder, pack_texts, sorted_row, write_folder

FORMAT = 1
#: What makes a recaptions folder (named in every error about a missing or broken one).
MAKE_COMMAND = ("python -m jclip.join_captions --config=<the training config> --captions=<captions.jsonl> "
                "--output=<folder>")
DEFAULT_FIELD = "dense_caption"


def write_recaptions(directory: str | os.PathLike, captions: Mapping[str, str], *, field: str = DEFAULT_FIELD,
                     source: Any = None, extra_meta: Mapping[str, Any] | None = None) -> epath.Path:
    """Writes a recaptions folder (see the module), local or a URL (gs://), from key -> caption; keys and captions
    must be non-empty str.

    `field` (the caption field the op writes by default) and `source` are recorded in meta.json with `extra_meta`.
    """
    directory = epath.Path(directory)
    for key, caption in captions.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"recaptions {directory}: a key must be a non-empty str, got {key!r}")
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"recaptions {directory}: the caption of key {key!r} must be a non-blank str, got {caption!r}")
    if not str(field).isidentifier():
        raise ValueError(f"recaptions {directory}: field must be an identifier, got {field!r}")
    keys = sorted(captions)
    arrays = {}
    arrays["keys_utf8"], arrays["keys_bounds"] = pack_texts(keys)
    arrays["captions_utf8"], arrays["captions_bounds"] = pack_texts(captions[key] for key in keys)
    from jclip import __version__

    meta = {
        "format": FORMAT, "field": str(field), "counts": {"keys": len(keys)}, "jclip_version": __version__,
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "source": source,
        **dict(extra_meta or {}),
    }
    return write_folder(directory, arrays, meta)


class Recaptions:
    """A recaptions folder opened for look-up by example key (local arrays memory-mapped; pickles as its path)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = epath.Path(directory)
        folder = StoredFolder(self.directory, "recaptions", MAKE_COMMAND)
        meta_path = folder.meta_path()
        try:
            self.meta = json.loads(meta_path.read_text())
            self.field = str(self.meta["field"])
            if self.meta.get("format") != FORMAT:
                raise ValueError(f"format {self.meta.get('format')!r}, expected {FORMAT}")
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"recaptions: {meta_path} is not a recaptions meta file ({type(error).__name__}: "
                             f"{error}); remake the folder with {MAKE_COMMAND}") from None
        self.keys: PackedTexts = folder.texts("keys")
        self.captions: PackedTexts = folder.texts("captions")
        if len(self.captions) != len(self.keys):
            folder.corrupt("captions_bounds.npy", f"{len(self.captions)} captions for {len(self.keys)} keys")

    def __len__(self) -> int:
        return len(self.keys)

    def caption(self, key: str) -> str | None:
        """The recaption of the example `key` (exact text), or None."""
        row = sorted_row(self.keys, key)
        return None if row is None else self.captions[row]

    def __getstate__(self) -> dict[str, Any]:  # Grain worker processes re-open the memory maps.
        return {"directory": self.directory}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["directory"])
