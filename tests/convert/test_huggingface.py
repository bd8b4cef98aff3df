"""jclip/convert/huggingface.py against transformers' own files: ../shared/reference/hf_clip_tiny (a
`CLIPModel` saved by transformers 5.23.0) and the image/text features transformers computed for it."""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy as safetensors_numpy
from flax import nnx

from jclip.convert.huggingface import (
    hf_config,
    hf_image_processor_config,
    hf_state_dict_from_openclip,
    model_config_from_hf,
    openclip_state_dict_from_hf,
)
from jclip.convert.openclip import load_openclip_state_dict
from jclip.convert.params_io import preprocessing_spec
from jclip.models import build_model, get_preset


@pytest.fixture(scope="module")
def hf_tiny(reference_dir: pathlib.Path) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]:
    folder = reference_dir / "hf_clip_tiny"
    config = json.loads((folder / "config.json").read_text())
    state = safetensors_numpy.load_file(str(folder / "model.safetensors"))
    return config, state, dict(np.load(reference_dir / "hf_clip_tiny_io.npz"))


def test_reproduces_transformers_features(hf_tiny) -> None:
    config, state, io = hf_tiny
    model_config = model_config_from_hf(config)
    assert model_config["quick_gelu"] and model_config["vision"]["head_width"] == 32
    model = build_model(model_config, nnx.Rngs(0))
    load_openclip_state_dict(openclip_state_dict_from_hf(state, model_config), model)
    outputs = nnx.jit(lambda m, i, t: m({"images": i, "token_ids": t}))(
        model, jnp.asarray(io["images"].transpose(0, 2, 3, 1)), jnp.asarray(io["token_ids"]))
    np.testing.assert_allclose(outputs["image_features"], io["image_features"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(outputs["text_features"], io["text_features"], atol=1e-5, rtol=1e-5)
    assert float(outputs["logit_scale"]) == pytest.approx(3.1, rel=1e-6)


def test_transformers_round_trip_is_exact(hf_tiny) -> None:
    """transformers -> OpenCLIP layout -> transformers gives back the file bit for bit, and the config's
    architecture entries."""
    config, state, _ = hf_tiny
    model_config = model_config_from_hf(config)
    back = hf_state_dict_from_openclip(openclip_state_dict_from_hf(state, model_config), model_config)
    assert set(back) == set(state)
    for key, value in state.items():
        assert np.array_equal(back[key], value), key
    spec = preprocessing_spec(model_config, tokenizer="clip")
    written = hf_config(model_config, spec)
    for tower in ("text_config", "vision_config"):
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act"):
            assert written[tower][key] == config[tower][key], (tower, key)
    assert written["text_config"]["eos_token_id"] == config["text_config"]["eos_token_id"] == 999
    assert written["projection_dim"] == config["projection_dim"]


def test_keys_are_checked(hf_tiny) -> None:
    config, state, _ = hf_tiny
    model_config = model_config_from_hf(config)
    missing = {k: v for k, v in state.items() if k != "text_model.encoder.layers.1.self_attn.k_proj.bias"}
    with pytest.raises(ValueError, match=r"missing keys: \['text_model.encoder.layers.1.self_attn.k_proj.bias'\]"):
        openclip_state_dict_from_hf(missing, model_config)
    with pytest.raises(ValueError, match=r"unexpected keys: \['vision_model.head.weight'\]"):
        openclip_state_dict_from_hf({**state, "vision_model.head.weight": np.zeros(2)}, model_config)
    with pytest.raises(ValueError, match=r"shape mismatch for 'visual_projection.weight'"):
        openclip_state_dict_from_hf({**state, "visual_projection.weight": state["visual_projection.weight"].T},
                                    model_config)
    # transformers < 4.31 saved the position ids buffers; they are accepted when they are 0..n-1.
    with_ids = {**state, "text_model.embeddings.position_ids": np.arange(16)[None]}
    openclip_state_dict_from_hf(with_ids, model_config)
    with pytest.raises(ValueError, match="position_ids is not 0..15"):
        openclip_state_dict_from_hf({**with_ids, "text_model.embeddings.position_ids": np.zeros((1, 16))}, model_config)


def test_unsupported_configs_are_refused(hf_tiny) -> None:
    config = hf_tiny[0]
    with pytest.raises(ValueError, match="model_type 'siglip' is not supported"):
        model_config_from_hf({**config, "model_type": "siglip"})
    with pytest.raises(ValueError, match="same one of"):
        model_config_from_hf({**config, "vision_config": {**config["vision_config"], "hidden_act": "gelu"}})
    with pytest.raises(ValueError, match="layer_norm_eps 1e-06"):
        model_config_from_hf({**config, "text_config": {**config["text_config"], "layer_norm_eps": 1e-6}})


def test_sigmoid_models_name_what_differs_from_siglip() -> None:
    model_config = get_preset("tiny", init_logit_bias=-10.0)
    with pytest.raises(ValueError, match=r"no logit bias.*SiglipModel cannot hold jclip's towers"):
        hf_state_dict_from_openclip({}, model_config)
    with pytest.raises(ValueError, match="square images only"):
        hf_config(get_preset("tiny", vision={**get_preset("tiny")["vision"], "image_size": (32, 64)}),
                  preprocessing_spec(get_preset("tiny")))


def test_image_processor_states_jclips_preprocessing() -> None:
    spec = preprocessing_spec(get_preset("B/32"))
    processor = hf_image_processor_config(spec)
    assert processor["size"] == {"shortest_edge": 224} and processor["crop_size"] == {"height": 224, "width": 224}
    assert processor["image_mean"] == [0.48145466, 0.4578275, 0.40821073]  # OpenAI CLIP's
    assert processor["resample"] == 3  # PIL.Image.BICUBIC
