"""jclip's `CLIPModel` to and from OpenCLIP (PyTorch) state dicts and model configs.

Follows open_clip 3.x `CLIP` with a ViT image tower and the built-in text tower (mlfoundations/open_clip
`model.py`, `transformer.py`, `model_configs/*.json`); OpenAI's released state dicts use the same key names.
Every tensor maps by renaming and reshaping only — linear weights transposed ([out, in] <-> [in, out]), the
patch convolution OIHW <-> HWIO, the fused `in_proj_weight` [3*width, width] <-> [width, q|k|v, heads,
head_dim] — so a converted model reproduces OpenCLIP's `encode_image`/`encode_text` (tests/convert).

Both directions are checked against OpenCLIP's layout written out independently (`openclip_state_shapes`):
a source key left unused, a target key or parameter left unfilled, or a shape mismatch stops the conversion
with every such key named. No PyTorch needed: state dicts are dicts of NumPy arrays.

A scanned model's stacked blocks (`model.scan_layers`, jclip.models.stacking) keep OpenCLIP's per-layer names:
they are split into layers on export and stacked again on import.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jclip.models import stacking
from jclip.models.clip_model import CLIP_INIT_LOGIT_SCALE, CLIPModel

ParamPath = tuple[Any, ...]
StateDict = dict[str, np.ndarray]

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
# Scalars OpenAI's released state dicts carry beside the weights (OpenCLIP drops them when loading).
OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")


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
    image_size = vision.get("image_size", 224)
    result: dict[str, Any] = {
        "embed_dim": int(config["embed_dim"]),
        "quick_gelu": bool(config.get("quick_gelu", False)),
        "vision": {
            "image_size": tuple(int(s) for s in image_size) if isinstance(image_size, (list, tuple)) else int(image_size),
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
    if config.get("init_logit_bias") is not None:
        result["init_logit_bias"] = float(config["init_logit_bias"])
    return result


def openclip_model_config(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """OpenCLIP's `model_cfg` (what `open_clip.CLIP(**model_cfg)` takes) for a jclip model config."""
    vision, text = _tower(model_config, "vision"), _tower(model_config, "text")
    image_size = vision["image_size"]
    result: dict[str, Any] = {
        "embed_dim": int(model_config["embed_dim"]),
        "quick_gelu": bool(model_config.get("quick_gelu", False)),
        "vision_cfg": {
            "image_size": list(image_size) if isinstance(image_size, (list, tuple)) else int(image_size),
            "layers": int(vision["layers"]),
            "width": int(vision["width"]),
            "patch_size": int(vision["patch_size"]),
            "head_width": int(vision.get("head_width", 64)),
            "mlp_ratio": float(vision.get("mlp_ratio", 4.0)),
        },
        "text_cfg": {
            "context_length": int(text["context_length"]),
            "vocab_size": int(text["vocab_size"]),
            "width": int(text["width"]),
            "heads": int(text["heads"]),
            "layers": int(text["layers"]),
            "mlp_ratio": float(text.get("mlp_ratio", 4.0)),
        },
    }
    if model_config.get("init_logit_bias") is not None:
        # OpenCLIP's CLIP only creates its `logit_bias` parameter when given an initial value.
        result["init_logit_bias"] = float(model_config["init_logit_bias"])
    return result


def _tower(model_config: Mapping[str, Any], name: str) -> dict[str, Any]:
    tower = model_config[name]
    return tower.to_dict() if hasattr(tower, "to_dict") else dict(tower)


def openclip_state_shapes(model_config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every key of OpenCLIP's `CLIP.state_dict()` for this architecture, with its shape (torch layout).

    Written from OpenCLIP's modules, independently of the jclip <-> OpenCLIP renaming below, so that both
    conversion directions are checked against the format itself.
    """
    vision, text = _tower(model_config, "vision"), _tower(model_config, "text")
    embed_dim = int(model_config["embed_dim"])
    size = vision["image_size"]
    height, width_px = (size, size) if isinstance(size, int) else tuple(size)
    patch, vision_width = int(vision["patch_size"]), int(vision["width"])
    shapes: dict[str, tuple[int, ...]] = {
        "logit_scale": (),
        "visual.class_embedding": (vision_width,),
        "visual.positional_embedding": ((height // patch) * (width_px // patch) + 1, vision_width),
        "visual.proj": (vision_width, embed_dim),
        "visual.conv1.weight": (vision_width, int(vision.get("in_channels", 3)), patch, patch),
        "token_embedding.weight": (int(text["vocab_size"]), int(text["width"])),
        "positional_embedding": (int(text["context_length"]), int(text["width"])),
        "text_projection": (int(text["width"]), embed_dim),
    }
    if model_config.get("init_logit_bias") is not None:
        shapes["logit_bias"] = ()
    for prefix, width in (("visual.ln_pre", vision_width), ("visual.ln_post", vision_width),
                          ("ln_final", int(text["width"]))):
        shapes.update({f"{prefix}.weight": (width,), f"{prefix}.bias": (width,)})
    for prefix, tower in (("visual.transformer.resblocks", vision), ("transformer.resblocks", text)):
        width, hidden = int(tower["width"]), int(int(tower["width"]) * float(tower.get("mlp_ratio", 4.0)))
        for layer in range(int(tower["layers"])):
            block = f"{prefix}.{layer}"
            shapes.update({
                f"{block}.attn.in_proj_weight": (3 * width, width), f"{block}.attn.in_proj_bias": (3 * width,),
                f"{block}.attn.out_proj.weight": (width, width), f"{block}.attn.out_proj.bias": (width,),
                f"{block}.ln_1.weight": (width,), f"{block}.ln_1.bias": (width,),
                f"{block}.ln_2.weight": (width,), f"{block}.ln_2.bias": (width,),
                f"{block}.mlp.c_fc.weight": (hidden, width), f"{block}.mlp.c_fc.bias": (hidden,),
                f"{block}.mlp.c_proj.weight": (width, hidden), f"{block}.mlp.c_proj.bias": (width,),
            })
    return shapes


def check_state_dict(state_dict: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Raises ValueError naming every missing key, unexpected key and shape mismatch of `state_dict`."""
    problems = []
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing:
        problems.append(f"missing keys: {missing}")
    if unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    for key in sorted(set(expected) & set(state_dict)):
        if tuple(np.shape(state_dict[key])) != tuple(expected[key]):
            problems.append(f"shape mismatch for {key!r}: got {tuple(np.shape(state_dict[key]))}, "
                            f"expected {tuple(expected[key])}")
    if problems:
        raise ValueError(f"{what}:\n  " + "\n  ".join(problems))


def model_config_from_openclip_state_dict(state_dict: Mapping[str, Any], *, quick_gelu: bool,
                                          head_width: int = 64) -> dict[str, Any]:
    """A jclip model config read off an OpenCLIP/OpenAI state dict's shapes (as OpenCLIP's
    `build_model_from_openai_state_dict` does). Shapes do not fix the attention head counts, which are
    width // `head_width` (64 in every OpenAI and OpenCLIP ViT), nor the activation: pass `quick_gelu`
    (True for OpenAI's weights and OpenCLIP's `-quickgelu` models)."""
    required = ("visual.conv1.weight", "visual.positional_embedding", "text_projection", "positional_embedding",
                "token_embedding.weight", "ln_final.weight", "visual.transformer.resblocks.0.mlp.c_fc.weight",
                "transformer.resblocks.0.mlp.c_fc.weight")
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise ValueError(f"not an OpenCLIP ViT state dict: missing {missing}")

    def layers(prefix: str) -> int:
        return len({k.split(".")[len(prefix.split("."))] for k in state_dict if k.startswith(prefix + ".")})

    vision_width, _, patch, _ = np.shape(state_dict["visual.conv1.weight"])
    grid = round((np.shape(state_dict["visual.positional_embedding"])[0] - 1) ** 0.5)
    text_width = np.shape(state_dict["ln_final.weight"])[0]
    for name, width in (("vision", vision_width), ("text", text_width)):
        if width % head_width:
            raise ValueError(f"the {name} width {width} is not a multiple of head_width {head_width}")
    config: dict[str, Any] = {
        "embed_dim": int(np.shape(state_dict["text_projection"])[1]),
        "quick_gelu": bool(quick_gelu),
        "vision": {
            "image_size": int(grid * patch), "patch_size": int(patch), "width": int(vision_width),
            "layers": layers("visual.transformer.resblocks"), "head_width": int(head_width),
            "mlp_ratio": np.shape(state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"])[0] / vision_width,
        },
        "text": {
            "context_length": int(np.shape(state_dict["positional_embedding"])[0]),
            "vocab_size": int(np.shape(state_dict["token_embedding.weight"])[0]),
            "width": int(text_width), "heads": int(text_width // head_width),
            "layers": layers("transformer.resblocks"),
            "mlp_ratio": np.shape(state_dict["transformer.resblocks.0.mlp.c_fc.weight"])[0] / text_width,
        },
    }
    if "logit_bias" in state_dict:
        config["init_logit_bias"] = float(np.asarray(state_dict["logit_bias"]))
    return config


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one tensor's torch layout becomes jclip's (`to_jclip`, given the target shape) and back."""

    to_jclip: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


def _reshaped(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return value.reshape(shape) if value.size == int(np.prod(shape)) else value  # else the shape check reports it


def _in_proj_to_jclip(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """[3*width, width] (rows q|k|v, each heads x head_dim) -> [width, 3, heads, head_dim]."""
    width, three, heads, head_dim = shape
    if value.shape != (three * heads * head_dim, width):
        return value
    return value.reshape(three, heads, head_dim, width).transpose(3, 0, 1, 2)


SAME = Layout(lambda value, shape: value, lambda value: value)
LINEAR = Layout(lambda value, shape: value.T, lambda value: value.T)  # torch Linear [out, in] <-> [in, out]
CONV = Layout(lambda value, shape: value.transpose(2, 3, 1, 0), lambda value: value.transpose(3, 2, 0, 1))  # OIHW <-> HWIO
IN_PROJ = Layout(_in_proj_to_jclip, lambda value: value.transpose(1, 2, 3, 0).reshape(-1, value.shape[0]))
IN_PROJ_BIAS = Layout(_reshaped, lambda value: value.reshape(-1))  # [3*width] <-> [3, heads, head_dim]
# `out_proj.weight` [width, heads*head_dim] <-> [heads, head_dim, width]
OUT_PROJ = Layout(lambda value, shape: _reshaped(value.T, shape),
                  lambda value: value.reshape(-1, value.shape[-1]).T)

_LAYER_NORM = {"scale": "weight", "bias": "bias"}
_BLOCK = {
    ("attn", "in_kernel"): ("attn.in_proj_weight", IN_PROJ),
    ("attn", "in_bias"): ("attn.in_proj_bias", IN_PROJ_BIAS),
    ("attn", "out_kernel"): ("attn.out_proj.weight", OUT_PROJ),
    ("attn", "out_bias"): ("attn.out_proj.bias", SAME),
    ("mlp", "c_fc", "kernel"): ("mlp.c_fc.weight", LINEAR),
    ("mlp", "c_fc", "bias"): ("mlp.c_fc.bias", SAME),
    ("mlp", "c_proj", "kernel"): ("mlp.c_proj.weight", LINEAR),
    ("mlp", "c_proj", "bias"): ("mlp.c_proj.bias", SAME),
}
_TOP = {
    ("logit_scale",): ("logit_scale", SAME),
    ("logit_bias",): ("logit_bias", SAME),
    ("visual", "patch_embedding"): ("visual.conv1.weight", CONV),
    ("visual", "class_embedding"): ("visual.class_embedding", SAME),
    ("visual", "positional_embedding"): ("visual.positional_embedding", SAME),
    ("visual", "projection"): ("visual.proj", SAME),
    ("text", "token_embedding"): ("token_embedding.weight", SAME),
    ("text", "positional_embedding"): ("positional_embedding", SAME),
    ("text", "projection"): ("text_projection", SAME),
}
_TOWER_PREFIX = {"visual": "visual.transformer.resblocks", "text": "transformer.resblocks"}
_LAYER_NORM_PREFIX = {("visual", "ln_pre"): "visual.ln_pre", ("visual", "ln_post"): "visual.ln_post",
                      ("text", "ln_final"): "ln_final"}
#: Parameters of jclip models that OpenCLIP's CLIP has no place for (nCLIP/xCLIP's prototype heads).
PROTOTYPE_HEADS = ("image_head", "text_head")


def openclip_key_for(path: ParamPath) -> tuple[str, Layout]:
    """The OpenCLIP state-dict key (and the layout change) of jclip parameter `path`."""
    path = tuple(path)
    if path in _TOP:
        return _TOP[path]
    if path[:2] in _LAYER_NORM_PREFIX and len(path) == 3 and path[2] in _LAYER_NORM:
        return f"{_LAYER_NORM_PREFIX[path[:2]]}.{_LAYER_NORM[path[2]]}", SAME
    if len(path) >= 5 and path[1:3] == ("transformer", "blocks") and path[0] in _TOWER_PREFIX:
        prefix = f"{_TOWER_PREFIX[path[0]]}.{int(path[3])}"
        rest = path[4:]
        if rest in _BLOCK:
            name, layout = _BLOCK[rest]
            return f"{prefix}.{name}", layout
        if len(rest) == 2 and rest[0] in ("ln_1", "ln_2") and rest[1] in _LAYER_NORM:
            return f"{prefix}.{rest[0]}.{_LAYER_NORM[rest[1]]}", SAME
    raise KeyError(f"no OpenCLIP key is known for jclip parameter {'/'.join(map(str, path))}")


def strip_openai_metadata(state_dict: Mapping[str, Any]) -> StateDict:
    """The state dict without a DDP `module.` prefix and without OpenAI's scalar metadata entries."""
    source = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    return {k: v for k, v in source.items() if k not in OPENAI_METADATA_KEYS}


def flat_params_from_openclip(state_dict: Mapping[str, Any],
                              target: Mapping[ParamPath, jax.ShapeDtypeStruct]) -> dict[ParamPath, np.ndarray]:
    """jclip parameters {path: array} for the parameter shapes/dtypes `target`, from an OpenCLIP state dict
    (stacked where `target`'s blocks are).

    Raises ValueError listing every unconsumed source key, unfilled target parameter and shape mismatch.
    """
    if stacking.is_stacked(target):
        per_layer = stacking.unstack({path: jax.ShapeDtypeStruct(v.shape, v.dtype) for path, v in target.items()})
        return stacking.to_layout(flat_params_from_openclip(state_dict, per_layer), target)
    source = strip_openai_metadata(state_dict)
    consumed: set[str] = set()
    problems: list[str] = []
    params = {}
    for path, variable in target.items():
        name = "/".join(map(str, path))
        try:
            key, layout = openclip_key_for(path)
        except KeyError as error:
            problems.append(str(error.args[0]))
            continue
        if key not in source:
            problems.append(f"jclip parameter {name} is unfilled: OpenCLIP key {key!r} is missing")
            continue
        consumed.add(key)
        shape = tuple(variable.shape)
        value = layout.to_jclip(np.asarray(source[key]), shape)
        if tuple(value.shape) != shape:
            problems.append(f"shape mismatch for {key!r} -> {name}: got {tuple(np.shape(source[key]))} "
                            f"(as {tuple(value.shape)}), expected {shape}")
            continue
        params[path] = np.array(value, dtype=variable.dtype, order="C")
    unconsumed = sorted(set(source) - consumed)
    if unconsumed:
        problems.append(f"OpenCLIP keys not consumed by the jclip model: {unconsumed}")
    if problems:
        raise ValueError("cannot import the OpenCLIP state dict:\n  " + "\n  ".join(problems))
    return params


def openclip_state_dict_from_flat_params(params: Mapping[ParamPath, Any], model_config: Mapping[str, Any], *,
                                         drop_prototype_heads: bool = False) -> StateDict:
    """OpenCLIP's state dict (torch layouts, NumPy arrays) of jclip parameters {path: array}.

    The result is checked against `openclip_state_shapes(model_config)`. Prototype heads (nCLIP/xCLIP) have
    no OpenCLIP counterpart: they stop the export unless `drop_prototype_heads`.
    """
    params = stacking.unstack(params)  # a scanned model's stacked blocks, layer by layer
    heads = sorted("/".join(map(str, p)) for p in params if p[0] in PROTOTYPE_HEADS)
    if heads and not drop_prototype_heads:
        raise ValueError("OpenCLIP's CLIP has no prototype heads; these parameters would be lost: "
                         f"{heads[:4]}{' ...' if len(heads) > 4 else ''} (pass drop_prototype_heads to export "
                         "the towers without them)")
    state_dict = {}
    problems = []
    for path, value in params.items():
        if path[0] in PROTOTYPE_HEADS:
            continue
        try:
            key, layout = openclip_key_for(path)
        except KeyError as error:
            problems.append(str(error.args[0]))
            continue
        state_dict[key] = np.array(layout.to_torch(np.asarray(value)), order="C")
    if problems:
        raise ValueError("cannot export to OpenCLIP:\n  " + "\n  ".join(problems))
    check_state_dict(state_dict, openclip_state_shapes(model_config), "the exported OpenCLIP state dict is wrong")
    return state_dict


def _flat_param_shapes(model: CLIPModel) -> dict[ParamPath, Any]:
    return {tuple(path): variable for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def params_from_openclip_state_dict(state_dict: Mapping[str, Any], model: CLIPModel) -> nnx.State:
    """The model's `nnx.Param` state filled from an OpenCLIP state dict; `model` is unchanged.

    Values are host NumPy arrays in each parameter's dtype; apply with `nnx.update(model, params)`.
    """
    variables = _flat_param_shapes(model)
    params = flat_params_from_openclip(state_dict, variables)
    return nnx.from_flat_state([(path, variables[path].replace(value)) for path, value in params.items()])


def load_openclip_state_dict(state_dict: Mapping[str, Any], model: CLIPModel) -> CLIPModel:
    """Copies an OpenCLIP state dict into `model` in place, as device arrays."""
    params = params_from_openclip_state_dict(state_dict, model)
    nnx.update(model, jax.tree.map(jnp.asarray, params))
    return model
