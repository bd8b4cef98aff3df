"""The two-tower CLIP model (image ViT + causal text Transformer) and its builders.

Architecturally identical to OpenCLIP's `CLIP` (mlfoundations/open_clip `model.py`): the towers of
`jclip.models.vision` and `jclip.models.text`, a learnable `logit_scale` (stored as its log, init ln(1/0.07))
and, for SigLIP-style sigmoid losses only, a learnable `logit_bias` (Zhai et al. 2023 initialise the scale at
ln 10 and the bias at -10). Model configs are plain dicts (or ml_collections ConfigDicts); see
`jclip.models.presets`.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jclip.models.heads import PrototypeHead, head_config
from jclip.models.layers import l2_normalize, logical_param
from jclip.models import towers
from jclip.models.bert import BERT_TEXT
from jclip.models.decoder import GEMMA3_TEXT, LLAMA_TEXT
from jclip.models.text import CLIP_TEXT
from jclip.models.vision import VIT

CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)  # Radford et al. 2021
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)  # Zhai et al. 2023
SIGLIP_INIT_LOGIT_BIAS = -10.0

MODEL_KEYS = {"name", "embed_dim", "quick_gelu", "vision", "text", "init_logit_scale", "init_logit_bias",
              "dtype", "param_dtype", "remat", "scan_layers", "prototype_heads", "embedding", "lora"}
#: The model's attribute (and parameter-path prefix) of each modality's tower.
TOWER_ATTRIBUTES = {"vision": "visual", "text": "text"}
#: The towers jclip ships (importing their modules registers them): OpenCLIP's ViT and causal text Transformer,
#: and the pretrained text towers.
BUILT_IN_TOWERS = (VIT, CLIP_TEXT, BERT_TEXT, GEMMA3_TEXT, LLAMA_TEXT)
#: What `encode_image`/`encode_text` return, the space evaluations and teachers compare in.
EMBEDDINGS = ("projection", "prototypes")
#: Outputs the model returns unless asked for fewer (the pooled features, their embeddings, the scale).
BASE_OUTPUTS = ("image_features", "text_features", "image_embeddings", "text_embeddings", "logit_scale")
#: A batch field `<prefix>_token_ids` [batch, ..., length] (extra captions, e.g. hard negatives) can be
#: embedded by the text tower as the output `<prefix>_text_embeddings` [batch, ..., embed_dim], with its
#: token outputs `<prefix>_text_tokens` [batch, ..., length, embed_dim] and `<prefix>_text_token_mask`.
EXTRA_CAPTIONS_SUFFIX = "_token_ids"
EXTRA_EMBEDDINGS_SUFFIX = "_text_embeddings"
EXTRA_TOKENS_SUFFIX = "_text_tokens"
EXTRA_TOKEN_MASK_SUFFIX = "_text_token_mask"
EXTRA_OUTPUT_SUFFIXES = (EXTRA_EMBEDDINGS_SUFFIX, EXTRA_TOKENS_SUFFIX, EXTRA_TOKEN_MASK_SUFFIX)


def extra_caption_field(output: str) -> str | None:
    """The batch field `<prefix>_token_ids` an extra-caption output (`<prefix>_text_embeddings`, `..._tokens`,
    `..._token_mask`) is computed from; None for any other output (the towers' own `text_*` included)."""
    for suffix in EXTRA_OUTPUT_SUFFIXES:
        prefix = output.removesuffix(suffix)
        if prefix != output and prefix and prefix != "text" and not prefix.endswith("_text"):
            return prefix + EXTRA_CAPTIONS_SUFFIX
    return None


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
                 param_dtype: Any = jnp.float32, remat: bool = False, scan_layers: bool = False,
                 prototype_heads: Mapping[str, int] | None = None, embedding: str = "projection",
                 lora: Mapping[str, Any] | None = None, rngs: nnx.Rngs) -> None:
        check_embedding(embedding, prototype_heads)
        self.embedding = embedding
        common = dict(output_dim=embed_dim, quick_gelu=quick_gelu, remat=remat, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs)
        self.embed_dim = embed_dim
        self.vision_tower = towers.tower_for({"vision": vision}, "vision")
        self.text_tower = towers.tower_for({"text": text}, "text")
        # LoRA adapters (jclip.models.lora) and stacked layers (model.scan_layers), passed only when on so that
        # towers without them still build.
        options = {}
        for modality, config in (("vision", vision), ("text", text)):
            section = {"lora": lora, "scan_layers": scan_layers, modality: config}
            adapters = towers.tower_lora(section, modality)
            options[modality] = {**({"lora": adapters} if adapters else {}),
                                 **({"scan_layers": True} if towers.tower_scan(section, modality) else {})}
        self.visual = self.vision_tower.module(**self.vision_tower.build_args(vision), **common, **options["vision"])
        self.text = self.text_tower.module(**self.text_tower.build_args(text), **common, **options["text"])
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

    def __call__(self, batch: Mapping[str, jax.Array], outputs: Collection[str] | None = None) -> dict[str, jax.Array]:
        """The model on a batch: each tower reads its field (`images`, `token_ids`); returns `outputs` (by
        default `BASE_OUTPUTS`, plus `logit_bias` and the prototype logits when the model has them).

        Outputs: `image_features`/`text_features` (projected), `image_embeddings`/`text_embeddings`
        (L2-normalised), `logit_scale` (the raw log value), `logit_bias`, `image_prototype_logits`/
        `text_prototype_logits` [batch, K]; on request only: `image_tokens` [batch, patches, embed_dim],
        `text_tokens` [batch, length, embed_dim] with `text_token_mask` [batch, length] (see the towers'
        `encode`), and for a batch field `<prefix>_token_ids` [batch, ..., length] `<prefix>_text_embeddings`
        [batch, ..., embed_dim], `<prefix>_text_tokens` [batch, ..., length, embed_dim] and
        `<prefix>_text_token_mask` [batch, ..., length] (each caption field through the text tower once).
        Only what is asked for is computed.
        """
        if not isinstance(batch, Mapping):
            raise TypeError(f"the model takes a batch mapping ({{'images': ..., 'token_ids': ...}}), got "
                            f"{type(batch).__name__}")
        if isinstance(outputs, str) or not (outputs is None or isinstance(outputs, Collection)):
            raise TypeError(f"outputs must be a collection of output names, got {type(outputs).__name__}")
        wanted = set(self.default_outputs() if outputs is None else outputs)
        unknown = sorted(wanted - self.output_names(batch))
        if unknown:
            raise ValueError(f"the model cannot produce {unknown}; it produces {sorted(self.output_names(batch))}")
        image = self.visual.encode(batch[self.vision_tower.input_field], tokens="image_tokens" in wanted)
        text = self.text.encode(batch[self.text_tower.input_field],
                                tokens=bool({"text_tokens", "text_token_mask"} & wanted))
        result = {
            "image_features": image["features"],
            "text_features": text["features"],
            "image_embeddings": l2_normalize(image["features"]),
            "text_embeddings": l2_normalize(text["features"]),
            "logit_scale": self.logit_scale[...].astype(jnp.float32),
        }
        if "image_tokens" in wanted:
            result["image_tokens"] = image["tokens"]
        if "text_tokens" in wanted or "text_token_mask" in wanted:
            result["text_tokens"], result["text_token_mask"] = text["tokens"], text["token_mask"]
        if self.logit_bias is not None:
            result["logit_bias"] = self.logit_bias[...].astype(jnp.float32)
        if self.image_head is not None and wanted & {"image_prototype_logits", "text_prototype_logits"}:
            result["image_prototype_logits"] = self.image_head(image["features"])
            result["text_prototype_logits"] = self.text_head(text["features"])
        extra_fields: dict[str, set[str]] = {}
        for name in wanted:
            field = extra_caption_field(name)
            if field is not None:
                extra_fields.setdefault(field, set()).add(name)
        for field, names in sorted(extra_fields.items()):
            result.update(self._encode_extra_captions(batch[field], field.removesuffix(EXTRA_CAPTIONS_SUFFIX), names))
        return {name: result[name] for name in sorted(wanted)}

    def _encode_extra_captions(self, token_ids: jax.Array, prefix: str, names: set[str]) -> dict[str, jax.Array]:
        """The `<prefix>_text_*` outputs in `names` for extra captions [batch, ..., length], in one text pass."""
        lead, length = token_ids.shape[:-1], token_ids.shape[-1]
        with_tokens = bool({prefix + EXTRA_TOKENS_SUFFIX, prefix + EXTRA_TOKEN_MASK_SUFFIX} & names)
        text = self.text.encode(token_ids.reshape(-1, length), tokens=with_tokens)
        out = {prefix + EXTRA_EMBEDDINGS_SUFFIX: l2_normalize(text["features"]).reshape(*lead, -1)}
        if with_tokens:
            out[prefix + EXTRA_TOKENS_SUFFIX] = text["tokens"].reshape(*lead, length, -1)
            out[prefix + EXTRA_TOKEN_MASK_SUFFIX] = text["token_mask"].reshape(*lead, length)
        return {name: value for name, value in out.items() if name in names}

    def default_outputs(self) -> tuple[str, ...]:
        """What `__call__` returns when not told: `BASE_OUTPUTS` and the bias and prototype logits if any."""
        return default_outputs(self.logit_bias is not None, self.image_head is not None)

    def output_names(self, batch_fields: Collection[str]) -> set[str]:
        """Every output this model can produce from a batch with `batch_fields`."""
        return output_names(self.default_outputs(), batch_fields)


def output_names(default_outputs: Collection[str], batch_fields: Collection[str]) -> set[str]:
    """The model's default outputs, the token-level ones, and the `<prefix>_text_*` outputs per extra caption field."""
    extra = {field.removesuffix(EXTRA_CAPTIONS_SUFFIX) + suffix
             for field in batch_fields if field.endswith(EXTRA_CAPTIONS_SUFFIX) and field != "token_ids"
             for suffix in EXTRA_OUTPUT_SUFFIXES}
    return set(default_outputs) | {"image_tokens", "text_tokens", "text_token_mask"} | extra


def extra_fields_read(outputs: Collection[str]) -> set[str]:
    """The batch fields, beyond the towers' own, that the model reads to produce `outputs`."""
    return {field for field in map(extra_caption_field, outputs) if field is not None}


def default_outputs(has_logit_bias: bool, has_prototype_heads: bool) -> tuple[str, ...]:
    """`BASE_OUTPUTS`, plus `logit_bias` and the prototype logits for a model that has them."""
    return BASE_OUTPUTS + (("logit_bias",) if has_logit_bias else ()) + (
        ("image_prototype_logits", "text_prototype_logits") if has_prototype_heads else ())


def model_output_names(model_config: Mapping[str, Any], batch_fields: Collection[str]) -> set[str]:
    """`CLIPModel.output_names` from a model config alone (for start-up validation; nothing built)."""
    config = _as_dict(model_config)
    return output_names(default_outputs(config.get("init_logit_bias") is not None, bool(config.get("prototype_heads"))),
                        batch_fields)


def missing_output_hint(name: str) -> str:
    """Why a model may lack the output `name`, and what in the model config would produce it."""
    if name.endswith("_prototype_logits"):
        return "only a model with prototype heads produces: set model.prototype_heads"
    if name == "logit_bias":
        return "only a model with a logit bias produces: set model.init_logit_bias (SigLIP uses -10)"
    field = extra_caption_field(name)
    if field is not None:
        return f"the model embeds from the batch field {field!r}, which no preprocessing op writes"
    return "this model does not produce"


def input_fields(model_config: Mapping[str, Any]) -> dict[str, str]:
    """The batch fields the towers read: {field: modality} ("vision", "text")."""
    return {towers.tower_for(model_config, modality).input_field: modality for modality in towers.MODALITIES}


def abstract_batch(model_config: Mapping[str, Any], batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of the towers' own fields for `batch` examples (for tracing without data)."""
    result = {}
    for modality in towers.MODALITIES:
        tower = towers.tower_for(model_config, modality)
        result[tower.input_field] = tower.abstract_input(tower.settings(model_config[modality]), batch)
    return result


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
    `remat` (False), `scan_layers` (False: each tower's blocks one by one; True: stacked on a leading
    `layers` axis and applied by `jax.lax.scan`, which compiles large models much faster), `prototype_heads` (None, or {num_prototypes, hidden_dim, bottleneck_dim, layers}
    for nCLIP/xCLIP: see `jclip.models.heads`), `embedding` ("projection", or "prototypes": evaluations
    and teachers compare the heads' prototype logits, for nCLIP alone), `lora` (None, or {rank, alpha,
    targets}: LoRA adapters, see `jclip.models.lora`; rank 0 is off), `name` (ignored).
    """
    config = _as_dict(model_config)
    _check_keys(config, MODEL_KEYS, "model")
    vision, text = _as_dict(config["vision"]), _as_dict(config["text"])
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
        scan_layers=bool(config.get("scan_layers") or False),
        prototype_heads=head_config(config.get("prototype_heads")),
        embedding=str(config.get("embedding") or "projection"),
        lora=config.get("lora"),
        rngs=rngs,
    )


def architecture(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """What fixes the meaning of a model's weights: each tower's kind and shapes, the activation and the
    embedding width (not compute options, initial values, tokenizers, or optional parameters such as the
    logit bias, the prototype heads and LoRA adapters, which weight loading compares by name)."""
    config = _as_dict(model_config)
    result: dict[str, Any] = {"embed_dim": int(config["embed_dim"]), "quick_gelu": bool(config.get("quick_gelu", False))}
    for modality in towers.MODALITIES:
        tower = towers.tower_for(config, modality)
        result.update({f"{modality}.{key}": value for key, value in tower.architecture(config[modality]).items()})
    size = result.get("vision.image_size")
    if size is not None:
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
