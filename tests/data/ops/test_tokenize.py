"""The tokenize op: one caption (skips and truncation counting) and a list of K captions ([K, L] ids and a
validity mask [K], padding the missing ones), as hard-negative captions need."""

from __future__ import annotations

import numpy as np
import pytest

from jclip.data import ops, robust
from jclip.data.tokenizer import ClipTokenizer

CONTEXT = ops.OpContext(image_size=8, context_length=8)
TOKENIZER = ClipTokenizer(8)


def test_several_captions_give_ids_and_a_mask_padding_the_missing_ones():
    (op,) = ops.make_ops("tokenize(field='negative_captions', out='negative_token_ids', max_count=4)", CONTEXT)
    assert op.reads == ("negative_captions",) and op.writes == ("negative_token_ids", "negative_mask")
    out = op({"negative_captions": ["a red cube", b"a blue ball", "   ", "&nbsp;", None, "word " * 20, "extra"],
              "key": "k"}, None)
    ids, mask = out["negative_token_ids"], out["negative_mask"]
    assert ids.shape == (4, 8) and ids.dtype == np.int32 and mask.shape == (4,) and mask.dtype == bool
    # Unusable captions (blank, no tokens once cleaned, None) are not counted; the first K usable are kept.
    np.testing.assert_array_equal(mask, [True, True, True, True])
    for row, text in zip(ids, ["a red cube", "a blue ball", "word " * 20, "extra"]):
        np.testing.assert_array_equal(row, TOKENIZER(text))
    assert "negative_captions" not in out and out["key"] == "k"

    short = op({"negative_captions": np.asarray(["one"])}, None)
    np.testing.assert_array_equal(short["negative_mask"], [True, False, False, False])
    np.testing.assert_array_equal(short["negative_token_ids"][0], TOKENIZER("one"))
    assert not short["negative_token_ids"][1:].any()
    empty = op({"negative_captions": []}, None)
    assert not empty["negative_mask"].any() and empty["negative_token_ids"].shape == (4, 8)
    with pytest.raises(robust.BadExample) as missing:
        op({"key": "k"}, None)
    assert missing.value.reason == "missing_field"


def test_several_captions_batch_through_the_chain_with_a_custom_mask_name():
    chain = ops.Preprocess(ops.make_ops("tokenize(field='hard', out='hard_ids', max_count=2, mask='hard_valid')",
                                        CONTEXT))
    assert chain.fields == {"hard_ids": "tokenize", "hard_valid": "tokenize"}
    rows = [chain({"hard": texts}) for texts in (["a", "b", "c"], ["d"], [])]
    assert [row["hard_valid"].tolist() for row in rows] == [[True, True], [True, False], [False, False]]


def test_one_caption_skips_empty_ones_and_counts_truncation():
    (op,) = ops.make_ops("tokenize", CONTEXT)
    assert op.writes == ("token_ids", robust.TRUNCATED_FIELD)
    out = op({"caption": "word " * 20}, None)
    np.testing.assert_array_equal(out["token_ids"], TOKENIZER("word " * 20))
    assert out[robust.TRUNCATED_FIELD] == 1 and op({"caption": b"a cat"}, None)[robust.TRUNCATED_FIELD] == 0
    for caption, reason in [("&nbsp;", "empty_caption"), ("  ", "empty_caption"), (None, "missing_caption"),
                            (b"\xff", "undecodable_caption")]:
        with pytest.raises(robust.BadExample) as bad:
            op({"caption": caption}, None)
        assert bad.value.reason == reason
    (quiet,) = ops.make_ops("tokenize(count_truncated=False)", CONTEXT)
    assert quiet.writes == ("token_ids",)
    with pytest.raises(ValueError, match="needs max_count"):
        ops.make_ops("tokenize(mask='m')", CONTEXT)
