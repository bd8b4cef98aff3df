"""jclip/convert/openclip.py against OpenCLIP's own files: state dicts, configs and outputs written by
open_clip_torch 3.3.0 (../shared/reference, see its README). Reproducing `encode_image`/`encode_text` is the
independent proof that jclip's towers are OpenCLIP's architecture."""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jclip.convert.openclip import (
    load_openclip_state_dict,
    model_config_from_openclip,
    params_from_openclip_state_dict,
)
from jclip.models import CLIPModel, build_model, count_params

safetensors_numpy = pytest.importorskip(
    "safetensors.numpy", reason="reading OpenCLIP's reference state dicts needs `pip install safetensors`")

VARIANTS = ["openclip_tiny", "openclip_tiny_quickgelu"]


def _load(reference_dir: pathlib.Path, name: str) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]:
    config = json.loads((reference_dir / f"{name}.json").read_text())
    state = safetensors_numpy.load_file(str(reference_dir / f"{name}.safetensors"))
    io = dict(np.load(reference_dir / f"{name}_io.npz"))
    return config, state, io


@pytest.mark.parametrize("name", VARIANTS)
def test_reproduces_openclip_features(reference_dir: pathlib.Path, name: str) -> None:
    config, state, io = _load(reference_dir, name)
    model_config = model_config_from_openclip(config)
    assert model_config["quick_gelu"] == name.endswith("quickgelu")
    assert count_params(model_config) == sum(v.size for v in state.values())
    model = load_openclip_state_dict(state, build_model(model_config, nnx.Rngs(0)))

    images = jnp.asarray(io["images"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
    outputs = nnx.jit(lambda m, i, t: m(i, t))(model, images, jnp.asarray(io["token_ids"]))
    np.testing.assert_allclose(outputs["image_features"], io["image_features"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(outputs["text_features"], io["text_features"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(outputs["logit_scale"], io["logit_scale"], rtol=1e-6)


@pytest.fixture(scope="module")
def tiny(reference_dir: pathlib.Path) -> tuple[dict[str, np.ndarray], CLIPModel]:
    config, state, _ = _load(reference_dir, "openclip_tiny")
    return state, nnx.eval_shape(lambda: build_model(model_config_from_openclip(config), nnx.Rngs(0)))


def test_missing_key_is_named(tiny: tuple[dict[str, np.ndarray], CLIPModel]) -> None:
    state, model = tiny
    state = dict(state)
    del state["visual.transformer.resblocks.1.mlp.c_fc.bias"]
    with pytest.raises(ValueError, match=r"visual/transformer/blocks/1/mlp/c_fc/bias is unfilled"):
        params_from_openclip_state_dict(state, model)


def test_unconsumed_key_is_named(tiny: tuple[dict[str, np.ndarray], CLIPModel]) -> None:
    state, model = tiny
    with pytest.raises(ValueError, match=r"not consumed.*'visual\.attnpool\.weight'"):
        params_from_openclip_state_dict({**state, "visual.attnpool.weight": np.zeros(3)}, model)
    with pytest.raises(ValueError, match=r"not consumed.*'logit_bias'"):
        params_from_openclip_state_dict({**state, "logit_bias": np.zeros(())}, model)


def test_shape_mismatch_is_named(tiny: tuple[dict[str, np.ndarray], CLIPModel]) -> None:
    state, model = tiny
    bad = {**state, "text_projection": np.zeros((64, 16), np.float32)}
    with pytest.raises(ValueError, match=r"shape mismatch for 'text_projection'.*expected \(64, 32\)"):
        params_from_openclip_state_dict(bad, model)


def test_config_translation_rejects_unsupported_towers() -> None:
    base = {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}}
    config = model_config_from_openclip(base)
    assert config["vision"]["head_width"] == 64 and "init_logit_bias" not in config
    assert count_params(config) == 151_277_313
    siglip_like = {**base, "init_logit_bias": -10.0}
    assert model_config_from_openclip(siglip_like)["init_logit_bias"] == -10.0
    with pytest.raises(ValueError, match="timm_model_name"):
        model_config_from_openclip({**base, "vision_cfg": {**base["vision_cfg"], "timm_model_name": "vit"}})
    with pytest.raises(ValueError, match="ResNet"):
        model_config_from_openclip({**base, "vision_cfg": {"layers": [3, 4, 6, 3], "width": 64}})
