"""The `tokenize` op: one caption to token ids [L], or a list of up to K captions to ids [K, L] and a mask [K].

Rows are padded with the tokenizer's `pad_id` (0 for CLIP's BPE, -1 for a pretrained tower's tokenizer).
One caption (the default): a missing, undecodable or empty caption (also one with no tokens once cleaned,
like "&nbsp;") skips the example; a caption longer than the context is truncated, and with
`count_truncated` the op also writes `caption_truncated` (int32 0/1), which `SkipCounter` pops and counts.

Several (`max_count=K`, e.g. hard-negative captions): `out` gets int32 [K, L] and `mask` (default: `out`
with `token_ids` replaced by `mask`, so `negative_token_ids` -> `negative_mask`) bool [K]. The first K usable
captions are kept in order; unusable ones (empty, undecodable, no tokens) and missing ones are zero rows with
mask False. An absent field skips the example as `missing_field`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jclip.data.ops.captions import caption_text
from jclip.data.ops.registry import Op, OpContext, register_op
from jclip.data.robust import TRUNCATED_FIELD, BadExample
from jclip.data.tokenizer import Tokenizer, make_tokenizer


@register_op("tokenize")
class Tokenize(Op):
    """Tokenizes `field` into `out` with the run's tokenizer and context length (see the module)."""

    def __init__(self, context: OpContext, field: str = "caption", out: str = "token_ids",
                 max_count: int | None = None, mask: str | None = None, count_truncated: bool | None = None):
        if max_count is not None and (not isinstance(max_count, int) or max_count < 1):
            raise ValueError(f"max_count must be a positive int or None, got {max_count!r}")
        self.field, self.out, self.max_count = field, out, max_count
        self.tokenizer_spec, self.context_length = str(context.tokenizer_spec), int(context.context_length)
        self.count_truncated = (max_count is None) if count_truncated is None else bool(count_truncated)
        if max_count is not None and self.count_truncated:
            raise ValueError("count_truncated counts one caption per example; it needs max_count=None")
        if max_count is not None:
            self.mask = mask or (out[: -len("token_ids")] + "mask" if out.endswith("token_ids") else out + "_mask")
        elif mask is not None:
            raise ValueError("mask names the validity mask of several captions; it needs max_count")
        else:
            self.mask = None
        self.reads = self.consumes = (field,)
        if max_count is not None:
            self.writes = (out, self.mask)
        else:
            self.writes = (out, TRUNCATED_FIELD) if self.count_truncated else (out,)

    @property
    def tokenizer(self) -> Tokenizer:
        return make_tokenizer(self.tokenizer_spec, self.context_length)

    def _ids(self, text: str) -> np.ndarray | None:
        """Token ids, or None when nothing is left once cleaned."""
        tokenizer = self.tokenizer
        ids = tokenizer(text)
        return ids if tokenizer.has_content(ids) else None

    def __call__(self, example: dict[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
        out = {key: value for key, value in example.items() if key != self.field}
        if self.max_count is None:
            text = caption_text(example.get(self.field))
            ids = self._ids(text)
            if ids is None:  # no tokens once cleaned ("&nbsp;")
                raise BadExample("empty_caption", "no tokens after cleaning")
            out[self.out] = ids
            if self.count_truncated:
                # A full context ends in the end token; only then is it worth re-counting the caption's tokens.
                tokenizer = self.tokenizer
                out[TRUNCATED_FIELD] = np.int32(ids[-1] != tokenizer.pad_id and tokenizer.truncates(text))
            return out
        out[self.out], out[self.mask] = self._several(example)
        return out

    def _several(self, example: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        raw = example.get(self.field)
        if raw is None:
            raise BadExample("missing_field", f"no {self.field!r}")
        if isinstance(raw, np.ndarray):
            raw = raw.tolist() if raw.ndim else [raw.item()]
        elif isinstance(raw, (str, bytes, bytearray, np.bytes_)):
            raw = [raw]
        ids = np.full((self.max_count, self.context_length), self.tokenizer.pad_id, np.int32)
        mask = np.zeros(self.max_count, bool)
        count = 0
        for item in raw:
            if count == self.max_count:
                break
            try:
                row = self._ids(caption_text(item))
            except BadExample:
                row = None
            if row is not None:
                ids[count], mask[count] = row, True
                count += 1
        return ids, mask
