"""A jclip model's parameters on the host, with its model config and preprocessing: what every converter
reads and writes. Sources are params-only exports (`jclip.checkpoint.save_params`) and training checkpoints
(a workdir, its checkpoints/ folder or a step folder). A model with LoRA adapters (jclip.models.lora) is read
as it is and merged (`without_lora`) by every writer: exports are plain models. Blocks are per layer on the host
(OpenCLIP's layout): a scanned run's stacked blocks (`model.scan_layers`, jclip.models.stacking) are split on
reading, and `scan_layers`, a compute option, is not part of an export's model config."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx, traverse_util

from jclip import checkpoint
from jclip.data.tokenizer import START_OF_TEXT, VOCAB_SIZE
from jclip.data.ops.image import CLIP_MEAN, CLIP_STD
from jclip.models import clip_model, stacking, towers
from jclip.models.lora import merge_lora, plain_lora_config

ParamPath = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class HostModel:
    """Parameters {path: NumPy array} (paths as in the NNX model, blocks per layer), the model config, the
    preprocessing."""

    model_config: dict[str, Any]
    params: dict[ParamPath, np.ndarray]
    preprocessing: dict[str, Any]


def plain_model_config(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """The model config as JSON-ready plain data, without compute options (dtype, remat, scan_layers, name)."""
    config = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    compute_options = ("dtype", "param_dtype", "remat", "scan_layers", "name")
    config = {k: v for k, v in config.items() if k not in compute_options and v is not None}
    for tower in ("vision", "text"):
        config[tower] = dict(config[tower])
    size = config["vision"]["image_size"]
    config["vision"]["image_size"] = int(size) if isinstance(size, (int, np.integer)) else [int(s) for s in size]
    if config.get("prototype_heads"):
        config["prototype_heads"] = dict(config["prototype_heads"])
    config.pop("lora", None)
    lora = plain_lora_config(model_config)  # absent when off (rank 0)
    if lora is not None:
        config["lora"] = lora
    return config


def preprocessing_spec(model_config: Mapping[str, Any], tokenizer: str | None = None) -> dict[str, Any]:
    """How jclip turns images and captions into model inputs, stated for users of an exported model.

    Follows `jclip.data.ops.image` (OpenAI CLIP's evaluation transform) and `jclip.data.tokenizer`; the
    tokenizer is the text tower's (`model.text.tokenizer`) unless given.
    """
    tokenizer = towers.tokenizer_spec(model_config) if tokenizer is None else tokenizer
    size = model_config["vision"]["image_size"]
    height, width = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    vocab_size = int(model_config["text"]["vocab_size"])
    return {
        "image_size": [int(height), int(width)],
        "resize": "bicubic resize of the shorter side to the image size, then centre crop (OpenAI CLIP)",
        "rescale": "RGB values / 255",
        "mean": list(CLIP_MEAN),
        "std": list(CLIP_STD),
        "tokenizer": tokenizer,
        "context_length": int(model_config["text"]["context_length"]),
        "vocab_size": vocab_size,
        "start_token": START_OF_TEXT if tokenizer == "clip" and vocab_size == VOCAB_SIZE else None,
        # The text tower pools at the largest id, which jclip's tokenizers give the end token.
        "end_token": vocab_size - 1,
        "pad_token": 0,
        "text_cleaning": "ftfy, HTML unescape, whitespace collapsed, lower-cased" if tokenizer == "clip" else tokenizer,
    }


def flatten(params: Mapping[Any, Any]) -> dict[ParamPath, Any]:
    """A model-structured pure dict -> {path: leaf}."""
    return traverse_util.flatten_dict(dict(params))


def unflatten(params: Mapping[ParamPath, Any]) -> dict[Any, Any]:
    return traverse_util.unflatten_dict(dict(params))


def abstract_params(model_config: Mapping[str, Any], sharding: jax.sharding.Sharding | None = None) -> dict[Any, Any]:
    """The model's parameters as ShapeDtypeStructs (a pure dict), placed on `sharding` (default: one
    host device)."""
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    state = nnx.state(clip_model.abstract_model(model_config), nnx.Param)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), nnx.to_pure_dict(state))


def read(path: str | pathlib.Path, step: int | None = None) -> HostModel:
    """A params export or a training checkpoint (latest step, or `step`) as host arrays."""
    if checkpoint.is_params_export(path):
        if step is not None:
            raise ValueError(f"{path} is a params export, which has no steps; drop --step")
        info = checkpoint.load_export_info(path)
        params = checkpoint.load_params(path, abstract_params(info["model"]))
        return HostModel(info["model"], _to_host(params), info.get("preprocessing") or preprocessing_spec(info["model"]))
    import ml_collections

    from jclip import parallel, restore
    from jclip.errors import ConfigError

    # One host device: conversion reads the whole model; the default rules then shard nothing.
    config = ml_collections.ConfigDict({"mesh": {"data": 1, "fsdp": 1, "tensor": 1}, "sharding_rules": None})
    mesh = parallel.make_mesh(dict(config.mesh), devices=jax.local_devices(backend="cpu")[:1])
    try:
        _, params, saved = restore.restore_run(str(path), step, config, mesh)
    except ConfigError as error:
        raise FileNotFoundError(str(error)) from error
    model_config = plain_model_config(saved.model)
    return HostModel(model_config, _to_host(params), preprocessing_spec(model_config))


def _to_host(params: Any) -> dict[ParamPath, np.ndarray]:
    """Host arrays, blocks per layer."""
    return stacking.unstack({path: np.asarray(jax.device_get(value)) for path, value in flatten(params).items()})


def build(model: HostModel) -> clip_model.CLIPModel:
    """The NNX `CLIPModel` holding `model`'s parameters (on the default device), e.g. for inference:
    `build(read(export)).encode_image(images)`."""
    import jax.numpy as jnp

    module = clip_model.build_model(model.model_config, nnx.Rngs(0))
    nnx.update(module, unflatten({path: jnp.asarray(value) for path, value in model.params.items()}))
    return module


def without_lora(model: HostModel) -> HostModel:
    """`model` with its LoRA adapters merged into the kernels (W + scale·A·B, `jclip.models.lora.merge_lora`)
    and a model config without `lora`. ValueError for adapters that the model config does not announce."""
    params, model_config = merge_lora(unflatten(model.params), model.model_config)
    return HostModel(model_config, flatten(params), model.preprocessing)


def write(directory: str | pathlib.Path, model: HostModel, source: Mapping[str, Any]) -> pathlib.Path:
    """Saves `model` as a params export (loadable by `read` and by `config.init_from`); `source` says where
    the parameters came from (JSON). LoRA adapters are merged into the kernels first (`without_lora`)."""
    model = without_lora(model)
    info = {"model": plain_model_config(model.model_config), "preprocessing": dict(model.preprocessing),
            "source": dict(source)}
    return checkpoint.save_params(directory, unflatten(model.params), info)
