"""Transformer building blocks shared by the image and text towers, laid out like OpenCLIP's.

The blocks follow OpenCLIP's `ResidualAttentionBlock` (mlfoundations/open_clip, `transformer.py`): pre-norm
residual blocks `x + attn(ln_1(x))`, `x + mlp(ln_2(x))`, with an MLP `c_fc -> GELU | quick-GELU -> c_proj`
and multi-head self-attention whose fused input projection maps 1:1 onto `attn.in_proj_weight/bias`.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`, ...) as NNX `out_sharding`
metadata; `jclip.parallel`'s rules table maps them to mesh axes. Eager sharding is switched off per
variable so that a model can be built without a mesh; shardings come from `nnx.get_named_sharding` and a
jitted initialiser's `out_shardings` (shared/ARCHITECTURE.md, principle 3).

Mixed precision: parameters are stored in `param_dtype` (float32) and cast to the compute `dtype` where used;
LayerNorm statistics and attention softmax are computed in float32.

Optional LoRA adapters (`jclip.models.lora`, Hu et al. 2021, as FSC-CLIP uses them) sit beside the attention
and MLP kernels: a low-rank path `scale * (x A) B` added to the kernel's output, B zero at the start.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jclip.models.lora import LoraSettings
from jclip.parallel import constrain

Initializer = Callable[[jax.Array, Sequence[int], Any], jax.Array]
LogicalAxes = tuple[str | None, ...]

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, used throughout OpenCLIP


def logical_param(
    rngs: nnx.Rngs | None,
    initializer: Initializer,
    shape: Sequence[int],
    logical_axes: LogicalAxes,
    param_dtype: Any = jnp.float32,
) -> nnx.Param:
    """Creates an `nnx.Param` tagged with logical axis names (read by `nnx.get_partition_spec`).

    `eager_sharding=False`: the value is not constrained at creation, so the model can be built with
    or without a mesh; the caller shards it (jit `out_shardings` from `nnx.get_named_sharding`).
    """
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {logical_axes} do not match parameter shape {tuple(shape)}")
    key = next_key(rngs.params) if rngs is not None else jax.random.key(0)
    value = initializer(key, tuple(shape), param_dtype)
    return nnx.Param(value, out_sharding=tuple(logical_axes), eager_sharding=False)


def next_key(stream: nnx.RngStream) -> jax.Array:
    """The stream's next key, the one `stream()` gives (`fold_in(key, count)`, then count + 1).

    `stream()` writes the new count with `count[...] = ...`, and for an indexed write flax compares the value's
    `sharding` with the old one's. Under tracing (`eval_shape`, the jitted init) a tracer's `sharding` raises
    an AttributeError whose message JAX builds by walking every equation traced so far, so building a model
    took time quadratic in its parameter count (jax-ml/jax PR 40041 drops that message): g/14's abstract model
    took 5.2 s, now 0.5 s. `set_raw_value` makes the same trace-level check and skips the comparison."""
    count = stream.count.get_value()
    key = jax.random.fold_in(stream.key.get_value(), count)
    stream.count.set_raw_value(count + 1)
    return key


def normal(stddev: float) -> Initializer:
    """Normal initialiser N(0, stddev^2) (OpenCLIP's `nn.init.normal_(std=...)`)."""
    return nnx.initializers.normal(stddev)


zeros: Initializer = nnx.initializers.zeros
ones: Initializer = nnx.initializers.ones


def lora_a_init(fan_in: int) -> Initializer:
    """A LoRA A factor's draw: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), what loralib's kaiming_uniform_(a=sqrt(5))
    gives (the init FSC-CLIP's adapters use; B starts at zero)."""
    bound = fan_in ** -0.5

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, tuple(shape), dtype, -bound, bound)

    return init


def low_rank_update(x: jax.Array, a: nnx.Param, b: nnx.Param, scale: float, dtype: Any,
                    contract_in: str, out: str) -> jax.Array:
    """scale * (x A) B of a LoRA adapter: `contract_in` is the einsum of x with A (ending in the rank axis r),
    `out` that of the rank-r activations with B."""
    low = jnp.einsum(contract_in, x, a[...].astype(dtype)) * jnp.asarray(scale, dtype)
    return jnp.einsum(out, low, b[...].astype(dtype))


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x) (OpenCLIP `QuickGELU`)."""
    return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x: jax.Array) -> jax.Array:
    """The erf GELU of `torch.nn.GELU()` (OpenCLIP's default activation), not the tanh approximation.

    Written as torch computes it, x/2 (1 + erf(x/sqrt 2)): `jax.nn.gelu(approximate=False)` goes through erfc,
    whose exponential XLA:CPU evaluates in extra passes (this form made the cpu-tiny step 6.6% faster; README)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.5 ** 0.5, x.dtype)))


def activation_fn(use_quick_gelu: bool) -> Callable[[jax.Array], jax.Array]:
    """The MLP activation: quick-GELU (OpenAI weights) or exact GELU (OpenCLIP default)."""
    return quick_gelu if use_quick_gelu else exact_gelu


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, eps 1e-5 (BERT's 1e-12 by argument), statistics in float32, output in the
    compute dtype."""

    def __init__(self, width: int, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 eps: float = LAYER_NORM_EPS, rngs: nnx.Rngs | None = None) -> None:
        self.dtype = dtype
        self.eps = eps
        self.scale = logical_param(rngs, ones, (width,), ("embed",), param_dtype)
        self.bias = logical_param(rngs, zeros, (width,), ("embed",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        variance = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normalised = (x32 - mean) * jax.lax.rsqrt(variance + self.eps)
        out = normalised * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return out.astype(self.dtype)


class Dense(nnx.Module):
    """Linear layer y = x @ kernel + bias with kernel [in, out] (the transpose of torch's `weight`).

    With `lora`, also y += scale * (x @ lora_a) @ lora_b: lora_a [in, r], lora_b [r, out] (zero at the start).
    """

    def __init__(self, in_features: int, out_features: int, *, logical_axes: tuple[str, str],
                 stddev: float, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 lora: LoraSettings | None = None, rngs: nnx.Rngs | None = None) -> None:
        self.dtype = dtype
        self.kernel = logical_param(rngs, normal(stddev), (in_features, out_features), logical_axes, param_dtype)
        self.bias = logical_param(rngs, zeros, (out_features,), (logical_axes[1],), param_dtype)
        self.lora_scale = lora.scale if lora else 0.0
        self.lora_a = None if not lora else logical_param(
            rngs, lora_a_init(in_features), (in_features, lora.rank), (logical_axes[0], None), param_dtype)
        self.lora_b = None if not lora else logical_param(
            rngs, zeros, (lora.rank, out_features), (None, logical_axes[1]), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        kernel = self.kernel[...].astype(self.dtype)
        y = jnp.dot(x, kernel) + self.bias[...].astype(self.dtype)
        if self.lora_a is not None:
            y = y + low_rank_update(x, self.lora_a, self.lora_b, self.lora_scale, self.dtype, "...i,ir->...r",
                                    "...r,ro->...o")
        return y


class MultiHeadSelfAttention(nnx.Module):
    """Multi-head self-attention with a fused q/k/v projection (torch `nn.MultiheadAttention` layout).

    `in_proj.kernel` [embed, 3, heads, head_dim] is `in_proj_weight` [3*width, width] transposed and
    reshaped; `out_proj.kernel` [heads, head_dim, embed] is `out_proj.weight` transposed and reshaped.
    Keeping heads as their own axis lets the `heads` logical name shard them (tensor parallelism).

    With `lora`, two adapters: `in_lora_a` [embed, r] (one A for q, k and v, as FSC-CLIP's fused
    `in_proj_weight_lora_A`) and `in_lora_b` [r, 3, heads, head_dim]; `out_lora_a` [heads, head_dim, r] and
    `out_lora_b` [r, embed].
    """

    def __init__(self, width: int, num_heads: int, *, causal: bool, init_std: float, out_std: float,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, lora: LoraSettings | None = None,
                 rngs: nnx.Rngs | None = None) -> None:
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.causal = causal
        self.dtype = dtype
        self.in_kernel = logical_param(rngs, normal(init_std), (width, 3, num_heads, self.head_dim),
                                       ("embed", None, "heads", "kv"), param_dtype)
        self.in_bias = logical_param(rngs, zeros, (3, num_heads, self.head_dim), (None, "heads", "kv"), param_dtype)
        self.out_kernel = logical_param(rngs, normal(out_std), (num_heads, self.head_dim, width),
                                        ("heads", "kv", "embed"), param_dtype)
        self.out_bias = logical_param(rngs, zeros, (width,), ("embed",), param_dtype)
        self.lora_scale = lora.scale if lora else 0.0
        rank = lora.rank if lora else 0
        self.in_lora_a = None if not lora else logical_param(
            rngs, lora_a_init(width), (width, rank), ("embed", None), param_dtype)
        self.in_lora_b = None if not lora else logical_param(
            rngs, zeros, (rank, 3, num_heads, self.head_dim), (None, None, "heads", "kv"), param_dtype)
        self.out_lora_a = None if not lora else logical_param(
            rngs, lora_a_init(width), (num_heads, self.head_dim, rank), ("heads", "kv", None), param_dtype)
        self.out_lora_b = None if not lora else logical_param(rngs, zeros, (rank, width), (None, "embed"), param_dtype)

    def __call__(self, x: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
        """x: [batch, length, width] -> [batch, length, width]; `key_mask` [batch, length] (True: a real
        token) keeps padding keys out of every query's attention."""
        x = x.astype(self.dtype)
        qkv = jnp.einsum("btd,dknh->kbtnh", x, self.in_kernel[...].astype(self.dtype))
        if self.in_lora_a is not None:
            qkv = qkv + low_rank_update(x, self.in_lora_a, self.in_lora_b, self.lora_scale, self.dtype,
                                        "btd,dr->btr", "btr,rknh->kbtnh")
        qkv = qkv + self.in_bias[...].astype(self.dtype)[:, None, None]
        query, key, value = (constrain(t, ("batch", "length", "act_heads", None)) for t in qkv)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        attended = jax.nn.dot_product_attention(query, key, value, mask=mask, is_causal=self.causal)
        attended = constrain(attended, ("batch", "length", "act_heads", None))
        out = jnp.einsum("btnh,nhd->btd", attended, self.out_kernel[...].astype(self.dtype))
        if self.out_lora_a is not None:
            out = out + low_rank_update(attended, self.out_lora_a, self.out_lora_b, self.lora_scale, self.dtype,
                                        "btnh,nhr->btr", "btr,rd->btd")
        return out + self.out_bias[...].astype(self.dtype)


class MLP(nnx.Module):
    """OpenCLIP's block MLP: `c_fc` -> GELU (erf) or quick-GELU -> `c_proj` (each with a LoRA adapter when
    `lora` is given)."""

    def __init__(self, width: int, hidden: int, *, quick_gelu: bool, fc_std: float, proj_std: float,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, lora: LoraSettings | None = None,
                 rngs: nnx.Rngs | None = None) -> None:
        self.quick_gelu = quick_gelu
        self.c_fc = Dense(width, hidden, logical_axes=("embed", "mlp"), stddev=fc_std,
                          dtype=dtype, param_dtype=param_dtype, lora=lora, rngs=rngs)
        self.c_proj = Dense(hidden, width, logical_axes=("mlp", "embed"), stddev=proj_std,
                            dtype=dtype, param_dtype=param_dtype, lora=lora, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = activation_fn(self.quick_gelu)(self.c_fc(x))
        hidden = constrain(hidden, ("batch", "length", "act_mlp"))
        return self.c_proj(hidden)


class ResidualBlock(nnx.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)); x + mlp(ln_2(x)) (OpenCLIP `ResidualAttentionBlock`)."""

    def __init__(self, width: int, num_heads: int, mlp_hidden: int, *, causal: bool, quick_gelu: bool,
                 num_layers: int, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 lora: LoraSettings | None = None, rngs: nnx.Rngs | None = None) -> None:
        # OpenCLIP's text-tower initialisation (`TextTransformer.init_parameters`), used for both towers.
        attn_std = width ** -0.5
        proj_std = width ** -0.5 * (2 * num_layers) ** -0.5
        fc_std = (2 * width) ** -0.5
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype
        self.ln_1 = LayerNorm(width, **common)
        attn_lora = lora if lora and lora.adapts("attention") else None
        mlp_lora = lora if lora and lora.adapts("mlp") else None
        self.attn = MultiHeadSelfAttention(width, num_heads, causal=causal, init_std=attn_std,
                                           out_std=proj_std, lora=attn_lora, **common)
        self.ln_2 = LayerNorm(width, **common)
        self.mlp = MLP(width, mlp_hidden, quick_gelu=quick_gelu, fc_std=fc_std, proj_std=proj_std,
                       lora=mlp_lora, **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln_1(x))
        x = constrain(x, ("batch", "length", "act_embed"))
        x = x + self.mlp(self.ln_2(x))
        return constrain(x, ("batch", "length", "act_embed"))


def _apply_block(block: ResidualBlock, x: jax.Array) -> jax.Array:
    return block(x)


_apply_block_remat = nnx.remat(_apply_block)


class Transformer(nnx.Module):
    """A stack of `ResidualBlock`s (OpenCLIP `Transformer.resblocks`); optionally rematerialised per block.

    `scan_layers=False`: `blocks` is a list of blocks, parameters `blocks/<i>/...`, applied in a Python loop
    (one copy of the block in the compiled program per layer). `scan_layers=True`: `blocks` is ONE block whose
    parameters carry a leading axis of `num_layers` (logical name `layers`, replicated), applied with
    `jax.lax.scan`, so the program holds the block once and compiles in about the time of one layer. The two
    compute the same function of the same weights (`jclip.models.stacking` converts between the layouts).
    """

    def __init__(self, width: int, num_layers: int, num_heads: int, mlp_ratio: float, *, causal: bool,
                 quick_gelu: bool, remat: bool = False, scan_layers: bool = False, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, lora: LoraSettings | None = None,
                 rngs: nnx.Rngs | None = None) -> None:
        mlp_hidden = int(width * mlp_ratio)
        self.remat = remat
        self.scan_layers = scan_layers

        def make_block(block_rngs: nnx.Rngs | None) -> ResidualBlock:
            return ResidualBlock(width, num_heads, mlp_hidden, causal=causal, quick_gelu=quick_gelu,
                                 num_layers=num_layers, dtype=dtype, param_dtype=param_dtype, lora=lora,
                                 rngs=block_rngs)

        if scan_layers:
            self.blocks = _stacked_blocks(make_block, num_layers, rngs if rngs is not None else nnx.Rngs(0))
        else:
            self.blocks = nnx.List([make_block(rngs) for _ in range(num_layers)])

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.scan_layers:
            return _scan_blocks(self.blocks, x, self.remat)
        apply = _apply_block_remat if self.remat else _apply_block
        for block in self.blocks:
            x = apply(block, x)
        return x


def _stacked_blocks(make_block: Callable[[nnx.Rngs], ResidualBlock], num_layers: int,
                    rngs: nnx.Rngs) -> ResidualBlock:
    """`num_layers` blocks created as one, each parameter stacked on a new leading `layers` axis."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(block_rngs: nnx.Rngs) -> ResidualBlock:
        return make_block(block_rngs)

    return create(rngs)


def _scan_blocks(stacked: ResidualBlock, x: jax.Array, remat: bool) -> jax.Array:
    """x through the stacked blocks in order, one `jax.lax.scan` step per layer (each step rematerialised
    in the backward pass when `remat`)."""
    graphdef, params, rest = nnx.split(stacked, nnx.Param, ...)

    def body(hidden: jax.Array, layer_params: nnx.State) -> tuple[jax.Array, None]:
        return nnx.merge(graphdef, layer_params, rest)(hidden), None

    x, _ = jax.lax.scan(jax.checkpoint(body) if remat else body, x, params)
    return x


def num_heads_for(width: int, head_width: int) -> int:
    """OpenCLIP's vision head count: width // head_width (head_width 64 by default)."""
    if width % head_width:
        raise ValueError(f"vision width {width} is not a multiple of head_width {head_width}")
    return width // head_width


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) along the last axis, in float32 (torch `F.normalize`)."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


__all__ = [
    "LAYER_NORM_EPS", "Dense", "LayerNorm", "MLP", "MultiHeadSelfAttention", "ResidualBlock", "Transformer",
    "activation_fn", "exact_gelu", "l2_normalize", "logical_param", "lora_a_init", "low_rank_update", "normal",
    "num_heads_for", "quick_gelu",
]
