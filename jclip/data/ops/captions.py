"""Caption ops: `choose_caption` checks a caption field (one caption or several) and picks one.

Training (an rng given) picks one of the usable captions uniformly, drawing `rng.integers(n)` only when
there are several; evaluation takes the first. Captions made from class labels are a source wrapper
(`jclip.data.sources.label_captions`), since they need the source's class names.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jclip.data.ops.registry import Op, OpContext, register_op
from jclip.data.robust import BadExample


def caption_text(raw: Any) -> str:
    """One caption as text, or `BadExample`: bytes must be UTF-8 and something must remain after stripping."""
    if raw is None:
        raise BadExample("missing_caption")
    if isinstance(raw, np.ndarray) and raw.ndim == 0:
        raw = raw.item()
    if isinstance(raw, (bytes, bytearray, np.bytes_)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as error:
            raise BadExample("undecodable_caption", f"{type(error).__name__}: {error}"[:200]) from None
    if not isinstance(raw, str):
        raise BadExample("undecodable_caption", f"caption of type {type(raw).__name__}")
    if not raw.strip():
        raise BadExample("empty_caption")
    return raw


def caption_candidates(raw: Any) -> list[str]:
    """The usable captions of a caption field (one caption or a list); `BadExample` (the first reason) if none."""
    if isinstance(raw, np.ndarray) and raw.ndim > 0:
        raw = raw.tolist()
    if not isinstance(raw, (list, tuple)):
        return [caption_text(raw)]
    if not raw:
        raise BadExample("missing_caption", "empty list of captions")
    texts, first_bad = [], None
    for item in raw:
        try:
            texts.append(caption_text(item))
        except BadExample as bad:
            first_bad = first_bad or bad
    if not texts:
        raise first_bad
    return texts


@register_op("choose_caption")
class ChooseCaption(Op):
    """`field` (one caption or a list; str or UTF-8 bytes) -> one checked caption (str) in the same field."""

    def __init__(self, context: OpContext, field: str = "caption"):
        self.reads = self.writes = (field,)
        self.field = field

    def __call__(self, example: dict[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
        texts = caption_candidates(example.get(self.field))
        text = texts[int(rng.integers(len(texts)))] if rng is not None and len(texts) > 1 else texts[0]
        return {**example, self.field: text}


@register_op("keep")
class Keep(Op):
    """Raw fields passed through into the batch as NumPy arrays (e.g. `keep(fields=('label',))`);
    a missing one skips the example as `missing_field`."""

    def __init__(self, context: OpContext, fields: tuple[str, ...] = ("label",)):
        if isinstance(fields, str):
            fields = (fields,)
        self.reads = self.writes = tuple(fields)

    def __call__(self, example: dict[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
        out = dict(example)
        for field in self.reads:
            if example.get(field) is None:
                raise BadExample("missing_field", f"no {field!r}")
            out[field] = np.asarray(example[field])
        return out
