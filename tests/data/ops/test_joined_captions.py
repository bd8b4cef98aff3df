"""The `joined_captions` op: the example's recaption by key; a key without one is a counted skip
(`missing_recaption`), or with missing='none' left to the caption rule; the folder reopens in workers."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from jclip.data import ops, recaptions
from jclip.data.robust import BadExample

CONTEXT = ops.OpContext(image_size=16, context_length=16)


@pytest.fixture
def store(tmp_path):
    return str(recaptions.write_recaptions(tmp_path / "r", {"a": "A long caption of a.", "b": "A long caption of b."}))


def test_writes_the_recaption_of_the_examples_key(store):
    op = ops.make_op("joined_captions", CONTEXT, dir=store)
    assert op.reads == ("key",) and op.writes == ("dense_caption",)
    out = op({"key": "b", "caption": "b"}, np.random.default_rng(0))
    assert out == {"key": "b", "caption": "b", "dense_caption": "A long caption of b."}
    assert op({"key": np.bytes_(b"a")}, None)["dense_caption"] == "A long caption of a."
    other = ops.make_op("joined_captions", CONTEXT, dir=store, field="recaption", key_field="id")
    assert other({"id": "a"}, None)["recaption"] == "A long caption of a."


def test_a_key_without_a_recaption_is_a_counted_skip(store):
    op = ops.make_op("joined_captions", CONTEXT, dir=store)
    for example in ({"key": "c"}, {"caption": "no key"}):
        with pytest.raises(BadExample) as raised:
            op(example, np.random.default_rng(0))
        assert raised.value.reason == "missing_recaption"
    chain = ops.Preprocess([op, ops.make_op("caption_rule", CONTEXT, rule="dense")])
    assert chain({"key": "c", "caption": "c"}, np.random.default_rng(0)).reason == "missing_recaption"


def test_missing_none_leaves_the_choice_to_the_caption_rule(store):
    op = ops.make_op("joined_captions", CONTEXT, dir=store, missing="none")
    assert op({"key": "c", "dense_caption": "the source's own"}, None)["dense_caption"] is None
    short = ops.make_op("caption_rule", CONTEXT, rule="short")
    dense = ops.make_op("caption_rule", CONTEXT, rule="dense")
    example = op({"key": "c", "caption": "alt text"}, None)
    assert short(example, np.random.default_rng(0))["caption"] == "alt text"
    with pytest.raises(BadExample, match="missing_dense_caption"):
        dense(example, np.random.default_rng(0))
    with pytest.raises(ValueError, match="missing must be one of"):
        ops.make_op("joined_captions", CONTEXT, dir=store, missing="fallback")


def test_opens_on_first_use_and_pickles_without_the_memory_maps(store, tmp_path):
    op = ops.make_op("joined_captions", CONTEXT, dir=str(tmp_path / "absent"))  # building reads nothing
    with pytest.raises(FileNotFoundError, match="python -m jclip.join_captions"):
        op.prepare()
    op = ops.make_op("joined_captions", CONTEXT, dir=store)
    op.prepare()
    again = pickle.loads(pickle.dumps(op))
    assert again._recaptions is None and again({"key": "a"}, None)["dense_caption"] == "A long caption of a."
