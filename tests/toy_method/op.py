"""The toy method's preprocessing op: K copies of the caption's tokens with its words shuffled.

`shuffle_words(field='token_ids', out='shuffled_token_ids', count=K)` reads a tokenised caption [L] and
writes [K, L]: in each copy the tokens between the start and the end token are permuted at random (the
example's own rng, so the batch sequence stays exactly resumable). A stand-in for hard negatives.
"""

from __future__ import annotations

import numpy as np

from jclip.data.ops import register_op


@register_op("shuffle_words")
class ShuffleWords:
    def __init__(self, context, *, field: str = "token_ids", out: str = "shuffled_token_ids", count: int = 3):
        self.field, self.out, self.count = field, out, int(count)
        self.reads, self.writes = (field,), (out,)

    def __call__(self, example: dict, rng: np.random.Generator | None) -> dict:
        token_ids = np.asarray(example[self.field])
        end = int(np.argmax(token_ids))  # the end token has the largest id
        copies = np.repeat(token_ids[None], self.count, axis=0)
        rng = rng or np.random.default_rng(0)
        for copy in copies:
            copy[1:end] = rng.permutation(copy[1:end])
        return {**example, self.out: copies.astype(np.int32)}
