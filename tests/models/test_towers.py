"""Towers by name: the registry, each tower's keys, checks and parameter count (against closed-form counts
of OpenCLIP's layers), and a new tower kind plugged in without editing jclip."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jclip.models import build_model, count_params, get_preset, towers
from jclip.models.layers import l2_normalize, logical_param, normal


def vit_params(image_size: int, patch: int, width: int, layers: int, embed_dim: int) -> int:
    """OpenCLIP VisionTransformer: conv1 (no bias), class token, positions, ln_pre, blocks, ln_post, proj."""
    grid = (image_size // patch) ** 2
    block = 4 * width * width + 4 * width + 8 * width * width + 5 * width + 4 * width  # attn, mlp, 2 LayerNorms
    return 3 * patch * patch * width + width + (grid + 1) * width + 2 * width + layers * block + 2 * width + width * embed_dim


def text_params(vocab: int, context: int, width: int, layers: int, embed_dim: int) -> int:
    """OpenCLIP text half: token and position embeddings, blocks, ln_final, text_projection."""
    block = 4 * width * width + 4 * width + 8 * width * width + 5 * width + 4 * width
    return vocab * width + context * width + layers * block + 2 * width + width * embed_dim


@pytest.mark.parametrize("preset, vision, text", [
    ("B/32", (224, 32, 768, 12), (49408, 77, 512, 12)),
    ("B/16", (224, 16, 768, 12), (49408, 77, 512, 12)),
    ("L/14", (224, 14, 1024, 24), (49408, 77, 768, 12)),
])
def test_tower_parameter_counts_equal_openclips_layers(preset, vision, text):
    config = get_preset(preset)
    embed_dim = config["embed_dim"]
    vision_count = towers.tower_for(config, "vision").count_params(config["vision"], embed_dim)
    text_count = towers.tower_for(config, "text").count_params(config["text"], embed_dim)
    assert vision_count == vit_params(*vision, embed_dim)
    assert text_count == text_params(*text, embed_dim)
    assert vision_count + text_count + 1 == count_params(config)  # + logit_scale


def test_unknown_kind_and_keys_are_rejected_with_what_is_known():
    config = get_preset("tiny")
    config["text"] = dict(config["text"], kind="bert-huge")
    with pytest.raises(ValueError, match=r"unknown model.text.kind 'bert-huge'; known text towers: \[.*'clip'"):
        towers.check_tower(config, "text")
    config = get_preset("tiny")
    del config["vision"]["patch_size"]
    with pytest.raises(ValueError, match=r"model.vision \(kind 'vit'\) needs \['patch_size'\]"):
        towers.check_tower(config, "vision")
    config = get_preset("tiny")
    config["vision"]["image_size"] = 30
    with pytest.raises(ValueError, match="must be a positive multiple of patch_size"):
        towers.check_tower(config, "vision")


@pytest.mark.parametrize("modality, change, message", [
    ("vision", {"width": 100}, "model.vision.width (100) must be divisible by head_width (64): set model.vision.width "
                               "to a multiple of 64 (e.g. 128) or change model.vision.head_width"),
    ("vision", {"image_size": 30}, "model.vision.image_size (30) must be a positive multiple of patch_size (8): "
                                   "set model.vision.image_size to a multiple of 8 (e.g. 32) or change "
                                   "model.vision.patch_size"),
    ("vision", {"width": 32}, "model.vision.width (32) must be divisible by head_width (64): set model.vision.width "
                              "to a multiple of 64 (e.g. 64) or change model.vision.head_width"),
    ("text", {"width": 65}, "model.text.width (65) must be divisible by heads (2): set model.text.width to a "
                            "multiple of 2 (e.g. 66) or change model.text.heads"),
])
def test_a_shape_that_cannot_be_built_names_both_keys_and_a_value_that_would_do(modality, change, message):
    config = get_preset("tiny")
    config[modality] = dict(config[modality], **change)
    with pytest.raises(ValueError) as error:
        towers.check_tower(config, modality)
    assert str(error.value) == message


def test_validate_config_names_an_unknown_tower():
    from configs import clip
    from jclip.config_validation import validate_config
    from jclip.errors import ConfigError

    config = clip.get_config()
    config.model.vision.kind = "convnext"
    with pytest.raises(ConfigError, match=r"unknown model.vision.kind 'convnext'; known vision towers: \['vit'"):
        validate_config(config)


class BagOfWords(nnx.Module):
    """A toy text tower: the mean of the token embeddings up to the end token, projected."""

    def __init__(self, *, context_length: int, vocab_size: int, width: int, output_dim: int, rngs: nnx.Rngs, **_):
        self.embedding = logical_param(rngs, normal(0.02), (vocab_size, width), ("vocab", "embed"), jnp.float32)
        self.projection = logical_param(rngs, normal(0.02), (width, output_dim), ("embed", "proj"), jnp.float32)

    def encode(self, token_ids, *, tokens=False):
        mask = jnp.arange(token_ids.shape[1])[None] <= jnp.argmax(token_ids, axis=-1)[:, None]
        embedded = jnp.take(self.embedding[...], token_ids, axis=0)
        pooled = jnp.sum(embedded * mask[..., None], axis=1) / jnp.sum(mask, axis=1, keepdims=True)
        out = {"features": pooled @ self.projection[...]}
        if tokens:
            out["tokens"], out["token_mask"] = embedded @ self.projection[...], mask
        return out

    def __call__(self, token_ids):
        return self.encode(token_ids)["features"]


BAG = dataclasses.replace(
    towers.tower_for(get_preset("tiny"), "text"),
    kind="bag_of_words", module=BagOfWords, required=frozenset({"context_length", "vocab_size", "width"}),
    defaults={"tokenizer": "clip"}, check=lambda config: None, weight_formats=(),
)


def test_a_new_tower_kind_plugs_in_by_registration():
    towers.register_tower(BAG)
    config = get_preset("tiny")
    config["text"] = {"kind": "bag_of_words", "context_length": 8, "vocab_size": 64, "width": 16}
    model = build_model(config, nnx.Rngs(0))
    token_ids = jnp.asarray([[5, 9, 63, 0, 0, 0, 0, 0], [7, 63, 0, 0, 0, 0, 0, 0]], jnp.int32)
    images = jnp.zeros((2, 32, 32, 3))
    outputs = model({"images": images, "token_ids": token_ids}, ["text_embeddings", "text_tokens", "text_token_mask"])
    table, projection = np.asarray(model.text.embedding[...]), np.asarray(model.text.projection[...])
    expected = np.stack([table[[5, 9, 63]].mean(0), table[[7, 63]].mean(0)]) @ projection
    np.testing.assert_allclose(outputs["text_embeddings"], l2_normalize(jnp.asarray(expected)), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(outputs["text_token_mask"][1], [True, True] + [False] * 6)
    assert BAG.count_params(config["text"], config["embed_dim"]) == 64 * 16 + 16 * config["embed_dim"]

    from jclip.convert.formats import check_weight_format

    with pytest.raises(ValueError, match="model.text.kind 'bag_of_words' has no 'openclip' weight layout"):
        check_weight_format(config, "openclip")
    check_weight_format(get_preset("tiny"), "hf")


def test_token_outputs_follow_the_towers_final_norm_and_projection():
    """image_tokens / text_tokens: every position through ln_post / ln_final and the projection; the pooled
    features are the class token and the end-token position of the same computation."""
    config = get_preset("tiny")
    model = build_model(config, nnx.Rngs(1))
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    token_ids = jnp.asarray([[49406, 320, 1125, 49407] + [0] * 28, [49406, 49407] + [0] * 30], jnp.int32)
    batch = {"images": images, "token_ids": token_ids}
    out = model(batch, ["image_features", "text_features", "image_tokens", "text_tokens", "text_token_mask"])
    assert out["image_tokens"].shape == (2, 16, 128) and out["text_tokens"].shape == (2, 32, 128)
    np.testing.assert_allclose(out["text_tokens"][0, 3], out["text_features"][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["text_tokens"][1, 1], out["text_features"][1], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["text_token_mask"][0], [True] * 4 + [False] * 28)
    # Patch tokens: the ViT's hidden states without the class token, as the pooled path computes them.
    visual = model.visual
    hidden = visual.transformer(visual.ln_pre(jnp.concatenate(
        [jnp.broadcast_to(visual.class_embedding[...], (2, 1, 128)), visual.embed_patches(images)], 1)
        + visual.positional_embedding[...]))
    expected = visual.ln_post(hidden) @ visual.projection[...]
    np.testing.assert_allclose(out["image_tokens"], expected[:, 1:], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["image_features"], expected[:, 0], rtol=1e-5, atol=1e-5)
    assert set(model(batch)) == {"image_features", "text_features", "image_embeddings", "text_embeddings", "logit_scale"}


def test_extra_captions_give_embeddings_tokens_and_masks_as_the_text_tower_does_alone():
    """`negative_token_ids` [B, K, L] -> `negative_text_embeddings` [B, K, d], `negative_text_tokens`
    [B, K, L, d] and `negative_text_token_mask` [B, K, L]: each caption as if it were the batch's own text."""
    config = get_preset("tiny")
    model = build_model(config, nnx.Rngs(2))
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    token_ids = jnp.asarray([[49406, 320, 49407] + [0] * 29, [49406, 49407] + [0] * 30], jnp.int32)
    negatives = jnp.stack([token_ids[::-1], jnp.zeros_like(token_ids), token_ids], axis=1)  # [2, 3, 32]
    batch = {"images": images, "token_ids": token_ids, "negative_token_ids": negatives}
    names = ["negative_text_embeddings", "negative_text_tokens", "negative_text_token_mask"]
    out = model(batch, names)
    assert sorted(out) == sorted(names)
    assert out["negative_text_tokens"].shape == (2, 3, 32, 128) and out["negative_text_token_mask"].shape == (2, 3, 32)
    for k in range(3):
        alone = model({"images": images, "token_ids": negatives[:, k]}, ["text_embeddings", "text_tokens", "text_token_mask"])
        np.testing.assert_allclose(out["negative_text_embeddings"][:, k], alone["text_embeddings"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["negative_text_tokens"][:, k], alone["text_tokens"], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(out["negative_text_token_mask"][:, k], alone["text_token_mask"])
    np.testing.assert_array_equal(out["negative_text_token_mask"][1, 0], [True] * 3 + [False] * 29)
    # Only what is asked for: the embeddings alone come without token outputs.
    assert list(model(batch, ["negative_text_embeddings"])) == ["negative_text_embeddings"]
    from jclip.models.clip_model import extra_fields_read, model_output_names

    assert extra_fields_read(["negative_text_tokens", "text_tokens", "teacher_image_embeddings"]) == {"negative_token_ids"}
    assert set(names) <= model_output_names(config, ["images", "token_ids", "negative_token_ids"])
