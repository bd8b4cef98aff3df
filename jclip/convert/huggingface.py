"""Hugging Face transformers' `CLIPModel` directories to and from OpenCLIP state dicts and jclip model configs.

Follows transformers' `models/clip` (`CLIPConfig`, `CLIPTextConfig`, `CLIPVisionConfig`, `modeling_clip.py`):
the same architecture as OpenCLIP's CLIP with other names, separate q/k/v projections where OpenCLIP fuses
them into `in_proj_weight`, and the two projections stored as bias-free `nn.Linear` weights ([embed, width],
the transpose of OpenCLIP's). Conversion goes through the OpenCLIP layout, so jclip <-> OpenCLIP is the one
parameter mapping (`jclip.convert.openclip`). Every key is checked both ways; anything unmatched is named.

transformers' `SiglipModel` is a different architecture (no class token, an attention-pooling head, a
biased patch convolution, bidirectional text pooled at the last token): jclip's sigmoid-loss models have
CLIP's towers, so they export to `CLIPModel` (or to OpenCLIP, which keeps the logit bias).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jclip.convert.openclip import StateDict, check_state_dict, openclip_state_shapes
from jclip.models.clip_model import CLIP_INIT_LOGIT_SCALE

# transformers' defaults where a config.json leaves an entry out (CLIPTextConfig, CLIPVisionConfig, CLIPConfig).
_TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                  "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                  "layer_norm_eps": 1e-5}
_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                    "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
                    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
_ACTIVATIONS = {"quick_gelu": True, "gelu": False}  # transformers' "gelu" is the exact erf GELU
# Buffers older transformers versions saved beside the weights (torch.arange of the positions).
_POSITION_IDS = {"text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"}

_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
          "attn.out_proj": "self_attn.out_proj"}
_RENAMES = {
    "logit_scale": "logit_scale",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic: transformers' spelling
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_PROJECTIONS = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_TOWERS = {"visual.transformer.resblocks.": "vision_model.encoder.layers.", "transformer.resblocks.": "text_model.encoder.layers."}


def _hf_names(openclip_key: str) -> tuple[str, ...]:
    """The transformers key(s) of an OpenCLIP key: three (q, k, v) for a fused input projection."""
    if openclip_key in _RENAMES:
        return (_RENAMES[openclip_key],)
    if openclip_key in _PROJECTIONS:
        return (_PROJECTIONS[openclip_key],)
    for prefix, hf_prefix in _TOWERS.items():
        if openclip_key.startswith(prefix):
            layer, rest = openclip_key[len(prefix):].split(".", 1)
            head = f"{hf_prefix}{layer}."
            if rest.startswith("attn.in_proj_"):
                kind = rest[len("attn.in_proj_"):]  # weight | bias
                return tuple(f"{head}self_attn.{p}_proj.{kind}" for p in "qkv")
            module, kind = rest.rsplit(".", 1)
            if module in _BLOCK:
                return (f"{head}{_BLOCK[module]}.{kind}",)
    raise KeyError(f"no transformers CLIPModel key is known for OpenCLIP key {openclip_key!r}")


def hf_state_dict_from_openclip(state_dict: Mapping[str, np.ndarray], model_config: Mapping[str, Any]) -> StateDict:
    """transformers' `CLIPModel` state dict from an OpenCLIP one (checked against the architecture's keys)."""
    expected = openclip_state_shapes(model_config)
    if "logit_bias" in expected:
        raise ValueError(
            "transformers' CLIPModel has no logit bias; drop it first (the exporter's drop_logit_bias), or "
            "export to OpenCLIP, which keeps it. SiglipModel cannot hold jclip's towers: it has no class "
            "token, pools images with an attention head, has a biased patch convolution and bidirectional "
            "text pooled at the last token, while jclip's sigmoid-loss models have CLIP's towers.")
    check_state_dict(state_dict, expected, "not an OpenCLIP state dict of this model")
    result = {}
    for key, value in state_dict.items():
        names = _hf_names(key)
        if len(names) == 3:
            for name, part in zip(names, np.split(np.asarray(value), 3, axis=0)):
                result[name] = np.ascontiguousarray(part)
        elif key in _PROJECTIONS:
            result[names[0]] = np.ascontiguousarray(np.asarray(value).T)
        else:
            result[names[0]] = np.asarray(value)
    return result


def openclip_state_dict_from_hf(state_dict: Mapping[str, np.ndarray], model_config: Mapping[str, Any]) -> StateDict:
    """An OpenCLIP state dict from transformers' `CLIPModel` one. Raises ValueError naming every missing,
    unconsumed or misshapen key."""
    source = {k: np.asarray(v) for k, v in state_dict.items()}
    for name in _POSITION_IDS & set(source):  # a buffer, not a weight: it must be 0..n-1
        ids = source.pop(name).reshape(-1)
        if not np.array_equal(ids, np.arange(ids.size)):
            raise ValueError(f"{name} is not 0..{ids.size - 1}; this CLIPModel uses other positions")
    expected = openclip_state_shapes(model_config)
    hf_expected: dict[str, tuple[int, ...]] = {}
    for key, shape in expected.items():
        names = _hf_names(key)
        if len(names) == 3:
            hf_expected.update({name: (shape[0] // 3, *shape[1:]) for name in names})
        else:
            hf_expected[names[0]] = tuple(reversed(shape)) if key in _PROJECTIONS else shape
    check_state_dict(source, hf_expected, "cannot import the transformers CLIPModel state dict")
    result = {}
    for key in expected:
        names = _hf_names(key)
        if len(names) == 3:
            result[key] = np.concatenate([source[name] for name in names], axis=0)
        elif key in _PROJECTIONS:
            result[key] = np.ascontiguousarray(source[names[0]].T)
        else:
            result[key] = source[names[0]]
    return result


def model_config_from_hf(config: Mapping[str, Any]) -> dict[str, Any]:
    """A jclip model config from a transformers `CLIPConfig` (config.json). Other model types, activations
    jclip lacks or a LayerNorm eps other than 1e-5 are errors."""
    model_type = config.get("model_type", "clip")
    if model_type != "clip":
        raise ValueError(f"model_type {model_type!r} is not supported: jclip's towers are CLIP's (model_type 'clip')")
    text = {**_TEXT_DEFAULTS, **config.get("text_config", {})}
    vision = {**_VISION_DEFAULTS, **config.get("vision_config", {})}
    acts = {text["hidden_act"], vision["hidden_act"]}
    if len(acts) != 1 or not acts <= set(_ACTIVATIONS):
        raise ValueError(f"hidden_act text={text['hidden_act']!r} vision={vision['hidden_act']!r}: jclip needs both "
                         f"towers to use the same one of {sorted(_ACTIVATIONS)}")
    for name, tower in (("text", text), ("vision", vision)):
        if float(tower["layer_norm_eps"]) != 1e-5:
            raise ValueError(f"{name} layer_norm_eps {tower['layer_norm_eps']} is not jclip's 1e-5")
    if int(vision["num_channels"]) != 3:
        raise ValueError(f"vision num_channels {vision['num_channels']} is not 3")
    heads = int(vision["num_attention_heads"])
    if int(vision["hidden_size"]) % heads:
        raise ValueError(f"vision hidden_size {vision['hidden_size']} is not a multiple of {heads} heads")
    result = {
        "embed_dim": int(config.get("projection_dim", 512)),
        "quick_gelu": _ACTIVATIONS[acts.pop()],
        "vision": {
            "image_size": int(vision["image_size"]), "patch_size": int(vision["patch_size"]),
            "width": int(vision["hidden_size"]), "layers": int(vision["num_hidden_layers"]),
            "head_width": int(vision["hidden_size"]) // heads,
            "mlp_ratio": int(vision["intermediate_size"]) / int(vision["hidden_size"]),
        },
        "text": {
            "context_length": int(text["max_position_embeddings"]), "vocab_size": int(text["vocab_size"]),
            "width": int(text["hidden_size"]), "heads": int(text["num_attention_heads"]),
            "layers": int(text["num_hidden_layers"]),
            "mlp_ratio": int(text["intermediate_size"]) / int(text["hidden_size"]),
        },
    }
    if "logit_scale_init_value" in config:
        result["init_logit_scale"] = float(config["logit_scale_init_value"])
    return result


def _check_integral(name: str, value: float) -> int:
    if value != int(value):
        raise ValueError(f"{name} {value} is not a whole number, which transformers' config needs")
    return int(value)


def hf_config(model_config: Mapping[str, Any], preprocessing: Mapping[str, Any]) -> dict[str, Any]:
    """transformers' `CLIPConfig` (config.json) for a jclip model config and its preprocessing."""
    vision, text = dict(model_config["vision"]), dict(model_config["text"])
    size = vision["image_size"]
    if not isinstance(size, (int, np.integer)):
        if size[0] != size[1]:
            raise ValueError(f"transformers' CLIPVisionConfig has square images only, not {tuple(size)}")
        size = size[0]
    act = "quick_gelu" if model_config.get("quick_gelu") else "gelu"
    embed_dim = int(model_config["embed_dim"])
    vision_width, text_width = int(vision["width"]), int(text["width"])
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": embed_dim,
        "logit_scale_init_value": float(model_config.get("init_logit_scale", CLIP_INIT_LOGIT_SCALE)),
        "dtype": "float32",
        "text_config": {
            "model_type": "clip_text_model", "vocab_size": int(text["vocab_size"]), "hidden_size": text_width,
            "intermediate_size": _check_integral("text intermediate size", text_width * float(text.get("mlp_ratio", 4.0))),
            "num_hidden_layers": int(text["layers"]), "num_attention_heads": int(text["heads"]),
            "max_position_embeddings": int(text["context_length"]), "hidden_act": act, "layer_norm_eps": 1e-5,
            "projection_dim": embed_dim,
            # The text tower pools at the first end token (which jclip's tokenizers give the largest id).
            "eos_token_id": int(preprocessing["end_token"]),
            "bos_token_id": preprocessing.get("start_token"),
            "pad_token_id": int(preprocessing.get("pad_token", 0)),
        },
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": vision_width,
            "intermediate_size": _check_integral("vision intermediate size", vision_width * float(vision.get("mlp_ratio", 4.0))),
            "num_hidden_layers": int(vision["layers"]),
            "num_attention_heads": vision_width // int(vision.get("head_width", 64)),
            "num_channels": 3, "image_size": int(size), "patch_size": int(vision["patch_size"]), "hidden_act": act,
            "layer_norm_eps": 1e-5, "projection_dim": embed_dim,
        },
    }


def hf_image_processor_config(preprocessing: Mapping[str, Any]) -> dict[str, Any]:
    """transformers' `CLIPImageProcessor` settings (preprocessor_config.json) for jclip's preprocessing:
    bicubic resize of the shorter side, centre crop, /255, CLIP's mean and std."""
    height, width = preprocessing["image_size"]
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True, "size": {"shortest_edge": int(min(height, width))}, "resample": 3,  # PIL bicubic
        "do_center_crop": True, "crop_size": {"height": int(height), "width": int(width)},
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(preprocessing["mean"]), "image_std": list(preprocessing["std"]),
        "do_convert_rgb": True,
    }
