"""Import OpenCLIP (PyTorch) CLIP checkpoints into jclip's NNX `CLIPModel`.

Reads OpenCLIP's model config (`model_cfg` of its JSON files, mlfoundations/open_clip `model_configs/*.json`)
and its `state_dict` key names and layouts (open_clip 3.x `CLIP` with a ViT image tower and the built-in
text tower). Every tensor maps by pure renaming and reshaping — linear weights transposed ([out, in] ->
[in, out]), the patch convolution OIHW -> HWIO, the fused `in_proj_weight` split into [embed, q|k|v, heads,
head_dim] — so loading reproduces OpenCLIP's `encode_image`/`encode_text` (tests/convert). Any source key
left unused, target parameter left unfilled or shape mismatch is an error that names it.

No PyTorch needed: pass a dict of NumPy arrays (e.g. `safetensors.numpy.load_file(path)`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jclip.models.clip_model import CLIP_INIT_LOGIT_SCALE, CLIPModel

# OpenCLIP config entries jclip's towers do not implement; a non-default value is an error.
_UNSUPPORTED_VISION = {
    "timm_model_name": None, "hf_model_name": None, "ls_init_value": None, "attentional_pool": False,
    "no_ln_pre": False, "final_ln_after_pool": False, "pool_type": "tok", "output_tokens": False,
    "pos_embed_type": "learnable", "act_kwargs": None, "norm_kwargs": None, "block_type": None,
    "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
    "scale_attn": False, "scale_fc": False, "attn_pooler_queries": None,
}
_UNSUPPORTED_TEXT = {
    "hf_model_name": None, "hf_tokenizer_name": None, "ls_init_value": None, "embed_cls": False,
    "no_causal_mask": False, "final_ln_after_pool": False, "pool_type": "argmax", "proj_bias": False,
    "proj_type": "linear", "output_tokens": False, "act_kwargs": None, "norm_kwargs": None, "block_type": None,
    "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
    "scale_attn": False, "scale_fc": False, "attn_mask": True,
}
# Entries that do not change the architecture (tokenizer, training-time options).
_IGNORED_VISION = {"patch_dropout", "image_mean", "image_std", "interpolation", "resize_mode"}
_IGNORED_TEXT = {"pad_id", "tokenizer_kwargs", "hf_proj_type", "hf_pooler_type", "hf_model_pretrained"}
_IGNORED_MODEL = {"cast_dtype"}


def _check_supported(section: Mapping[str, Any], unsupported: Mapping[str, Any], ignored: set[str],
                     known: set[str], where: str) -> None:
    for key, value in section.items():
        if key in known or key in ignored:
            continue
        if key in unsupported:
            if value != unsupported[key] and not (value is None and unsupported[key] is False):
                raise ValueError(f"OpenCLIP {where} option {key}={value!r} is not supported by jclip's towers")
            continue
        raise ValueError(f"unknown OpenCLIP {where} config entry {key!r}={value!r}")


def model_config_from_openclip(config: Mapping[str, Any]) -> dict[str, Any]:
    """A jclip model config from OpenCLIP's model config (the `model_cfg` dict, or a JSON holding it).

    Defaults follow OpenCLIP's `CLIPVisionCfg`/`CLIPTextCfg` (head_width 64, mlp_ratio 4, context 77,
    vocab 49408, width 512, heads 8, layers 12).
    """
    config = dict(config.get("model_cfg", config))
    vision = dict(config.get("vision_cfg", {}))
    text = dict(config.get("text_cfg", {}))
    vision_known = {"image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio"}
    text_known = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
    _check_supported(vision, _UNSUPPORTED_VISION, _IGNORED_VISION, vision_known, "vision_cfg")
    _check_supported(text, _UNSUPPORTED_TEXT, _IGNORED_TEXT, text_known, "text_cfg")
    model_known = {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "init_logit_scale", "init_logit_bias"}
    # CustomTextCLIP (`custom_text`) keeps its text tower under `text.` with other layouts.
    _check_supported(config, {"custom_text": False}, _IGNORED_MODEL, model_known, "model")
    if not isinstance(vision.get("layers", 12), int):
        raise ValueError(f"OpenCLIP ResNet image towers (layers={vision['layers']!r}) are not supported")
    if "patch_size" not in vision:
        raise ValueError("OpenCLIP vision_cfg has no patch_size (not a ViT)")
    result: dict[str, Any] = {
        "embed_dim": int(config["embed_dim"]),
        "quick_gelu": bool(config.get("quick_gelu", False)),
        "vision": {
            "image_size": vision.get("image_size", 224),
            "patch_size": int(vision["patch_size"]),
            "width": int(vision.get("width", 768)),
            "layers": int(vision.get("layers", 12)),
            "head_width": int(vision.get("head_width", 64)),
            "mlp_ratio": float(vision.get("mlp_ratio", 4.0)),
        },
        "text": {
            "context_length": int(text.get("context_length", 77)),
            "vocab_size": int(text.get("vocab_size", 49408)),
            "width": int(text.get("width", 512)),
            "heads": int(text.get("heads", 8)),
            "layers": int(text.get("layers", 12)),
            "mlp_ratio": float(text.get("mlp_ratio", 4.0)),
        },
        "init_logit_scale": float(config.get("init_logit_scale", CLIP_INIT_LOGIT_SCALE)),
    }
    if isinstance(result["vision"]["image_size"], (list, tuple)):
        result["vision"]["image_size"] = tuple(int(s) for s in result["vision"]["image_size"])
    else:
        result["vision"]["image_size"] = int(result["vision"]["image_size"])
    if config.get("init_logit_bias") is not None:
        result["init_logit_bias"] = float(config["init_logit_bias"])
    return result


Transform = Callable[[np.ndarray, tuple[int, ...]], np.ndarray]


def _identity(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return value


def _linear_weight(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """torch Linear weight [out, in] -> kernel [in, out]."""
    return value.T


def _conv_weight(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """torch Conv2d weight OIHW -> HWIO."""
    return value.transpose(2, 3, 1, 0)


def _in_proj_weight(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """`in_proj_weight` [3*width, width] (rows q|k|v, each heads x head_dim) -> [width, 3, heads, head_dim]."""
    width, three, heads, head_dim = shape
    if value.shape != (three * heads * head_dim, width):
        return value  # the shape check reports it
    return value.reshape(three, heads, head_dim, width).transpose(3, 0, 1, 2)


def _in_proj_bias(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """`in_proj_bias` [3*width] -> [3, heads, head_dim]."""
    return value.reshape(shape) if value.size == int(np.prod(shape)) else value


def _out_proj_weight(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """`out_proj.weight` [width, heads*head_dim] -> [heads, head_dim, width]."""
    kernel = value.T
    return kernel.reshape(shape) if kernel.size == int(np.prod(shape)) else kernel


_LAYER_NORM = {"scale": ("weight", _identity), "bias": ("bias", _identity)}
_BLOCK = {
    ("attn", "in_kernel"): ("attn.in_proj_weight", _in_proj_weight),
    ("attn", "in_bias"): ("attn.in_proj_bias", _in_proj_bias),
    ("attn", "out_kernel"): ("attn.out_proj.weight", _out_proj_weight),
    ("attn", "out_bias"): ("attn.out_proj.bias", _identity),
    ("mlp", "c_fc", "kernel"): ("mlp.c_fc.weight", _linear_weight),
    ("mlp", "c_fc", "bias"): ("mlp.c_fc.bias", _identity),
    ("mlp", "c_proj", "kernel"): ("mlp.c_proj.weight", _linear_weight),
    ("mlp", "c_proj", "bias"): ("mlp.c_proj.bias", _identity),
}
_TOP = {
    ("logit_scale",): ("logit_scale", _identity),
    ("logit_bias",): ("logit_bias", _identity),
    ("visual", "patch_embedding"): ("visual.conv1.weight", _conv_weight),
    ("visual", "class_embedding"): ("visual.class_embedding", _identity),
    ("visual", "positional_embedding"): ("visual.positional_embedding", _identity),
    ("visual", "projection"): ("visual.proj", _identity),
    ("text", "token_embedding"): ("token_embedding.weight", _identity),
    ("text", "positional_embedding"): ("positional_embedding", _identity),
    ("text", "projection"): ("text_projection", _identity),
}
_TOWER_PREFIX = {"visual": "visual.transformer.resblocks", "text": "transformer.resblocks"}
_LAYER_NORM_PREFIX = {("visual", "ln_pre"): "visual.ln_pre", ("visual", "ln_post"): "visual.ln_post",
                      ("text", "ln_final"): "ln_final"}


def openclip_key_for(path: tuple[Any, ...]) -> tuple[str, Transform]:
    """The OpenCLIP state-dict key (and the layout change) that fills jclip parameter `path`."""
    path = tuple(path)
    if path in _TOP:
        return _TOP[path]
    if path[:2] in _LAYER_NORM_PREFIX and len(path) == 3 and path[2] in _LAYER_NORM:
        name, transform = _LAYER_NORM[path[2]]
        return f"{_LAYER_NORM_PREFIX[path[:2]]}.{name}", transform
    if len(path) >= 5 and path[1:3] == ("transformer", "blocks") and path[0] in _TOWER_PREFIX:
        prefix = f"{_TOWER_PREFIX[path[0]]}.{int(path[3])}"
        rest = path[4:]
        if rest in _BLOCK:
            name, transform = _BLOCK[rest]
            return f"{prefix}.{name}", transform
        if len(rest) == 2 and rest[0] in ("ln_1", "ln_2") and rest[1] in _LAYER_NORM:
            name, transform = _LAYER_NORM[rest[1]]
            return f"{prefix}.{rest[0]}.{name}", transform
    raise KeyError(f"no OpenCLIP key is known for jclip parameter {'/'.join(map(str, path))}")


def params_from_openclip_state_dict(state_dict: Mapping[str, Any], model: CLIPModel) -> nnx.State:
    """The model's `nnx.Param` state filled from an OpenCLIP state dict; `model` is unchanged.

    Values are host NumPy arrays in each parameter's dtype (shard or `device_put` them as needed).
    Apply with `nnx.update(model, params)`. Raises `ValueError` listing every unconsumed source key,
    unfilled target parameter and shape mismatch. A DDP `module.` prefix is stripped, as OpenCLIP does.
    """
    source = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    target = nnx.to_flat_state(nnx.state(model, nnx.Param))
    consumed: set[str] = set()
    problems: list[str] = []
    filled = []
    for path, variable in target:
        name = "/".join(map(str, path))
        try:
            key, transform = openclip_key_for(path)
        except KeyError as error:
            problems.append(str(error.args[0]))
            continue
        if key not in source:
            problems.append(f"jclip parameter {name} is unfilled: OpenCLIP key {key!r} is missing")
            continue
        consumed.add(key)
        shape = tuple(variable.shape)
        value = transform(np.asarray(source[key]), shape)
        if tuple(value.shape) != shape:
            problems.append(f"shape mismatch for {key!r} -> {name}: got {tuple(np.shape(source[key]))} "
                            f"(as {tuple(value.shape)}), expected {shape}")
            continue
        filled.append((path, variable.replace(np.array(value, dtype=variable.dtype, order="C"))))
    unconsumed = sorted(set(source) - consumed)
    if unconsumed:
        problems.append(f"OpenCLIP keys not consumed by the jclip model: {unconsumed}")
    if problems:
        raise ValueError("cannot import the OpenCLIP state dict:\n  " + "\n  ".join(problems))
    return nnx.from_flat_state(filled)


def load_openclip_state_dict(state_dict: Mapping[str, Any], model: CLIPModel) -> CLIPModel:
    """Copies an OpenCLIP state dict into `model` in place, as device arrays (see
    `params_from_openclip_state_dict`, which returns host NumPy arrays for callers that shard them)."""
    params = params_from_openclip_state_dict(state_dict, model)
    nnx.update(model, jax.tree.map(jnp.asarray, params))
    return model
