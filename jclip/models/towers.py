"""Towers chosen by name: `model.vision.kind` and `model.text.kind` select a registered tower.

A tower owns its config keys and their checks, its parameter count (from shapes, nothing allocated), the
batch field it reads, its tokenizer (text towers: a spec that `jclip.data.tokenizer.make_tokenizer` builds),
its pooling (inside its module) and the weight formats `jclip.convert` can import into it. Today's towers
are OpenCLIP's: `vit` (jclip.models.vision) and the causal `clip` text Transformer (jclip.models.text). A new
tower is a module with `@register_tower`-ed `Tower` and a class with this interface:

    tower = cls(**tower_config, output_dim=..., quick_gelu=..., remat=..., dtype=..., param_dtype=..., rngs=...)
                [, lora=LoraSettings]  (only with model.lora on, for a tower that declares `lora_targets`)
                [, scan_layers=True]   (only with model.scan_layers on, for a tower that declares `scannable`)
    tower(inputs) -> projected pooled features [batch, output_dim], float32
    tower.encode(inputs, tokens=True) -> {"features", "tokens" [batch, T, output_dim]} (+ "token_mask" [batch, T]
                                         for text), the tokens after the final norm and the projection
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jclip.models.lora import LoraSettings, lora_settings

MODALITIES = ("vision", "text")


class TowerModule(nnx.Module):
    """What every tower module shares: `tower(inputs)` is `encode(inputs)["features"]`, and `project` maps
    hidden states onto the shared embedding space with the tower's `projection` (in float32)."""

    projection: nnx.Param

    def encode(self, inputs: jax.Array, *, tokens: bool = False) -> dict[str, jax.Array]:
        raise NotImplementedError

    def project(self, hidden: jax.Array) -> jax.Array:
        return jnp.dot(hidden.astype(jnp.float32), self.projection[...].astype(jnp.float32))

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """Projected (not normalised) pooled features [batch, output_dim] in float32."""
        return self.encode(inputs)["features"]


@dataclasses.dataclass(frozen=True)
class Tower:
    """A registered tower kind (see the module docstring)."""

    kind: str
    modality: str  # "vision" or "text"
    module: type[nnx.Module]
    input_field: str  # the batch field the tower reads: "images" or "token_ids"
    #: The abstract input of `batch` examples, from the tower config (shapes for start-up tracing).
    abstract_input: Callable[[Mapping[str, Any], int], jax.ShapeDtypeStruct]
    required: frozenset[str]
    defaults: Mapping[str, Any]  # optional keys with their defaults
    check: Callable[[Mapping[str, Any]], None]  # raises ValueError naming model.<modality>.<key>
    #: Keys that do not change the meaning of the weights (not compared when weights are loaded).
    non_architecture: frozenset[str] = frozenset()
    #: The text tower's tokenizer spec from its config ("clip", "sentencepiece:/path...").
    tokenizer: Callable[[Mapping[str, Any]], str] | None = None
    #: `jclip.convert` formats that hold this tower's weights ("openclip", "hf").
    weight_formats: tuple[str, ...] = ()
    #: Where the tower's numbered blocks are (`<blocks>/<i>/...` under the tower's parameters), the config key
    #: counting them, and the parts after the last block: what "lock all but the top k blocks" reads.
    blocks: str = "transformer/blocks"
    layers_key: str = "layers"
    after_blocks: tuple[str, ...] = ()
    #: The `model.lora.targets` the module adapts when built with `lora=` (jclip.models.lora); () for none.
    lora_targets: tuple[str, ...] = ()
    #: Whether the module takes `scan_layers=True` (model.scan_layers): its blocks stacked on a leading `layers`
    #: axis at `<blocks>/...` instead of `<blocks>/<i>/...` (jclip.models.stacking), applied by `jax.lax.scan`.
    scannable: bool = False
    #: Pretrained towers: reads the file `weights` names into the module's layout (`jclip.pretrained`).
    load_weights: Callable[[Mapping[str, Any]], "PretrainedWeights"] | None = None

    @property
    def keys(self) -> frozenset[str]:
        return self.required | frozenset(self.defaults) | {"kind"}

    def settings(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The tower config with defaults filled in, without `kind`; unknown or missing keys are errors."""
        config = {key: value for key, value in _items(config) if key != "kind"}
        where = f"model.{self.modality}"
        unknown = sorted(set(config) - self.keys)
        if unknown:
            raise ValueError(f"unknown {where} keys {unknown} for kind {self.kind!r}; it takes {sorted(self.keys)}")
        missing = sorted(self.required - set(config))
        if missing:
            raise ValueError(f"{where} (kind {self.kind!r}) needs {missing}")
        return {**self.defaults, **{k: v for k, v in config.items() if v is not None or k not in self.defaults}}

    def build_args(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The module's constructor arguments from the tower config (its own keys only)."""
        settings = self.settings(config)
        return {key: value for key, value in settings.items() if key not in self.non_architecture}

    def architecture(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """What fixes the meaning of this tower's weights: `kind` and every architecture key."""
        values = {"kind": self.kind, **self.build_args(config)}
        return {key: tuple(value) if isinstance(value, (list, tuple)) else value for key, value in sorted(values.items())}

    def count_params(self, config: Mapping[str, Any], output_dim: int) -> int:
        """The tower's parameter count (projection included), from shapes alone."""
        abstract = nnx.eval_shape(lambda: self.module(**self.build_args(config), output_dim=output_dim, rngs=nnx.Rngs(0)))
        leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
        return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in leaves))


@dataclasses.dataclass(frozen=True)
class PretrainedWeights:
    """A pretrained file read into a tower's layout: `params` by '/'-joined path under the tower (e.g.
    `layers/0/attn/in_kernel`), already transposed and reshaped; `unused`, the file's tensors not taken."""

    source: str
    params: Mapping[str, np.ndarray]
    unused: tuple[str, ...] = ()


_TOWERS: dict[str, dict[str, Tower]] = {modality: {} for modality in MODALITIES}
DEFAULT_KINDS = {"vision": "vit", "text": "clip"}


def register_tower(tower: Tower) -> Tower:
    """Adds a tower kind to the registry (a kind may be registered once per modality)."""
    if tower.modality not in MODALITIES:
        raise ValueError(f"a tower's modality is one of {MODALITIES}, got {tower.modality!r}")
    existing = _TOWERS[tower.modality].get(tower.kind)
    if existing is not None and existing.module is not tower.module:
        raise ValueError(f"{tower.modality} tower kind {tower.kind!r} is already registered by {existing.module}")
    _TOWERS[tower.modality][tower.kind] = tower
    return tower


def known_kinds(modality: str) -> list[str]:
    return sorted(_TOWERS[modality])


def tower_for(model_config: Mapping[str, Any], modality: str) -> Tower:
    """The registered tower `model.<modality>.kind` names (`vit` / `clip` when the key is absent)."""
    config = dict(_items(_section(model_config, modality)))
    kind = config.get("kind") or DEFAULT_KINDS[modality]
    if kind not in _TOWERS[modality]:
        raise ValueError(f"unknown model.{modality}.kind {kind!r}; known {modality} towers: {known_kinds(modality)}")
    return _TOWERS[modality][kind]


def tower_settings(model_config: Mapping[str, Any], modality: str) -> dict[str, Any]:
    """`model.<modality>` with its tower's defaults filled in (without `kind`)."""
    return tower_for(model_config, modality).settings(_section(model_config, modality))


def check_tower(model_config: Mapping[str, Any], modality: str) -> None:
    """Raises ValueError naming the field for an unknown kind, unknown or missing keys, or bad values; also
    for a bad `model.lora`, or LoRA on for a tower kind without adapters (the adapters live in the towers). The
    checks that need only the kind come first: a pretrained tower's own check reads its installed files."""
    tower = tower_for(model_config, modality)
    tower_lora(model_config, modality)
    tower_scan(model_config, modality)
    tower.check(tower.settings(_section(model_config, modality)))


def tower_scan(model_config: Mapping[str, Any], modality: str) -> bool:
    """Whether the tower is built with `scan_layers=True` (`model.scan_layers`); ValueError when it is on and the
    tower kind has no stacked layout."""
    scan = bool(_get(model_config, "scan_layers", False))
    tower = tower_for(model_config, modality)
    if scan and not tower.scannable:
        scannable = sorted(kind for kind, t in _TOWERS[modality].items() if t.scannable)
        raise ValueError(f"model.scan_layers is on but model.{modality}.kind {tower.kind!r} has no scanned layout "
                         f"(scannable {modality} towers: {scannable}); set model.scan_layers=False")
    return scan


def _get(config: Any, key: str, default: Any) -> Any:
    try:
        value = config[key]
    except (KeyError, AttributeError):
        return default
    return default if value is None else value


def tower_lora(model_config: Mapping[str, Any], modality: str) -> LoraSettings | None:
    """The `lora=` argument of the tower's module: None with LoRA off; ValueError for a bad `model.lora` or
    a tower kind that has no adapters."""
    settings = lora_settings(model_config)
    tower = tower_for(model_config, modality)
    if settings is not None and not tower.lora_targets:
        raise ValueError(f"model.lora is on (rank {settings.rank}) but model.{modality}.kind {tower.kind!r} has no "
                         "LoRA adapters")
    return settings


def tokenizer_spec(model_config: Mapping[str, Any]) -> str:
    """The text tower's tokenizer spec (what `jclip.data.tokenizer.make_tokenizer` builds)."""
    tower = tower_for(model_config, "text")
    return tower.tokenizer(tower.settings(_section(model_config, "text")))


def _section(model_config: Mapping[str, Any], modality: str) -> Any:
    try:
        return model_config[modality]
    except KeyError:
        raise ValueError(f"the model config has no `{modality}` tower") from None


def _items(config: Any):
    return config.items() if hasattr(config, "items") else dict(config).items()


def require_positive(where: str, config: Mapping[str, Any], keys: tuple[str, ...]) -> None:
    """ValueError naming `where.key` unless each of `keys` is a positive number."""
    for key in keys:
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{where}.{key} must be positive, got {value!r}")


def require_multiple(where: str, config: Mapping[str, Any], key: str, of: str) -> None:
    """ValueError unless `config[key]` is a multiple of `config[of]`; the message names both keys and a value that
    would do, so that a bad shape stops at validation, not deep inside the model's construction."""
    value, step = config[key], config[of]
    if value % step:
        raise ValueError(f"{where}.{key} ({value}) must be divisible by {of} ({step}): "
                         + multiple_hint(where, key, value, step, of))


def multiple_hint(where: str, key: str, value: int, step: int, of: str) -> str:
    """What to set when `where.key` (`value`) must be a multiple of `where.of` (`step`)."""
    above = max(step, -(-int(value) // step) * step)
    return f"set {where}.{key} to a multiple of {step} (e.g. {above}) or change {where}.{of}"
