"""`data.preprocess` through ConfiguredData: the default op list reproduces the former fixed training
preprocessing bit for bit with the same rng draws, and `batch_fields()` says what a batch will hold
without opening anything."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from configs import clip
from jclip.data import configured, robust
from jclip.data.ops.captions import caption_candidates
from jclip.data.ops.image import ImageTextPreprocessor, decode_image


def reference(example, rng, *, image_size, context_length, scale):
    """The former `SafePreprocessor(ImageTextPreprocessor(...))` of training, step by step."""
    try:
        texts = caption_candidates(example.get("caption"))
        image = decode_image(example.get("image"))
        text = texts[int(rng.integers(len(texts)))] if rng is not None and len(texts) > 1 else texts[0]
        pre = ImageTextPreprocessor(image_size=image_size, context_length=context_length,
                                    random_crop_scale=None if scale is None else tuple(scale))
        out = pre({"image": image, "caption": text}, rng)
        tokenizer = pre.tokenizer
        if out["token_ids"][tokenizer.num_start_tokens] == tokenizer.end_of_text:
            raise robust.BadExample("empty_caption", "no tokens after cleaning")
        out[robust.TRUNCATED_FIELD] = np.int32(out["token_ids"][-1] == tokenizer.end_of_text
                                               and tokenizer.truncates(text))
        return out
    except robust.BadExample as bad:
        return robust.Skipped(bad.reason, example.get("key"), bad.detail)


def jpeg(seed: int, width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def examples() -> list[dict]:
    captions = ["a cat", ["one", "two", None, "three"], [b"only usable", ""], "word " * 40, "&nbsp;", None,
                ["first", "second"], b"caf\xc3\xa9"]
    items = [{"key": f"k{i}", "image": jpeg(i, 20 + 7 * i, 48 - 3 * i), "caption": caption}
             for i, caption in enumerate(captions)]
    items.append({"key": "bad_image", "image": b"not an image", "caption": ["x", "y"]})
    items.append({"key": "array", "image": np.full((30, 17, 3), 99, np.uint8), "caption": ["p", "q", "r"]})
    return items


def configured_data(**data) -> configured.ConfiguredData:
    config = clip.get_config()
    config.model.vision.image_size = 24
    config.model.text.context_length = 16
    for key, value in data.items():
        config.data[key] = value
    return configured.ConfiguredData(config.data, config.model)


@pytest.mark.parametrize("scale", [None, (0.3, 1.0)])
def test_default_op_list_reproduces_the_former_preprocessing_and_its_rng_draws(scale):
    data = configured_data(random_crop_scale=scale)
    assert data.preprocess_spec() == configured.DEFAULT_PREPROCESS == clip.get_config().data.preprocess
    preprocess = data.train_preprocess()
    for seed in range(3):
        for index, example in enumerate(examples()):
            ours_rng, their_rng = np.random.default_rng((seed, index)), np.random.default_rng((seed, index))
            ours = preprocess(example, ours_rng)
            theirs = reference(example, their_rng, image_size=24, context_length=16, scale=scale)
            if isinstance(theirs, robust.Skipped):
                assert ours == theirs
                continue
            assert ours.keys() == theirs.keys() == {"images", "token_ids", robust.TRUNCATED_FIELD}
            for field in theirs:
                assert ours[field].dtype == theirs[field].dtype
                np.testing.assert_array_equal(ours[field], theirs[field])
            # The same draws, in the same order: both generators end in the same state.
            assert ours_rng.bit_generator.state == their_rng.bit_generator.state, example["key"]
    evaluation = preprocess(examples()[1])  # no rng: the first usable caption, the centre crop
    theirs = reference(examples()[1], None, image_size=24, context_length=16, scale=scale)
    np.testing.assert_array_equal(evaluation["token_ids"], theirs["token_ids"])
    np.testing.assert_array_equal(evaluation["images"], theirs["images"])


def test_skips_are_counted_by_reason_as_before():
    preprocess = configured_data().train_preprocess()
    reasons = {ex["key"]: out.reason for ex in examples()
               if isinstance(out := preprocess(ex, np.random.default_rng(0)), robust.Skipped)}
    assert reasons == {"k4": "empty_caption", "k5": "missing_caption", "bad_image": "undecodable_image"}


def test_batch_fields_name_each_fields_op_without_opening_anything(tmp_path):
    assert configured_data().batch_fields() == {"images": "normalise_image", "token_ids": "tokenize",
                                                "caption_truncated": "tokenize"}
    absent = tmp_path / "not_written_yet"
    with_guidance = configured_data(guidance_features=str(absent))
    assert with_guidance.preprocess_spec().endswith(f"|guidance(dir={str(absent)!r})")
    assert with_guidance.batch_fields() == {"images": "normalise_image", "token_ids": "tokenize",
                                            "caption_truncated": "tokenize",
                                            "guidance_image_features": "guidance", "guidance_text_features": "guidance"}
    negatives = configured_data(preprocess=configured.DEFAULT_PREPROCESS + "|tokenize(field='negative_captions', "
                                "out='negative_token_ids', max_count=3)")
    assert negatives.batch_fields()["negative_mask"] == "tokenize"
    assert negatives.batch_fields()["negative_token_ids"] == "tokenize"
    with pytest.raises(ValueError, match="unknown preprocessing op 'decode'"):
        configured_data(preprocess="decode|tokenize")


def test_a_config_saved_without_preprocess_gets_the_default():
    config = clip.get_config()
    del config.data["preprocess"]
    data = configured.ConfiguredData(config.data, config.model)
    assert data.preprocess_spec() == configured.DEFAULT_PREPROCESS
