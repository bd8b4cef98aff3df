"""The two-tower CLIP model (image ViT + causal text Transformer) and its builders.

Architecturally identical to OpenCLIP's `CLIP` (mlfoundations/open_clip `model.py`): the towers of
`jclip.models.vision` and `jclip.models.text`, a learnable `logit_scale` (stored as its log, init ln(1/0.07))
and, for SigLIP-style sigmoid losses only, a learnable `logit_bias` (Zhai et al. 2023 initialise the scale at
ln 10 and the bias at -10). Model configs are plain dicts (or ml_collections ConfigDicts); see
`jclip.models.presets`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jclip.models.heads import PrototypeHead, head_config
from jclip.models.layers import l2_normalize, logical_param
from jclip.models.text import TextTransformer
from jclip.models.vision import VisionTransformer

CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)  # Radford et al. 2021
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)  # Zhai et al. 2023
SIGLIP_INIT_LOGIT_BIAS = -10.0

VISION_KEYS = {"image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio", "in_channels"}
TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
MODEL_KEYS = {"name", "embed_dim", "quick_gelu", "vision", "text", "init_logit_scale", "init_logit_bias",
              "dtype", "param_dtype", "remat", "prototype_heads", "embedding"}
#: What `encode_image`/`encode_text` return, the space evaluations and teachers compare in.
EMBEDDINGS = ("projection", "prototypes")


def check_embedding(embedding: str, prototype_heads: Any) -> None:
    """Raises ValueError unless `embedding` is known and, for "prototypes", the model has prototype heads."""
    if embedding not in EMBEDDINGS:
        raise ValueError(f"model.embedding must be one of {EMBEDDINGS}, got {embedding!r}")
    if embedding == "prototypes" and not prototype_heads:
        raise ValueError("model.embedding='prototypes' compares the prototype heads' logits; set model.prototype_heads")


class CLIPModel(nnx.Module):
    """Image and text towers projecting into a shared embedding space, plus the logit scale (and bias)."""

    def __init__(self, *, embed_dim: int, vision: Mapping[str, Any], text: Mapping[str, Any],
                 quick_gelu: bool = False, init_logit_scale: float = CLIP_INIT_LOGIT_SCALE,
                 init_logit_bias: float | None = None, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, remat: bool = False,
                 prototype_heads: Mapping[str, int] | None = None, embedding: str = "projection",
                 rngs: nnx.Rngs) -> None:
        check_embedding(embedding, prototype_heads)
        self.embedding = embedding
        common = dict(output_dim=embed_dim, quick_gelu=quick_gelu, remat=remat, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs)
        self.embed_dim = embed_dim
        self.visual = VisionTransformer(**dict(vision), **common)
        self.text = TextTransformer(**dict(text), **common)
        self.logit_scale = logical_param(rngs, nnx.initializers.constant(init_logit_scale), (), (), param_dtype)
        self.logit_bias = (
            None if init_logit_bias is None
            else logical_param(rngs, nnx.initializers.constant(init_logit_bias), (), (), param_dtype)
        )
        # nCLIP/xCLIP prototype heads on the projected features (None: a plain CLIP model).
        heads = dict(prototype_heads or {})
        self.image_head = None if not heads else PrototypeHead(embed_dim, **heads, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.text_head = None if not heads else PrototypeHead(embed_dim, **heads, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def encode_image(self, images: jax.Array, normalize: bool = False) -> jax.Array:
        """Images [batch, H, W, 3] (NHWC, normalised) -> image embeddings, float32: the projected features
        [batch, embed_dim], or with `embedding="prototypes"` the prototype logits [batch, K] (nCLIP)."""
        features = self.visual(images)
        if self.embedding == "prototypes":
            features = self.image_head(features)
        return l2_normalize(features) if normalize else features

    def encode_text(self, token_ids: jax.Array, normalize: bool = False) -> jax.Array:
        """Token ids [batch, length] -> text embeddings, float32 (the space as in `encode_image`)."""
        features = self.text(token_ids)
        if self.embedding == "prototypes":
            features = self.text_head(features)
        return l2_normalize(features) if normalize else features

    def __call__(self, images: jax.Array, token_ids: jax.Array) -> dict[str, jax.Array]:
        """Both towers. Returns `image_features`/`text_features` (projected), `image_embeddings`/
        `text_embeddings` (L2-normalised), `logit_scale` (the raw log value), `logit_bias` if present, and
        `image_prototype_logits`/`text_prototype_logits` [batch, K] when the model has prototype heads."""
        image_features = self.visual(images)
        text_features = self.text(token_ids)
        outputs = {
            "image_features": image_features,
            "text_features": text_features,
            "image_embeddings": l2_normalize(image_features),
            "text_embeddings": l2_normalize(text_features),
            "logit_scale": self.logit_scale[...].astype(jnp.float32),
        }
        if self.logit_bias is not None:
            outputs["logit_bias"] = self.logit_bias[...].astype(jnp.float32)
        if self.image_head is not None:
            outputs["image_prototype_logits"] = self.image_head(image_features)
            outputs["text_prototype_logits"] = self.text_head(text_features)
        return outputs


def _as_dict(config: Any) -> dict[str, Any]:
    """A plain dict from a dict or an ml_collections ConfigDict."""
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dict(config)


def _check_keys(config: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(config) - allowed
    if unknown:
        raise ValueError(f"unknown {where} config keys {sorted(unknown)}; allowed: {sorted(allowed)}")


def _dtype(value: Any) -> Any:
    return jnp.dtype(value) if value is not None else jnp.float32


def build_model(model_config: Mapping[str, Any], rngs: nnx.Rngs) -> CLIPModel:
    """Builds a `CLIPModel` from a model config (a preset from `jclip.models.presets`, possibly edited).

    Keys: `embed_dim`, `vision`, `text` (required); `quick_gelu` (False), `init_logit_scale` (ln(1/0.07)),
    `init_logit_bias` (None: no bias), `dtype` (compute dtype, "float32"), `param_dtype` ("float32"),
    `remat` (False), `prototype_heads` (None, or {num_prototypes, hidden_dim, bottleneck_dim, layers}
    for nCLIP/xCLIP: see `jclip.models.heads`), `embedding` ("projection", or "prototypes": evaluations
    and teachers compare the heads' prototype logits, for nCLIP alone), `name` (ignored).
    """
    config = _as_dict(model_config)
    _check_keys(config, MODEL_KEYS, "model")
    vision, text = _as_dict(config["vision"]), _as_dict(config["text"])
    _check_keys(vision, VISION_KEYS, "vision")
    _check_keys(text, TEXT_KEYS, "text")
    init_logit_bias = config.get("init_logit_bias")
    return CLIPModel(
        embed_dim=int(config["embed_dim"]),
        vision=vision,
        text=text,
        quick_gelu=bool(config.get("quick_gelu", False)),
        init_logit_scale=float(config.get("init_logit_scale", CLIP_INIT_LOGIT_SCALE)),
        init_logit_bias=None if init_logit_bias is None else float(init_logit_bias),
        dtype=_dtype(config.get("dtype")),
        param_dtype=_dtype(config.get("param_dtype")),
        remat=bool(config.get("remat", False)),
        prototype_heads=head_config(config.get("prototype_heads")),
        embedding=str(config.get("embedding") or "projection"),
        rngs=rngs,
    )


_ARCHITECTURE_DEFAULTS = {
    "vision": {"head_width": 64, "mlp_ratio": 4.0, "in_channels": 3},
    "text": {"mlp_ratio": 4.0},
}


def architecture(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """What fixes the meaning of a model's weights: the tower shapes, the activation and the embedding
    width (not compute options, initial values, or optional parameters such as the logit bias and the
    prototype heads, which weight loading compares by name)."""
    config = _as_dict(model_config)
    result: dict[str, Any] = {"embed_dim": int(config["embed_dim"]), "quick_gelu": bool(config.get("quick_gelu", False))}
    for tower in ("vision", "text"):
        values = {**_ARCHITECTURE_DEFAULTS[tower], **_as_dict(config[tower])}
        result.update({f"{tower}.{key}": tuple(value) if isinstance(value, (list, tuple)) else value
                       for key, value in sorted(values.items())})
    size = result["vision.image_size"]
    result["vision.image_size"] = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    return result


def architecture_differences(given: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """`key: given vs expected` for every architecture entry where two model configs differ."""
    a, b = architecture(given), architecture(expected)
    return [f"{key}: {a.get(key)!r} vs {b.get(key)!r}" for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


def abstract_model(model_config: Mapping[str, Any]) -> CLIPModel:
    """The model with `jax.ShapeDtypeStruct`s instead of weights (nothing allocated)."""
    return nnx.eval_shape(lambda: build_model(model_config, nnx.Rngs(0)))


def count_params(model_config: Mapping[str, Any]) -> int:
    """Number of trainable parameters (including `logit_scale`/`logit_bias`), counted without allocating."""
    params = nnx.state(abstract_model(model_config), nnx.Param)
    return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree.leaves(params)))
