"""The `joined_captions` op: each example's recaption, looked up by its key in a recaptions folder.

Stone et al. (arXiv 2412.15396) train on dense recaptions. `python -m jclip.join_captions` stores captions
from any captioner beside the data, keyed by example key (`jclip.data.recaptions`); this op writes the
example's recaption into `field` (default `dense_caption`), where `caption_rule` chooses between it and the
alt-text. `data.recaptions=DIR` is a shorthand that inserts it before the caption choice.

An example whose key has no recaption is skipped and counted as `missing_recaption` (never a silent
fall-back to its alt-text). With `missing='none'` the op writes None instead and leaves the decision to the
caption rule: `short`, or a `mixed` draw of the short caption, trains on the alt-text; a choice of the dense
caption skips the example as `missing_dense_caption`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jclip.data import robust
from jclip.data.ops.registry import Op, OpContext, register_op
from jclip.data.recaptions import DEFAULT_FIELD, Recaptions

MISSING_MODES = ("skip", "none")


@register_op("joined_captions")
class JoinedCaptions(Op):
    """`key_field` -> `field`: the example's recaption from the folder `dir` (opened on first use, or by
    `prepare()` at start-up); a key without one is `missing_recaption`, or None with `missing='none'`."""

    def __init__(self, context: OpContext, dir: str, field: str = DEFAULT_FIELD, key_field: str = "key",
                 missing: str = "skip"):
        if missing not in MISSING_MODES:
            raise ValueError(f"missing must be one of {MISSING_MODES}, got {missing!r}")
        self.directory = str(dir)
        self.field, self.key_field, self.missing = field, key_field, missing
        self.reads = (key_field,)
        self.writes = (field,)
        self._recaptions: Recaptions | None = None

    def prepare(self) -> Recaptions:
        """Opens the folder (once)."""
        if self._recaptions is None:
            self._recaptions = Recaptions(self.directory)
        return self._recaptions

    def __call__(self, example: dict[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
        key = robust.example_key(example, self.key_field)
        caption = None if key is None else self.prepare().caption(key)
        if caption is None and self.missing == "skip":
            detail = f"no {self.key_field!r}" if key is None else f"no recaption in {self.directory}"
            raise robust.BadExample("missing_recaption", detail)
        return {**example, self.field: caption}

    def __getstate__(self) -> dict[str, Any]:  # Grain worker processes re-open the memory maps.
        return {**self.__dict__, "_recaptions": None}
