"""Files of the PyTorch world, read and written for `python -m jclip.convert`, without PyTorch.

- OpenCLIP: a folder with `open_clip_config.json` (`model_cfg` + `preprocess_cfg`) and
  `open_clip_model.safetensors` or `open_clip_pytorch_model.bin`, what `open_clip.create_model_and_transforms(
  "local-dir:FOLDER")` and `open_clip.get_tokenizer("local-dir:FOLDER")` load (open_clip 3.x `factory.py`).
- transformers: a `CLIPModel.from_pretrained(FOLDER)` folder: config.json, model.safetensors and the
  `CLIPImageProcessor`'s preprocessor_config.json.
- Imports also take bare state-dict files (.safetensors, .pt, .bin, .pth) in OpenCLIP/OpenAI key names.
Each folder also gets `jclip_preprocessing.json`: the tokenizer and image preprocessing that reproduce
jclip's embeddings. A model with LoRA adapters is exported with them merged into its kernels.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from jclip.convert import huggingface, openclip, torch_files
from jclip.convert.params_io import HostModel, abstract_params, flatten, preprocessing_spec, without_lora
from jclip.data import tokenizer
from jclip.models import presets, towers

OPENCLIP_CONFIG = "open_clip_config.json"
OPENCLIP_WEIGHTS = {"safetensors": "open_clip_model.safetensors", "pt": "open_clip_pytorch_model.bin"}
HF_CONFIG, HF_WEIGHTS, HF_PREPROCESSOR = "config.json", "model.safetensors", "preprocessor_config.json"
PREPROCESSING = "jclip_preprocessing.json"
_TORCH_SUFFIXES = (".pt", ".bin", ".pth")


def read_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """A state dict from a .safetensors file or a torch.save file (.pt, .bin, .pth), as NumPy arrays."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix in _TORCH_SUFFIXES:
        return torch_files.load_torch_state_dict(path)
    raise ValueError(f"{path}: unknown weights format (expected .safetensors, .pt, .bin or .pth)")


def _new_folder(output: str | pathlib.Path) -> pathlib.Path:
    output = pathlib.Path(output).absolute()
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty; choose a new folder")
    output.mkdir(parents=True, exist_ok=True)
    return output


def _write_json(path: pathlib.Path, value: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def check_weight_format(model_config: Mapping[str, Any], weight_format: str) -> None:
    """ValueError unless both towers' kinds can be written to and read from `weight_format` (each tower
    declares its `weight_formats`, jclip.models.towers)."""
    for modality in towers.MODALITIES:
        tower = towers.tower_for(model_config, modality)
        if weight_format not in tower.weight_formats:
            raise ValueError(f"model.{modality}.kind {tower.kind!r} has no {weight_format!r} weight layout; it has "
                             f"{list(tower.weight_formats) or 'none'}")


def _openclip_state_dict(model: HostModel, drop_prototype_heads: bool) -> dict[str, np.ndarray]:
    model = without_lora(model)
    check_weight_format(model.model_config, "openclip")
    return openclip.openclip_state_dict_from_flat_params(model.params, model.model_config,
                                                         drop_prototype_heads=drop_prototype_heads)


def export_openclip(model: HostModel, output: str | pathlib.Path, *, weights: str = "safetensors",
                    drop_prototype_heads: bool = False) -> pathlib.Path:
    """Writes an OpenCLIP folder (weights as `weights`: "safetensors" or "pt"); returns the weights file."""
    if weights not in OPENCLIP_WEIGHTS:
        raise ValueError(f"weights must be one of {sorted(OPENCLIP_WEIGHTS)}, got {weights!r}")
    model = without_lora(model)
    state_dict = _openclip_state_dict(model, drop_prototype_heads)
    output = _new_folder(output)
    path = output / OPENCLIP_WEIGHTS[weights]
    if weights == "safetensors":
        save_file(state_dict, str(path), metadata={"format": "pt"})
    else:
        torch_files.save_torch_state_dict(state_dict, path)
    spec = model.preprocessing
    height, width = spec["image_size"]
    _write_json(output / OPENCLIP_CONFIG, {
        "model_cfg": openclip.openclip_model_config(model.model_config),
        "preprocess_cfg": {"size": height if height == width else [height, width], "mode": "RGB",
                           "mean": list(spec["mean"]), "std": list(spec["std"]), "interpolation": "bicubic",
                           "resize_mode": "shortest", "fill_color": 0},
    })
    _write_json(output / PREPROCESSING, spec)
    return path


def export_hf(model: HostModel, output: str | pathlib.Path, *, drop_logit_bias: bool = False,
              drop_prototype_heads: bool = False) -> pathlib.Path:
    """Writes a transformers `CLIPModel` folder; returns the weights file. A logit bias (sigmoid-loss
    models) has no place in CLIPModel: it stops the export unless `drop_logit_bias`, and is then kept in
    jclip_preprocessing.json as `dropped_logit_bias`."""
    check_weight_format(model.model_config, "hf")
    model = without_lora(model)
    state_dict = _openclip_state_dict(model, drop_prototype_heads)
    config = dict(model.model_config)
    spec = dict(model.preprocessing)
    if "logit_bias" in state_dict and drop_logit_bias:
        spec["dropped_logit_bias"] = float(state_dict.pop("logit_bias"))
        config.pop("init_logit_bias", None)
    hf_state_dict = huggingface.hf_state_dict_from_openclip(state_dict, config)
    output = _new_folder(output)
    path = output / HF_WEIGHTS
    save_file(hf_state_dict, str(path), metadata={"format": "pt"})
    _write_json(output / HF_CONFIG, huggingface.hf_config(config, spec))
    _write_json(output / HF_PREPROCESSOR, huggingface.hf_image_processor_config(spec))
    _write_json(output / PREPROCESSING, spec)
    return path


def _host_model(model_config: dict[str, Any], state_dict: Mapping[str, np.ndarray],
                preprocessing: dict[str, Any]) -> HostModel:
    check_weight_format(model_config, "openclip")
    target = flatten(abstract_params(model_config))
    params = openclip.flat_params_from_openclip(state_dict, target)
    return HostModel(model_config, params, preprocessing)


def _folder_weights(folder: pathlib.Path, names: tuple[str, ...]) -> pathlib.Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder} has none of the weights files {list(names)}")


def _preprocessing_with(model_config: dict[str, Any], mean: Any, std: Any) -> dict[str, Any]:
    """The preprocessing of imported weights: CLIP's tokenizer where the vocabulary is CLIP's, the source's
    mean and std where it states them."""
    vocab_size = model_config["text"]["vocab_size"]
    spec = preprocessing_spec(model_config, "clip" if vocab_size == tokenizer.VOCAB_SIZE else "unknown: the source's")
    if mean is not None:
        spec["mean"], spec["std"] = [float(m) for m in mean], [float(s) for s in std]
    return spec


def import_hf(folder: pathlib.Path) -> HostModel:
    """A transformers `CLIPModel` folder (config.json + model.safetensors or pytorch_model.bin)."""
    config = json.loads((folder / HF_CONFIG).read_text())
    model_config = huggingface.model_config_from_hf(config)
    vocab_size = model_config["text"]["vocab_size"]
    eos = config.get("text_config", {}).get("eos_token_id", 49407)  # transformers' default
    if eos not in (2, vocab_size - 1):  # 2: transformers' legacy argmax pooling
        raise ValueError(f"the text tower pools at the end token {eos}, jclip's at the largest id {vocab_size - 1}")
    state_dict = huggingface.openclip_state_dict_from_hf(
        read_state_dict(_folder_weights(folder, (HF_WEIGHTS, "pytorch_model.bin"))), model_config)
    processor = {}
    if (folder / HF_PREPROCESSOR).is_file():
        processor = json.loads((folder / HF_PREPROCESSOR).read_text())
    spec = _preprocessing_with(model_config, processor.get("image_mean"), processor.get("image_std"))
    return _host_model(model_config, state_dict, spec)


def import_openclip(source: pathlib.Path, *, openclip_config: str | pathlib.Path | None = None,
                    preset: str | None = None, quick_gelu: bool | None = None, head_width: int = 64) -> HostModel:
    """An OpenCLIP/OpenAI state dict file, or an OpenCLIP folder (open_clip_config.json + weights).

    The architecture comes from, in order: the folder's or the given OpenCLIP config JSON; a jclip preset
    (`preset`, with `quick_gelu`); the state dict's shapes (heads of `head_width`, `quick_gelu` required
    unless the file is OpenAI's, which always uses quick-GELU).
    """
    preprocess: dict[str, Any] = {}
    if source.is_dir():
        openclip_config = openclip_config or source / OPENCLIP_CONFIG
        source = _folder_weights(source, (*OPENCLIP_WEIGHTS.values(), "open_clip_pytorch_model.safetensors",
                                          "open_clip_pytorch_model.pth"))
    state_dict = read_state_dict(source)
    if any(key.startswith(("vision_model.", "text_model.")) for key in state_dict):
        raise ValueError(f"{source} holds a transformers CLIPModel state dict: import its folder (with config.json)")
    is_openai = any(key in state_dict for key in openclip.OPENAI_METADATA_KEYS)
    if openclip_config is not None:
        saved = json.loads(pathlib.Path(openclip_config).read_text())
        model_config = openclip.model_config_from_openclip(saved)
        preprocess = saved.get("preprocess_cfg", {})
        if quick_gelu is not None:
            model_config["quick_gelu"] = quick_gelu
    elif preset is not None:
        model_config = presets.get_preset(preset)
        model_config.pop("name")
        if quick_gelu is None:
            raise ValueError("say --quick_gelu=true or false: the weights do not show the activation "
                             "(true for OpenAI's weights and OpenCLIP's -quickgelu models)")
        model_config["quick_gelu"] = quick_gelu
        if "logit_bias" in state_dict:
            model_config["init_logit_bias"] = float(np.asarray(state_dict["logit_bias"]))
    else:
        if quick_gelu is None and not is_openai:
            raise ValueError("the architecture is read off the weights, which do not show the activation: say "
                             "--quick_gelu=true (OpenAI's weights, OpenCLIP's -quickgelu models) or false, or "
                             "give --openclip_config")
        model_config = openclip.model_config_from_openclip_state_dict(
            state_dict, quick_gelu=True if quick_gelu is None else quick_gelu, head_width=head_width)
    spec = _preprocessing_with(model_config, preprocess.get("mean"), preprocess.get("std"))
    return _host_model(model_config, state_dict, spec)


def import_model(source: str | pathlib.Path, **options: Any) -> HostModel:
    """Any supported source: a transformers folder, an OpenCLIP folder or a state dict file."""
    source = pathlib.Path(source)
    if not source.exists():
        raise FileNotFoundError(f"no such file or folder: {source}")
    if source.is_dir() and (source / HF_CONFIG).is_file() and not (source / OPENCLIP_CONFIG).is_file():
        unused = {k: v for k, v in options.items() if v is not None and k != "head_width"}
        if unused:
            raise ValueError(f"a transformers folder carries its own config; drop {sorted(unused)}")
        return import_hf(source)
    return import_openclip(source, **options)
