"""The `hard_negatives` op: fresh hard-negative captions per example, drawn from stored candidate pools.

FSC-CLIP (Oh et al., EMNLP 2024) trains each image against its caption and up to three hard negatives of it,
one of each kind (swap, replace, shuffle), made anew every step. jclip makes every candidate once
(`python -m jclip.make_negatives`, `jclip.data.negative_pools`); this op draws one candidate per kind,
uniformly, with the example's RNG. The pipeline seeds that RNG per element of the shuffled, repeated stream,
so the same caption gets new negatives each epoch, and a run restored from its iterator state draws exactly
the negatives it would have drawn without the interruption.

`hard_negatives(dir=DIR)` reads the chosen caption (after `choose_caption`) and writes `negative_captions`, a
list with one string per kind ('' for a kind without candidates); `tokenize(field='negative_captions',
out='negative_token_ids', max_count=3)` then writes `negative_token_ids` [K, L] and `negative_mask` [K].
`data.hard_negatives=DIR` is a shorthand for both. A caption missing from the pools stops the run with the
caption named: negatives are never silently absent.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jclip.data.negative_pools import NegativePools
from jclip.data.ops.registry import Op, OpContext, register_op

#: The kinds FSC-CLIP draws, in the order the op writes them.
DEFAULT_KINDS = ("swap", "replace", "shuffle")


@register_op("hard_negatives")
class HardNegatives(Op):
    """`field` (one caption, str) -> `out`: one candidate per kind of `kinds` drawn from the pools in `dir`.

    The folder is opened on first use, or by `prepare()` at start-up. Without an rng (not training) the
    first candidate of each kind is taken.
    """

    def __init__(self, context: OpContext, dir: str, field: str = "caption", out: str = "negative_captions",
                 kinds: tuple[str, ...] = DEFAULT_KINDS):
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        if not kinds or len(set(kinds)) != len(kinds):
            raise ValueError(f"kinds must be distinct kinds of negatives, got {kinds!r}")
        self.directory = str(dir)
        self.field, self.out, self.kinds = field, out, kinds
        self.reads = (field,)
        self.writes = (out,)
        self._pools: NegativePools | None = None

    def prepare(self) -> NegativePools:
        """Opens the folder (once), checking it holds every kind the op draws."""
        if self._pools is None:
            pools = NegativePools(self.directory)
            missing = [kind for kind in self.kinds if kind not in pools.kinds]
            if missing:
                raise ValueError(f"negative pools {self.directory} have no kind(s) {missing} (they hold {pools.kinds}); "
                                 f"name those in data.preprocess: hard_negatives(dir={self.directory!r}, "
                                 f"kinds={pools.kinds!r})")
            self._pools = pools
        return self._pools

    def __call__(self, example: dict[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
        caption = example.get(self.field)
        if isinstance(caption, (bytes, np.bytes_)):
            caption = bytes(caption).decode("utf-8")
        if not isinstance(caption, str):
            raise ValueError(f"hard_negatives reads one caption (str) in {self.field!r}, got {type(caption).__name__}: "
                             f"put it after choose_caption in data.preprocess")
        pools = self.prepare()
        row = pools.row(caption)
        if row is None:
            raise pools.missing(caption)
        # A fixed number of draws per example, so one kind's draw does not depend on whether another is empty.
        uniforms = rng.random(len(self.kinds)) if rng is not None else np.zeros(len(self.kinds))
        negatives = []
        for kind, uniform in zip(self.kinds, uniforms):
            candidates = pools.candidates(row, kind)
            negatives.append(candidates[min(int(uniform * len(candidates)), len(candidates) - 1)] if candidates else "")
        return {**example, self.out: negatives}

    def __getstate__(self) -> dict[str, Any]:  # Grain worker processes re-open the memory maps.
        return {**self.__dict__, "_pools": None}
