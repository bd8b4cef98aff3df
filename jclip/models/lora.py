"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv 2106.09685) on the towers' projections, and their merge.

An adapted kernel W acts as W + scale · A·B with A [in..., r] and B [r, out...] (`scale = alpha / rank`). A is
drawn at random and B starts at zero, so an adapted model equals its base model exactly until B trains. The
settings (`model.lora`) follow the official FSC-CLIP code (Oh et al., EMNLP 2024, ytaek-oh/fsc-clip,
`src/training/models/lora_utils`), which adapts every ViT-CLIP projection with loralib-style layers:

- `rank`: 0 turns LoRA off; the FSC-CLIP recipe uses 4 (`--lora-rank 4`, with a 10x learning rate).
- `alpha`: 1, loralib's default, which FSC-CLIP keeps: scale = 1 / rank. No adapter dropout (FSC-CLIP has none).
- `targets`: `attention` (the fused q/k/v input projection, with one A shared by q, k and v as in FSC-CLIP's
  `in_proj_weight_lora_A`/`_B`, and the output projection), `mlp` (`c_fc` and `c_proj`) and
  `patch_embedding` (the ViT's patch convolution, factored as loralib's `Conv2d` does: a rank r·p product
  of [out·p, r·p] and [r·p, in·p] matrices reshaped into the [out, in, p, p] kernel). FSC-CLIP adapts all
  three; `("attention", "mlp")` leaves the patch embedding as it is.

Unlike FSC-CLIP, whose fused-attention B starts from a Xavier draw (so its model moves at step 0), every
B starts at zero here, as in Hu et al.

Parameters carry `lora_` in their names (`attn/in_lora_a`, `mlp/c_fc/lora_b`, `visual/patch_lora_a`), so the
rule `.*lora_.*` selects them (`jclip.param_rules.LORA_ONLY`). `merge_lora` folds them into the kernels: every
export (`python -m jclip.convert`) is a plain model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

TARGETS = ("attention", "mlp", "patch_embedding")
DEFAULT_ALPHA = 1.0  # loralib's default lora_alpha, which FSC-CLIP uses
DEFAULT_TARGETS = ("attention", "mlp")
LORA_KEYS = ("rank", "alpha", "targets")
#: Adapter name prefix -> the kernel it adapts, for the parameters of one module (`<prefix>lora_a`, `_b`).
ADAPTED_KERNELS = {"in_": "in_kernel", "out_": "out_kernel", "": "kernel", "patch_": "patch_embedding"}


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """Validated `model.lora` with rank > 0 (LoRA on)."""

    rank: int
    alpha: float = DEFAULT_ALPHA
    targets: tuple[str, ...] = DEFAULT_TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def adapts(self, target: str) -> bool:
        return target in self.targets


def _plain(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if not isinstance(config, Mapping):
        raise ValueError(f"model.lora must be a mapping with keys {list(LORA_KEYS)}, got {config!r}")
    return dict(config)


def lora_settings(model_config: Mapping[str, Any]) -> LoraSettings | None:
    """The settings of `model_config["lora"]`, or None when absent or `rank` is 0. ValueError naming the
    field for an unknown key, a negative or non-integer rank, a non-positive alpha or an unknown target."""
    config = _plain(model_config.get("lora") if hasattr(model_config, "get") else None)
    unknown = sorted(set(config) - set(LORA_KEYS))
    if unknown:
        raise ValueError(f"unknown model.lora keys {unknown}; it takes {list(LORA_KEYS)}")
    rank = config.get("rank", 0)
    if rank is None:
        rank = 0
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 0:
        raise ValueError(f"model.lora.rank must be an integer >= 0 (0 turns LoRA off), got {rank!r}")
    alpha = config.get("alpha", DEFAULT_ALPHA)
    alpha = DEFAULT_ALPHA if alpha is None else alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"model.lora.alpha must be a positive number (scale = alpha / rank), got {alpha!r}")
    targets = config.get("targets", DEFAULT_TARGETS)
    targets = (targets,) if isinstance(targets, str) else tuple(targets or ())
    bad = [target for target in targets if target not in TARGETS]
    if bad or not targets:
        raise ValueError(f"model.lora.targets must be a non-empty subset of {list(TARGETS)}, got {list(targets)}")
    if rank == 0:
        return None
    return LoraSettings(int(rank), float(alpha), tuple(dict.fromkeys(targets)))


def plain_lora_config(model_config: Mapping[str, Any]) -> dict[str, Any] | None:
    """`model.lora` as JSON-ready data, or None when LoRA is off."""
    settings = lora_settings(model_config)
    if settings is None:
        return None
    return {"rank": settings.rank, "alpha": settings.alpha, "targets": list(settings.targets)}


def is_adapter(path: tuple[Any, ...]) -> bool:
    """Whether the parameter at `path` is a LoRA adapter factor."""
    return str(path[-1]).endswith(("lora_a", "lora_b"))


def adapter_delta(a: Any, b: Any, kernel_shape: tuple[int, ...], name: str) -> Any:
    """The unscaled update A·B of the kernel adapted by the factors named `<prefix>lora_a`/`_b`, laid out as
    the kernel. NumPy factors give a float64 NumPy result; jax factors a float32 one (full precision)."""
    numpy = isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
    a = a.astype(np.float64) if numpy else jnp.asarray(a, jnp.float32)
    b = b.astype(np.float64) if numpy else jnp.asarray(b, jnp.float32)
    if name == "patch_":
        # loralib's Conv2d: (B·A) [out·p, in·p] viewed as the OIHW kernel; here a = A^T, b = B^T, kernel HWIO.
        patch_h, patch_w, channels, out = kernel_shape
        product = a @ b if numpy else jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
        return product.T.reshape(out, channels, patch_h, patch_w).transpose(2, 3, 1, 0)
    if numpy:
        return np.tensordot(a, b, axes=1)
    return jnp.tensordot(a, b, axes=1, precision=jax.lax.Precision.HIGHEST)


def merge_lora(params: Mapping[Any, Any], model_config: Mapping[str, Any]) -> tuple[dict[Any, Any], dict[str, Any]]:
    """(params with every adapter folded into its kernel, W + scale·A·B, and no adapter left; the model
    config without `lora`). A model without LoRA comes back unchanged (its config without `lora`).

    `params` is a nested pure dict of NumPy arrays (computed in float64) or jax arrays (float32, full
    precision); each merged kernel keeps its dtype. ValueError for adapters the config does not announce
    or that have no kernel to fold into.
    """
    config = dict(model_config.to_dict() if hasattr(model_config, "to_dict") else model_config)
    settings = lora_settings(config)
    config.pop("lora", None)
    flat = flatten_dict(dict(params))
    adapters = sorted((path for path in flat if is_adapter(path)), key=str)
    if not adapters:
        return unflatten_dict(flat), config
    if settings is None:
        raise ValueError(f"the parameters hold LoRA adapters ({'/'.join(map(str, adapters[0]))}, ...) but the model "
                         "config has no model.lora with rank > 0")
    merged = {path: value for path, value in flat.items() if not is_adapter(path)}
    for path in adapters:
        if str(path[-1]).endswith("lora_b"):
            continue
        prefix = str(path[-1]).removesuffix("lora_a")
        kernel_path = (*path[:-1], ADAPTED_KERNELS.get(prefix, ""))
        b_path = (*path[:-1], f"{prefix}lora_b")
        if prefix not in ADAPTED_KERNELS or kernel_path not in flat or b_path not in flat:
            raise ValueError(f"LoRA adapter {'/'.join(map(str, path))} has no kernel or no B factor to merge with")
        kernel = flat[kernel_path]
        delta = adapter_delta(flat[path], flat[b_path], tuple(kernel.shape), prefix)
        if isinstance(kernel, np.ndarray) and isinstance(delta, np.ndarray):
            merged[kernel_path] = (kernel.astype(np.float64) + settings.scale * delta).astype(kernel.dtype)
        else:
            merged[kernel_path] = (jnp.asarray(kernel, jnp.float32) + settings.scale * delta).astype(kernel.dtype)
    unpaired = [path for path in adapters if str(path[-1]).endswith("lora_b")
                and (*path[:-1], str(path[-1]).removesuffix("lora_b") + "lora_a") not in flat]
    if unpaired:
        raise ValueError(f"LoRA adapter {'/'.join(map(str, unpaired[0]))} has no A factor to merge with")
    return unflatten_dict(merged), config
