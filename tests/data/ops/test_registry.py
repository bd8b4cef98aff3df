"""The op registry: the op-list syntax, clear errors for unknown ops and arguments, ops registered from
outside jclip, the batch fields an op list produces, and the fixed-shape check of the op chain."""

from __future__ import annotations

import numpy as np
import pytest

from jclip.data import ops, robust
from jclip.data.ops import Op, OpContext, register_op

CONTEXT = OpContext(image_size=8, context_length=8)


@register_op("test_registry_scale")
class Scale(Op):
    """A user's op, registered from a test module: `out` = `field` x `factor` (a missing field is a skip)."""

    def __init__(self, context: OpContext, field: str = "x", out: str = "y", factor: float = 2.0):
        self.reads, self.writes = (field,), (out,)
        self.field, self.out, self.factor = field, out, factor

    def __call__(self, example, rng):
        if example.get(self.field) is None:
            raise robust.BadExample("missing_field", f"no {self.field!r}")
        return {**example, self.out: np.asarray(example[self.field], np.float32) * self.factor}


@register_op("test_registry_ragged")
def ragged(context: OpContext, field: str = "x"):
    """A function factory: writes an array whose length follows the example (not batchable)."""

    class Ragged(Op):
        reads, writes = (field,), ("ragged",)

        def __call__(self, example, rng):
            return {**example, "ragged": np.zeros(int(example[field]), np.float32)}

    return Ragged()


def test_parse_names_and_keyword_literals():
    assert ops.parse_ops("a|b(x=1, y='s|t', z=(0.5, 1.0))|c()") == [
        ("a", {}), ("b", {"x": 1, "y": "s|t", "z": (0.5, 1.0)}), ("c", {})]
    assert ops.parse_ops("  a |\n b ") == [("a", {}), ("b", {})]
    for bad, message in [("a b", "cannot parse"), ("a(1)", "by keyword"), ("a(x=y)", "not a Python literal"),
                         ("a.b", "a name or name"), ("", "empty")]:
        with pytest.raises(ValueError, match=message):
            ops.parse_ops(bad)


def test_unknown_op_and_bad_arguments_name_what_is_known():
    with pytest.raises(ValueError, match=r"unknown preprocessing op 'nope'; known ops: .*choose_caption.*tokenize"):
        ops.make_ops("decode_image|nope", CONTEXT)
    with pytest.raises(ValueError, match=r"op 'tokenize': unknown argument\(s\) \['fild'\]; its arguments: "
                                         r"field='caption', out='token_ids', max_count=None"):
        ops.make_ops("tokenize(fild='caption')", CONTEXT)
    with pytest.raises(ValueError, match=r"op 'guidance': missing argument\(s\) \['dir'\]"):
        ops.make_ops("guidance", CONTEXT)
    with pytest.raises(ValueError, match="op 'crop_image': scale must be"):
        ops.make_ops("crop_image(scale=(0.9, 2.0))", CONTEXT)
    with pytest.raises(ValueError, match="already registered"):
        register_op("tokenize")(lambda context: None)


def test_an_op_registered_outside_jclip_runs_in_the_chain_and_skips_bad_examples():
    chain = ops.Preprocess(ops.make_ops("test_registry_scale(factor=3.0)|test_registry_scale(field='y', out='z')",
                                        CONTEXT))
    assert chain.fields == {"y": "test_registry_scale", "z": "test_registry_scale"}
    out = chain({"x": np.ones(2), "key": "a"})
    np.testing.assert_array_equal(out["y"], [3, 3])
    np.testing.assert_array_equal(out["z"], [6, 6])
    assert set(out) == {"y", "z"}  # raw fields are not batched
    assert chain({"key": "b"}) == robust.Skipped("missing_field", "b", "no 'x'")


def test_batch_fields_are_the_written_ones_no_later_op_consumes():
    default = ops.make_ops("choose_caption|decode_image|crop_image|normalise_image|tokenize", CONTEXT)
    assert ops.batch_fields(default) == {"images": "normalise_image", "token_ids": "tokenize",
                                         "caption_truncated": "tokenize"}
    more = ops.make_ops("keep(fields=('label', 'key'))|guidance(dir='/nowhere', modalities=('text',))|"
                        "tokenize(field='negative_captions', out='negative_token_ids', max_count=3)", CONTEXT)
    assert ops.batch_fields(more) == {"label": "keep", "key": "keep", "guidance_text_features": "guidance",
                                      "negative_token_ids": "tokenize", "negative_mask": "tokenize"}


def test_a_field_of_varying_shape_or_not_an_array_is_a_clear_error():
    chain = ops.Preprocess(ops.make_ops("test_registry_ragged", CONTEXT))
    assert chain({"x": 3})["ragged"].shape == (3,)
    with pytest.raises(ValueError, match=r"op 'test_registry_ragged' wrote 'ragged' of shape \(4,\) for example "
                                         r"'k', but of shape \(3,\) before"):
        chain({"x": 4, "key": "k"})
    unfinished = ops.Preprocess(ops.make_ops("decode_image|crop_image", CONTEXT))
    with pytest.raises(ValueError, match="op 'crop_image' wrote 'image' as Image"):
        unfinished({"image": np.zeros((8, 8, 3), np.uint8)})


def test_the_chain_pickles_for_worker_processes():
    import pickle

    chain = ops.Preprocess(ops.make_ops("choose_caption|decode_image|crop_image|normalise_image|tokenize", CONTEXT))
    again = pickle.loads(pickle.dumps(chain))
    example = {"image": np.full((8, 8, 3), 9, np.uint8), "caption": "a cat", "key": "k"}
    for field, value in chain(example).items():
        np.testing.assert_array_equal(again(example)[field], value)
