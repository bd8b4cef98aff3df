"""jclip.models: the CLIP two-tower model in Flax NNX (OpenCLIP's architecture), presets and builders."""

from jclip.models.clip_model import (
    CLIP_INIT_LOGIT_SCALE,
    SIGLIP_INIT_LOGIT_BIAS,
    SIGLIP_INIT_LOGIT_SCALE,
    TOWER_ATTRIBUTES,
    CLIPModel,
    abstract_batch,
    abstract_model,
    build_model,
    count_params,
    extra_caption_field,
    extra_fields_read,
    input_fields,
    missing_output_hint,
    model_output_names,
)
from jclip.models.towers import Tower, known_kinds, register_tower, tokenizer_spec, tower_for
from jclip.models.presets import PRESETS, get_preset, pretrained_text_tower
from jclip.models.text import TextTransformer
from jclip.models.vision import VisionTransformer

__all__ = [
    "CLIP_INIT_LOGIT_SCALE",
    "SIGLIP_INIT_LOGIT_BIAS",
    "SIGLIP_INIT_LOGIT_SCALE",
    "TOWER_ATTRIBUTES",
    "CLIPModel",
    "PRESETS",
    "TextTransformer",
    "VisionTransformer",
    "Tower",
    "abstract_batch",
    "abstract_model",
    "build_model",
    "count_params",
    "get_preset",
    "pretrained_text_tower",
    "extra_caption_field",
    "extra_fields_read",
    "input_fields",
    "missing_output_hint",
    "known_kinds",
    "model_output_names",
    "register_tower",
    "tokenizer_spec",
    "tower_for",
]
