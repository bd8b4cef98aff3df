"""The ViT image tower of CLIP, parameter for parameter OpenCLIP's `VisionTransformer` (CLIP's default).

Follows Radford et al. 2021 (CLIP) as implemented in mlfoundations/open_clip `transformer.py`: a bias-free
patch-embedding convolution (`visual.conv1`), a class token, learned positional embeddings, `ln_pre`,
pre-norm residual blocks, `ln_post` on the class token and a bias-free projection (`visual.proj`).
Images come in NHWC, already normalised. With `lora` (jclip.models.lora), the blocks' projections carry
adapters, and with the `patch_embedding` target so does the patch convolution (`patch_lora_a`/`_b`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jclip.models.layers import LayerNorm, Transformer, logical_param, lora_a_init, normal, num_heads_for, zeros
from jclip.models.lora import LoraSettings, adapter_delta
from jclip.models.towers import Tower, TowerModule, multiple_hint, register_tower, require_multiple, require_positive
from jclip.parallel import constrain


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


class VisionTransformer(TowerModule):
    """ViT image tower: images [batch, H, W, C] -> projected image features [batch, output_dim] (float32)."""

    def __init__(self, *, image_size: int | Sequence[int], patch_size: int, width: int, layers: int,
                 output_dim: int, head_width: int = 64, mlp_ratio: float = 4.0, quick_gelu: bool = False,
                 in_channels: int = 3, remat: bool = False, scan_layers: bool = False, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, lora: LoraSettings | None = None,
                 rngs: nnx.Rngs | None = None) -> None:
        image_height, image_width = _pair(image_size)
        if image_height % patch_size or image_width % patch_size:
            raise ValueError(f"image size {(image_height, image_width)} is not a multiple of patch {patch_size}")
        self.image_size = (image_height, image_width)
        self.patch_size = patch_size
        self.grid = (image_height // patch_size, image_width // patch_size)
        self.dtype = dtype
        num_tokens = self.grid[0] * self.grid[1] + 1
        scale = width ** -0.5  # OpenCLIP's init scale for class/positional embeddings and the projection
        patch_fan_in = patch_size * patch_size * in_channels
        self.patch_embedding = logical_param(  # OpenCLIP visual.conv1 (no bias), HWIO
            rngs, normal(patch_fan_in ** -0.5), (patch_size, patch_size, in_channels, width),
            ("patch", "patch", "channels", "embed"), param_dtype)
        self.class_embedding = logical_param(rngs, normal(scale), (width,), ("embed",), param_dtype)
        self.positional_embedding = logical_param(rngs, normal(scale), (num_tokens, width),
                                                  ("length", "embed"), param_dtype)
        self.ln_pre = LayerNorm(width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.transformer = Transformer(width, layers, num_heads_for(width, head_width), mlp_ratio,
                                       causal=False, quick_gelu=quick_gelu, remat=remat, scan_layers=scan_layers, dtype=dtype,
                                       param_dtype=param_dtype, lora=lora, rngs=rngs)
        self.ln_post = LayerNorm(width, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
        self.projection = logical_param(rngs, normal(scale), (width, output_dim), ("embed", "proj"), param_dtype)
        # loralib's Conv2d adapter, as FSC-CLIP puts on conv1: rank r*p factors of the [out*p, in*p] view of the
        # kernel; stored transposed (input side first) like the other adapters.
        patch_lora = lora if lora and lora.adapts("patch_embedding") else None
        self.patch_lora_scale = patch_lora.scale if patch_lora else 0.0
        self.patch_lora_a = None if not patch_lora else logical_param(
            rngs, lora_a_init(in_channels * patch_size), (in_channels * patch_size, patch_lora.rank * patch_size),
            (None, None), param_dtype)
        self.patch_lora_b = None if not patch_lora else logical_param(
            rngs, zeros, (patch_lora.rank * patch_size, width * patch_size), (None, None), param_dtype)

    def patch_kernel(self) -> jax.Array:
        """The patch-embedding kernel [p, p, channels, width] in the compute dtype, with its adapter's
        update when it has one."""
        kernel = self.patch_embedding[...]
        if self.patch_lora_a is not None:
            delta = adapter_delta(self.patch_lora_a[...], self.patch_lora_b[...], tuple(kernel.shape), "patch_")
            kernel = kernel.astype(jnp.float32) + self.patch_lora_scale * delta
        return kernel.astype(self.dtype)

    def embed_patches(self, images: jax.Array) -> jax.Array:
        """Non-overlapping patch embedding (a stride-`patch` convolution) -> [batch, grid_h*grid_w, width].

        Patches are ordered row-major, as OpenCLIP's flattening of the conv output.
        """
        batch, height, width, channels = images.shape
        if (height, width) != self.image_size:
            raise ValueError(f"expected images of size {self.image_size}, got {(height, width)}")
        p = self.patch_size
        grid_h, grid_w = self.grid
        patches = images.astype(self.dtype).reshape(batch, grid_h, p, grid_w, p, channels)
        patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(batch, grid_h * grid_w, p, p, channels)
        return jnp.einsum("bnijc,ijcd->bnd", patches, self.patch_kernel())

    def encode(self, images: jax.Array, *, tokens: bool = False) -> dict[str, jax.Array]:
        """`features`: the projected class token [batch, output_dim], float32; with `tokens`, also `tokens`:
        every patch token after `ln_post` and the projection [batch, grid_h*grid_w, output_dim], float32."""
        tokens_in = self.embed_patches(images)
        batch, _, width = tokens_in.shape
        class_token = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (batch, 1, width))
        hidden = jnp.concatenate([class_token, tokens_in], axis=1)
        hidden = hidden + self.positional_embedding[...].astype(self.dtype)
        hidden = constrain(hidden, ("batch", "length", "act_embed"))
        hidden = self.ln_pre(hidden)
        hidden = self.transformer(hidden)
        pooled = self.ln_post(hidden[:, 0])  # OpenCLIP applies ln_post to all tokens, then takes the class token
        pooled = constrain(pooled, ("batch", "act_embed"))
        outputs = {"features": self.project(pooled)}
        if tokens:
            patches = constrain(self.ln_post(hidden[:, 1:]), ("batch", "length", "act_embed"))
            outputs["tokens"] = self.project(patches)
        return outputs


def _check_vit(config: dict[str, Any]) -> None:
    require_positive("model.vision", config, ("patch_size", "width", "layers", "head_width", "mlp_ratio", "in_channels"))
    height, width = _pair(config["image_size"])
    patch = config["patch_size"]
    if height <= 0 or width <= 0 or height % patch or width % patch:
        raise ValueError(f"model.vision.image_size ({config['image_size']}) must be a positive multiple of "
                         f"patch_size ({patch}): "
                         + multiple_hint("model.vision", "image_size", max(height, width, 1), patch, "patch_size"))
    require_multiple("model.vision", config, "width", "head_width")


VIT = register_tower(Tower(
    kind="vit",
    modality="vision",
    module=VisionTransformer,
    input_field="images",
    abstract_input=lambda config, batch: jax.ShapeDtypeStruct(
        (batch, *_pair(config["image_size"]), config["in_channels"]), jnp.float32),
    required=frozenset({"image_size", "patch_size", "width", "layers"}),
    defaults={"head_width": 64, "mlp_ratio": 4.0, "in_channels": 3},
    check=_check_vit,
    weight_formats=("openclip", "hf"),
    after_blocks=("ln_post", "projection"),
    lora_targets=("attention", "mlp", "patch_embedding"),
    scannable=True,
))
