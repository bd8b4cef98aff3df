"""jclip/convert/openclip.py against OpenCLIP's own files: state dicts, configs and outputs written by
open_clip_torch 3.3.0 (../shared/reference, see its README). Reproducing `encode_image`/`encode_text` is the
independent proof that jclip's towers are OpenCLIP's architecture; the export direction is checked against
the same files (key set and shapes) and by exact round trips. tests/convert/test_pytorch_parity.py loads
exports in the real libraries."""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy as safetensors_numpy
from flax import nnx

from jclip.convert.openclip import (
    flat_params_from_openclip,
    load_openclip_state_dict,
    model_config_from_openclip,
    model_config_from_openclip_state_dict,
    openclip_model_config,
    openclip_state_dict_from_flat_params,
    openclip_state_shapes,
    params_from_openclip_state_dict,
)
from jclip.models import CLIPModel, build_model, count_params, get_preset
from jclip.models.clip_model import architecture

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
    outputs = nnx.jit(lambda m, i, t: m({"images": i, "token_ids": t}))(model, images, jnp.asarray(io["token_ids"]))
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


@pytest.mark.parametrize("name", VARIANTS)
def test_state_shapes_are_openclips(reference_dir: pathlib.Path, name: str) -> None:
    config, state, _ = _load(reference_dir, name)
    expected = openclip_state_shapes(model_config_from_openclip(config))
    assert expected == {key: value.shape for key, value in state.items()}


@pytest.mark.parametrize("name", VARIANTS)
def test_openclip_round_trip_is_exact(reference_dir: pathlib.Path, name: str) -> None:
    """OpenCLIP -> jclip -> OpenCLIP gives back OpenCLIP's own file, bit for bit, and its config."""
    config, state, _ = _load(reference_dir, name)
    model_config = model_config_from_openclip(config)
    model = nnx.eval_shape(lambda: build_model(model_config, nnx.Rngs(0)))
    target = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    exported = openclip_state_dict_from_flat_params(flat_params_from_openclip(state, target), model_config)
    assert set(exported) == set(state)
    for key, value in state.items():
        assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key
    assert openclip_model_config(model_config) == {**config["model_cfg"], "vision_cfg": {
        **config["model_cfg"]["vision_cfg"], "mlp_ratio": 4.0}, "text_cfg": {**config["model_cfg"]["text_cfg"], "mlp_ratio": 4.0}}


@pytest.mark.parametrize("preset,quick_gelu,bias", [("tiny", False, None), ("tiny", True, -10.0), ("B/32", True, None)])
def test_jclip_round_trip_is_exact(preset: str, quick_gelu: bool, bias: float | None) -> None:
    """jclip -> OpenCLIP -> jclip returns every parameter bit for bit (random weights, ViT-B/32 shapes too)."""
    model_config = get_preset(preset, quick_gelu=quick_gelu, init_logit_bias=bias)
    model = nnx.eval_shape(lambda: build_model(model_config, nnx.Rngs(0)))
    target = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    rng = np.random.default_rng(0)
    params = {path: rng.standard_normal(v.shape).astype(np.float32) for path, v in target.items()}
    state = openclip_state_dict_from_flat_params(params, model_config)
    assert ("logit_bias" in state) == (bias is not None)
    back = flat_params_from_openclip(state, target)
    assert set(back) == set(params)
    for path, value in params.items():
        assert np.array_equal(back[path], value), path


def test_prototype_heads_are_not_dropped_silently() -> None:
    model_config = get_preset("tiny", prototype_heads={"num_prototypes": 8, "hidden_dim": 16, "bottleneck_dim": 8,
                                                       "layers": 2})
    model = nnx.eval_shape(lambda: build_model(model_config, nnx.Rngs(0)))
    params = {tuple(p): np.zeros(v.shape, np.float32) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    with pytest.raises(ValueError, match=r"no prototype heads.*image_head/mlp/0/bias"):
        openclip_state_dict_from_flat_params(params, model_config)
    state = openclip_state_dict_from_flat_params(params, model_config, drop_prototype_heads=True)
    assert not any("head" in key for key in state) and "visual.proj" in state


@pytest.mark.parametrize("name", VARIANTS)
def test_architecture_read_off_the_weights(reference_dir: pathlib.Path, name: str) -> None:
    config, state, _ = _load(reference_dir, name)
    quick_gelu = name.endswith("quickgelu")
    inferred = model_config_from_openclip_state_dict(state, quick_gelu=quick_gelu, head_width=32)
    assert architecture(inferred) == architecture(model_config_from_openclip(config))
    with pytest.raises(ValueError, match="not a multiple of head_width 48"):
        model_config_from_openclip_state_dict(state, quick_gelu=quick_gelu, head_width=48)
    with pytest.raises(ValueError, match=r"not an OpenCLIP ViT state dict: missing \['visual.conv1.weight'\]"):
        model_config_from_openclip_state_dict({k: v for k, v in state.items() if k != "visual.conv1.weight"},
                                              quick_gelu=False)


@pytest.mark.parametrize("name", VARIANTS)
def test_a_scanned_model_imports_and_exports_openclips_per_layer_names(reference_dir: pathlib.Path, name: str) -> None:
    """A scanned model (`scan_layers`: stacked blocks) loads OpenCLIP's file, reproduces its features, and exports
    the same file, per-layer names `visual.transformer.resblocks.{i}...` included, bit for bit."""
    config, state, io = _load(reference_dir, name)
    model_config = {**model_config_from_openclip(config), "scan_layers": True}
    model = load_openclip_state_dict(state, build_model(model_config, nnx.Rngs(0)))
    layers = model_config["vision"]["layers"]
    assert model.visual.transformer.blocks.attn.in_kernel.shape[0] == layers  # stacked
    images = jnp.asarray(io["images"].transpose(0, 2, 3, 1))
    outputs = nnx.jit(lambda m, i, t: m({"images": i, "token_ids": t}))(model, images, jnp.asarray(io["token_ids"]))
    np.testing.assert_allclose(outputs["image_features"], io["image_features"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(outputs["text_features"], io["text_features"], atol=1e-5, rtol=1e-5)
    params = {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    exported = openclip_state_dict_from_flat_params(params, model_config)
    assert f"visual.transformer.resblocks.{layers - 1}.attn.in_proj_weight" in exported
    assert set(exported) == set(state)
    for key, value in state.items():
        assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key
