"""Decoder language models as text towers (kinds `gemma3` and `llama`), loadable from GGUF files, with the
top `bidirectional_top_k` blocks attending both ways.

Stone et al. (arXiv 2412.15396) turn a pretrained decoder LM into a CLIP text tower: freeze the embeddings
and the lower blocks, train the top blocks with bidirectional attention, pool, and project. The two towers
here compute what transformers' `Gemma3TextModel` and `LlamaModel` compute (their `last_hidden_state` is
`hidden_states`), from the weights of a GGUF file (jclip.models.gguf_weights; the named files of
jclip.models.pretrained_files: `gemma3-270m`, `smollm2-135m`):

- `gemma3` (Gemma 3, Gemma Team 2025): token embeddings times sqrt(width) (the factor rounded to the compute
  dtype, as transformers does); blocks `x + post_attn_norm(attn(attn_norm(x)))`, then
  `x + post_mlp_norm(mlp(mlp_norm(x)))`; RMSNorm in the (1 + w) form (computed in float32); grouped-query
  attention with RMSNorm'd queries and keys (QK-norm) and scale `query_pre_attn_scalar ** -0.5`; a gated
  tanh-GELU MLP `down(gelu_tanh(gate(x)) * up(x))`; local layers (a causal sliding window of
  `sliding_window` keys, RoPE base `rope_local_base`) and global layers (every key, RoPE base `rope_base`),
  block i being global when (i + 1) % sliding_window_pattern == 0 (5 local : 1 global);
- `llama` (SmolLM2 = Llama 2's layout): blocks `x + attn(attn_norm(x))`, `x + mlp(mlp_norm(x))`; RMSNorm
  `w * x / rms(x)`; grouped-query attention, scale `head_dim ** -0.5`; SwiGLU `down(silu(gate(x)) * up(x))`;
  one RoPE base. SmolLM2's output head is tied to the embeddings; a tower needs no head.

RoPE is the rotate-half form of transformers (pairs (d, d + head_dim/2)); positions are 0..T-1 for every
row, which is right for right-padded rows. As in transformers, frequencies and angles are float32; the cos and
sin tables are computed on the host, correctly rounded, and enter the graph as constants. llama.cpp's
converter permutes a Llama's q and k rows for its interleaved RoPE; the loader undoes it, so the kernels are
transformers' q_proj/k_proj.

The loaders check every number the GGUF states against the config (width, layers, heads, key/value heads,
head_dim, mlp_dim, eps, RoPE bases, window, trained context as `max_positions`, vocabulary). Gemma 3 files
from llama.cpp do not state the layer pattern, the local RoPE base or the attention scale: llama.cpp and
transformers fix them for the architecture (pattern 6, local base 10k; scale 1/sqrt(256), which is
transformers' default query_pre_attn_scalar and llama.cpp's 1/sqrt(head_dim), the same for the 270M model),
and so do this tower's defaults (`query_pre_attn_scalar` None: head_dim). Measured against transformers from
the same dequantised weights (tests/models/test_decoder.py), float32 on CPU: tiny random models within 1e-5;
Gemma 3 270M within 2.4e-4 and SmolLM2-135M within 1.1e-4 of final hidden states reaching 100 and 50 (mean
differences 4e-6 and 2e-6), float32 rounding: transformers' own float32 result is 1.1-1.4e-4 from float64.
With both in float64 they agree within 3.8e-5 (Gemma; 5.2e-5 with every block bidirectional) and 2.0e-5 (SmolLM2).

Attention mask, per block: padding keys (token id -1, `text_heads.token_mask`) are masked in every block;
the lower `layers - bidirectional_top_k` blocks are causal, the top `bidirectional_top_k` are not. Gemma's
local blocks keep their window in both modes: causal, key j is seen from query i when i - window < j <= i
(transformers'); bidirectional, when |i - j| < window, the causal window mirrored. So a bidirectional local
block sees every key its causal self saw, and no window binds for captions of up to `sliding_window` tokens
(the paper's 256-512 with Gemma's 512). transformers' `use_bidirectional_attention` (EmbeddingGemma) uses a
window half as wide (|i - j| <= window // 2); the two agree on texts shorter than window // 2 + 1 tokens.

Parameter layout (paths under the tower; logical axes in brackets): `embedding` [vocab, embed];
`blocks/<i>/attn_norm/scale`, `blocks/<i>/attn/query` [embed, heads, kv], `blocks/<i>/attn/{key,value}`
[embed, kv_heads, kv] (the few key/value heads replicated by the default rules), `blocks/<i>/attn/out`
[heads, kv, embed], Gemma's `attn/query_norm/scale` and `attn/key_norm/scale` [kv], `post_attn_norm/scale`,
`post_mlp_norm/scale`; `blocks/<i>/mlp_norm/scale`, `blocks/<i>/mlp/{gate,up}` [embed, mlp],
`blocks/<i>/mlp/down` [mlp, embed]; `final_norm/scale`; the head `projection` (jclip.models.text_heads).
The tower locks count `blocks` (after them: `final_norm`, `projection`). Gemma's norm scales hold the w of
(1 + w), transformers' convention: the GGUF stores 1 + w (llama.cpp adds the 1 when converting), so the
loader subtracts 1, and a scratch tower starts at w = 0, the identity.

The head pools by `pool` (default `last`: the last real token, the only one a causal decoder lets read the
whole caption) and projects by `proj` (default `linear`). `eos_id`, when set, is appended to every caption
by the tokenizer (SmolLM2's adds none; its EOS and pad ids are both 2, so masks come from ids >= 0, never
from the pad id) and is the token `pool = eos` reads.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jclip.models import pretrained_files, text_heads
from jclip.models.bert import pretrained_tokenizer_spec
from jclip.models.gguf_weights import GGUFFile, check_metadata, open_gguf
from jclip.models.layers import logical_param, normal, ones, zeros
from jclip.models.towers import PretrainedWeights, Tower, register_tower, require_positive
from jclip.parallel import constrain

INIT_STD = 0.02  # transformers' initializer_range for both families


class RMSNorm(nnx.Module):
    """x / sqrt(mean(x^2) + eps) times `scale` (Llama) or (1 + `scale`) (Gemma, `plus_one`), in float32; the
    output in the compute dtype."""

    def __init__(self, dim: int, *, eps: float, plus_one: bool, axis: str = "embed", dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs | None = None) -> None:
        self.eps, self.plus_one, self.dtype = eps, plus_one, dtype
        self.scale = logical_param(rngs, zeros if plus_one else ones, (dim,), (axis,), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(jnp.float32)
        return (normed * (1.0 + scale if self.plus_one else scale)).astype(self.dtype)


def rope_tables(length: int, head_dim: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [length, head_dim] of rotate-half RoPE at positions 0..length-1, as float32 constants.

    As transformers computes them: frequencies base^(-2i/head_dim) and angles position x frequency in
    float32; cos and sin then correctly rounded (NumPy in float64), where an accelerator's float32 cos may
    be some ulps off at angles of hundreds of radians."""
    inverse = (1.0 / (float(base) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))).astype(np.float32)
    angles = np.arange(length, dtype=np.float32)[:, None] * inverse[None, :]
    angles = np.concatenate([angles, angles], axis=-1).astype(np.float64)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [batch, length, heads, head_dim] rotated: x cos + rotate_half(x) sin (in x's dtype)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos.astype(x.dtype)[:, None, :], sin.astype(x.dtype)[:, None, :]
    return x * cos + rotated * sin


def attention_mask(valid: jax.Array, *, causal: bool, window: int | None) -> jax.Array:
    """[batch, 1, T, T] booleans (True: query i may attend key j): real keys only; j <= i when `causal`;
    within `window` (i - window < j, or |i - j| < window when not causal) when a window is given."""
    length = valid.shape[-1]
    query = jnp.arange(length)[:, None]
    key = jnp.arange(length)[None, :]
    allowed = jnp.ones((length, length), bool)
    if causal:
        allowed &= key <= query
    if window:
        allowed &= (query - key < window) if causal else (jnp.abs(query - key) < window)
    return valid[:, None, None, :] & allowed[None, None]


class DecoderAttention(nnx.Module):
    """Grouped-query self-attention with RoPE (and Gemma's QK-norm); no biases."""

    def __init__(self, width: int, heads: int, kv_heads: int, head_dim: int, *, scale: float, qk_norm: bool,
                 eps: float, dtype: Any, param_dtype: Any, rngs: nnx.Rngs | None) -> None:
        if heads % kv_heads:
            raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key/value heads")
        self.scale, self.dtype = scale, dtype
        init = normal(INIT_STD)
        self.query = logical_param(rngs, init, (width, heads, head_dim), ("embed", "heads", "kv"), param_dtype)
        self.key = logical_param(rngs, init, (width, kv_heads, head_dim), ("embed", "kv_heads", "kv"), param_dtype)
        self.value = logical_param(rngs, init, (width, kv_heads, head_dim), ("embed", "kv_heads", "kv"), param_dtype)
        self.out = logical_param(rngs, init, (heads, head_dim, width), ("heads", "kv", "embed"), param_dtype)
        norm = dict(eps=eps, plus_one=True, axis="kv", dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query_norm = RMSNorm(head_dim, **norm) if qk_norm else None
        self.key_norm = RMSNorm(head_dim, **norm) if qk_norm else None

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        query, key, value = (jnp.einsum("btd,dnh->btnh", x, kernel[...].astype(self.dtype))
                             for kernel in (self.query, self.key, self.value))
        if self.query_norm is not None:
            query, key = self.query_norm(query), self.key_norm(key)
        query, key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)
        query = constrain(query, ("batch", "length", "act_heads", None))
        attended = jax.nn.dot_product_attention(query, key, value, mask=mask, scale=self.scale)
        attended = constrain(attended, ("batch", "length", "act_heads", None))
        return jnp.einsum("btnh,nhd->btd", attended, self.out[...].astype(self.dtype))


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)): tanh-GELU (Gemma's GeGLU) or SiLU (Llama's SwiGLU); no biases."""

    def __init__(self, width: int, hidden: int, *, activation: str, dtype: Any, param_dtype: Any,
                 rngs: nnx.Rngs | None) -> None:
        self.activation, self.dtype = activation, dtype
        init = normal(INIT_STD)
        self.gate = logical_param(rngs, init, (width, hidden), ("embed", "mlp"), param_dtype)
        self.up = logical_param(rngs, init, (width, hidden), ("embed", "mlp"), param_dtype)
        self.down = logical_param(rngs, init, (hidden, width), ("mlp", "embed"), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        gate = jnp.dot(x, self.gate[...].astype(self.dtype))
        gate = jax.nn.gelu(gate, approximate=True) if self.activation == "gelu_tanh" else jax.nn.silu(gate)
        hidden = constrain(gate * jnp.dot(x, self.up[...].astype(self.dtype)), ("batch", "length", "act_mlp"))
        return jnp.dot(hidden, self.down[...].astype(self.dtype))


class DecoderBlock(nnx.Module):
    """One decoder block (the family's layout, module docstring); `local`: Gemma's sliding-window layer;
    `bidirectional`: no causal mask."""

    def __init__(self, width: int, heads: int, kv_heads: int, head_dim: int, mlp_dim: int, *, gemma: bool,
                 eps: float, attention_scale: float, local: bool, bidirectional: bool, dtype: Any,
                 param_dtype: Any, rngs: nnx.Rngs | None) -> None:
        self.local, self.bidirectional = local, bidirectional
        norm = dict(eps=eps, plus_one=gemma, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn_norm = RMSNorm(width, **norm)
        self.attn = DecoderAttention(width, heads, kv_heads, head_dim, scale=attention_scale, qk_norm=gemma, eps=eps,
                                     dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attn_norm = RMSNorm(width, **norm) if gemma else None
        self.mlp_norm = RMSNorm(width, **norm)
        self.mlp = GatedMLP(width, mlp_dim, activation="gelu_tanh" if gemma else "silu", dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs)
        self.post_mlp_norm = RMSNorm(width, **norm) if gemma else None

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        attended = self.attn(self.attn_norm(x), cos, sin, mask)
        if self.post_attn_norm is not None:
            attended = self.post_attn_norm(attended)
        x = constrain(x + attended, ("batch", "length", "act_embed"))
        hidden = self.mlp(self.mlp_norm(x))
        if self.post_mlp_norm is not None:
            hidden = self.post_mlp_norm(hidden)
        return constrain(x + hidden, ("batch", "length", "act_embed"))


def _apply_block(block: DecoderBlock, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
    return block(x, cos, sin, mask)


_apply_block_remat = nnx.remat(_apply_block)


class DecoderTextTower(text_heads.PooledTextTower):
    """A decoder LM as a text tower: token ids [batch, length] (padding -1) -> projected features. Built by
    the `gemma3` and `llama` kinds (`Gemma3TextTower`, `LlamaTextTower`)."""

    def __init__(self, *, gemma: bool, context_length: int, vocab_size: int, width: int, layers: int, heads: int,
                 kv_heads: int, head_dim: int, mlp_dim: int, norm_eps: float, rope_base: float,
                 rope_local_base: float | None, sliding_window: int | None, sliding_window_pattern: int | None,
                 attention_scale: float, bidirectional_top_k: int, pool: str, proj: str, eos_id: int | None,
                 output_dim: int, remat: bool, dtype: Any, param_dtype: Any, rngs: nnx.Rngs | None) -> None:
        self.context_length, self.pool, self.eos_id, self.remat, self.dtype = context_length, pool, eos_id, remat, dtype
        self.gemma, self.width, self.head_dim = gemma, width, head_dim
        self.rope_base, self.rope_local_base, self.sliding_window = rope_base, rope_local_base, sliding_window
        if not 0 <= bidirectional_top_k <= layers:
            raise ValueError(f"bidirectional_top_k ({bidirectional_top_k}) must be in [0, layers = {layers}]")
        self.embedding = logical_param(rngs, normal(INIT_STD), (vocab_size, width), ("vocab", "embed"), param_dtype)
        self.blocks = nnx.List([
            DecoderBlock(width, heads, kv_heads, head_dim, mlp_dim, gemma=gemma, eps=norm_eps,
                         attention_scale=attention_scale,
                         local=bool(sliding_window_pattern) and local_layers(layers, sliding_window_pattern)[index],
                         bidirectional=index >= layers - bidirectional_top_k, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
            for index in range(layers)
        ])
        self.final_norm = RMSNorm(width, eps=norm_eps, plus_one=gemma, dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs)
        self.projection = text_heads.Projection(proj, width, output_dim, param_dtype=param_dtype, rngs=rngs)

    def _embed(self, token_ids: jax.Array) -> jax.Array:
        mask = text_heads.token_mask(token_ids)
        hidden = jnp.take(self.embedding[...], jnp.where(mask, token_ids, 0), axis=0).astype(self.dtype)
        if self.gemma:
            hidden = hidden * jnp.asarray(math.sqrt(self.width), self.dtype)
        return constrain(hidden, ("batch", "length", "act_embed"))

    def block_outputs(self, token_ids: jax.Array) -> list[jax.Array]:
        """Each block's output [batch, length, width] (before the final norm), bottom block first."""
        length = token_ids.shape[1]
        if length > self.context_length:
            raise ValueError(f"token sequences of length {length} exceed context_length {self.context_length}")
        valid = text_heads.token_mask(token_ids)
        tables = {False: rope_tables(length, self.head_dim, self.rope_base)}
        if any(block.local for block in self.blocks):
            tables[True] = rope_tables(length, self.head_dim, self.rope_local_base)
        masks: dict[tuple[bool, bool], jax.Array] = {}
        apply = _apply_block_remat if self.remat else _apply_block
        hidden, outputs = self._embed(token_ids), []
        for block in self.blocks:
            kind = (block.local, block.bidirectional)
            if kind not in masks:
                masks[kind] = attention_mask(valid, causal=not block.bidirectional,
                                             window=self.sliding_window if block.local else None)
            cos, sin = tables[block.local]
            hidden = apply(block, hidden, cos, sin, masks[kind])
            outputs.append(hidden)
        return outputs

    def hidden_states(self, token_ids: jax.Array) -> jax.Array:
        """The final-norm hidden states [batch, length, width] (transformers' `last_hidden_state`)."""
        return self.final_norm(self.block_outputs(token_ids)[-1])


class Gemma3TextTower(DecoderTextTower):
    """Kind `gemma3` (module docstring). `query_pre_attn_scalar` None means `head_dim` (Gemma 3 270M's 256)."""

    def __init__(self, *, context_length: int, vocab_size: int, width: int, layers: int, heads: int, kv_heads: int,
                 head_dim: int, mlp_dim: int, output_dim: int, norm_eps: float = 1e-6, rope_base: float = 1e6,
                 rope_local_base: float = 1e4, sliding_window: int = 512, sliding_window_pattern: int = 6,
                 query_pre_attn_scalar: float | None = None, max_positions: int = 32768, bidirectional_top_k: int = 0,
                 pool: str = "last", proj: str = "linear", eos_id: int | None = None, quick_gelu: bool = False,
                 remat: bool = False, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs | None = None) -> None:
        del quick_gelu, max_positions  # Gemma's activation is its own; max_positions is only checked
        scalar = head_dim if query_pre_attn_scalar is None else query_pre_attn_scalar
        super().__init__(gemma=True, context_length=context_length, vocab_size=vocab_size, width=width, layers=layers,
                         heads=heads, kv_heads=kv_heads, head_dim=head_dim, mlp_dim=mlp_dim, norm_eps=norm_eps,
                         rope_base=rope_base, rope_local_base=rope_local_base, sliding_window=sliding_window,
                         sliding_window_pattern=sliding_window_pattern, attention_scale=float(scalar) ** -0.5,
                         bidirectional_top_k=bidirectional_top_k, pool=pool, proj=proj, eos_id=eos_id,
                         output_dim=output_dim, remat=remat, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class LlamaTextTower(DecoderTextTower):
    """Kind `llama` (module docstring)."""

    def __init__(self, *, context_length: int, vocab_size: int, width: int, layers: int, heads: int, kv_heads: int,
                 head_dim: int, mlp_dim: int, output_dim: int, norm_eps: float = 1e-5, rope_base: float = 1e4,
                 max_positions: int = 8192, bidirectional_top_k: int = 0, pool: str = "last", proj: str = "linear",
                 eos_id: int | None = None, quick_gelu: bool = False, remat: bool = False, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs | None = None) -> None:
        del quick_gelu, max_positions
        super().__init__(gemma=False, context_length=context_length, vocab_size=vocab_size, width=width,
                         layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim, mlp_dim=mlp_dim,
                         norm_eps=norm_eps, rope_base=rope_base, rope_local_base=None, sliding_window=None,
                         sliding_window_pattern=None, attention_scale=float(head_dim) ** -0.5,
                         bidirectional_top_k=bidirectional_top_k, pool=pool, proj=proj, eos_id=eos_id,
                         output_dim=output_dim, remat=remat, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


# -- checks and the tokenizer ------------------------------------------------------------------------------


def _check_decoder(config: dict[str, Any], positive: tuple[str, ...]) -> None:
    require_positive("model.text", config, ("context_length", "vocab_size", "width", "layers", "heads", "kv_heads",
                                            "head_dim", "mlp_dim", "norm_eps", "rope_base", "max_positions",
                                            *positive))
    if config["heads"] % config["kv_heads"]:
        divisors = [n for n in range(1, config["heads"] + 1) if config["heads"] % n == 0]
        raise ValueError(f"model.text.heads ({config['heads']}) must be a multiple of kv_heads ({config['kv_heads']}): "
                         f"set model.text.kv_heads to one of {divisors} or change model.text.heads")
    if config["head_dim"] % 2:
        raise ValueError(f"model.text.head_dim ({config['head_dim']}) must be even (RoPE rotates pairs)")
    if config["context_length"] > config["max_positions"]:
        raise ValueError(f"model.text.context_length ({config['context_length']}) exceeds the tower's "
                         f"max_positions ({config['max_positions']})")
    k = config["bidirectional_top_k"]
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= config["layers"]:
        raise ValueError(f"model.text.bidirectional_top_k must be an integer in [0, layers = {config['layers']}], "
                         f"got {k!r}")
    text_heads.check_head("model.text", config)
    decoder_tokenizer_spec(config)


def _check_gemma3(config: dict[str, Any]) -> None:
    _check_decoder(config, ("rope_local_base", "sliding_window", "sliding_window_pattern"))
    if config["query_pre_attn_scalar"] is not None:
        require_positive("model.text", config, ("query_pre_attn_scalar",))


def _check_llama(config: dict[str, Any]) -> None:
    _check_decoder(config, ())


def decoder_tokenizer_spec(config: dict[str, Any]) -> str:
    """`model.text.tokenizer`, else the GGUF's own tokenizer (`gguf:PATH`), with `?append_eos=<eos_id>` when
    `eos_id` is set (SmolLM2's tokenizer adds no end token; jclip appends it)."""
    spec = pretrained_tokenizer_spec(config)
    if not config.get("tokenizer") and spec.startswith("gguf:") and config.get("eos_id") is not None:
        spec += f"?append_eos={int(config['eos_id'])}"
    return spec


# -- GGUF weights ----------------------------------------------------------------------------------------

#: model.text key -> `<architecture>.` metadata key, checked when the weights are read.
_COMMON_METADATA = (("width", "embedding_length"), ("layers", "block_count"), ("mlp_dim", "feed_forward_length"),
                    ("heads", "attention.head_count"), ("kv_heads", "attention.head_count_kv"),
                    ("norm_eps", "attention.layer_norm_rms_epsilon"), ("rope_base", "rope.freq_base"),
                    ("max_positions", "context_length"), ("vocab_size", "vocab_size"))
GEMMA3_METADATA = _COMMON_METADATA + (("head_dim", "attention.key_length"), ("head_dim", "attention.value_length"),
                                      ("sliding_window", "attention.sliding_window"),
                                      ("rope_local_base", "rope.freq_base_swa"))
LLAMA_METADATA = _COMMON_METADATA + (("head_dim", "rope.dimension_count"), ("head_dim", "attention.key_length"))


def _open_checked(config: dict[str, Any], architecture: str, metadata: tuple[tuple[str, str], ...]) -> GGUFFile:
    path = pretrained_files.weights_path(str(config["weights"]))
    gguf_file = open_gguf(path, architecture)
    check_metadata(gguf_file, config, metadata)
    rows, width = gguf_file.shape("token_embd.weight")
    if (rows, width) != (config["vocab_size"], config["width"]):
        raise ValueError(f"{path}: token_embd.weight is [{rows}, {width}] (vocabulary, width), the config says "
                         f"model.text.vocab_size {config['vocab_size']}, width {config['width']}")
    scaling = gguf_file.arch_value("rope.scaling.type", "none")
    if scaling not in ("none", "linear") or "rope_freqs.weight" in gguf_file.tensor_names or \
            (scaling == "linear" and gguf_file.arch_value("rope.scaling.factor", 1.0) != 1.0):
        raise ValueError(f"{path} uses RoPE scaling ({scaling!r}), which the {architecture} tower does not implement")
    return gguf_file


def local_layers(layers: int, sliding_window_pattern: int) -> list[bool]:
    """Which of Gemma 3's blocks are local (sliding-window): all but every `sliding_window_pattern`-th."""
    return [(index + 1) % sliding_window_pattern != 0 for index in range(layers)]


def _check_layer_pattern(gguf_file: GGUFFile, config: dict[str, Any]) -> None:
    """The file's `attention.sliding_window_pattern` (an int, or one bool per layer, True for local), when it
    has one, against model.text.sliding_window_pattern. Gemma 3 files from llama.cpp have none: llama.cpp
    fixes the pattern at 6 for the architecture, as transformers' Gemma3TextConfig does."""
    value = gguf_file.arch_value("attention.sliding_window_pattern", None)
    if value is None:
        return
    expected = local_layers(config["layers"], config["sliding_window_pattern"])
    found = [bool(v) for v in value] if isinstance(value, list) else local_layers(config["layers"], int(value))
    if found != expected:
        raise ValueError(f"{gguf_file.path}: the file's local (sliding-window) layers "
                         f"{[i for i, local in enumerate(found) if local]} are not those of "
                         f"model.text.sliding_window_pattern {config['sliding_window_pattern']}")


def _attention_params(gguf_file: GGUFFile, prefix: str, out: str, config: dict[str, Any],
                      unpermute: bool) -> dict[str, np.ndarray]:
    width, head_dim = config["width"], config["head_dim"]

    def heads_kernel(name: str, heads: int) -> np.ndarray:
        weight = gguf_file.tensor(f"{prefix}{name}.weight")  # [heads * head_dim, width]
        if unpermute:  # llama.cpp stores each head's rows as (head_dim/2 pairs, 2); rotate-half wants (2, pairs)
            weight = weight.reshape(heads, head_dim // 2, 2, width).swapaxes(1, 2)
        return weight.reshape(heads, head_dim, width).transpose(2, 0, 1)

    return {
        out + "attn/query": heads_kernel("attn_q", config["heads"]),
        out + "attn/key": heads_kernel("attn_k", config["kv_heads"]),
        out + "attn/value": gguf_file.tensor(f"{prefix}attn_v.weight").reshape(config["kv_heads"], head_dim, width)
        .transpose(2, 0, 1),
        out + "attn/out": gguf_file.tensor(f"{prefix}attn_output.weight").T.reshape(config["heads"], head_dim, width),
        out + "mlp/gate": gguf_file.tensor(f"{prefix}ffn_gate.weight").T,
        out + "mlp/up": gguf_file.tensor(f"{prefix}ffn_up.weight").T,
        out + "mlp/down": gguf_file.tensor(f"{prefix}ffn_down.weight").T,
    }


def load_gemma3_weights(config: dict[str, Any]) -> PretrainedWeights:
    """A Gemma 3 GGUF in this tower's layout: every norm's stored 1 + w made w; the file's numbers checked
    against the config (ValueError naming the file)."""
    gguf_file = _open_checked(config, "gemma3", GEMMA3_METADATA)
    _check_layer_pattern(gguf_file, config)

    def norm(name: str) -> np.ndarray:
        return gguf_file.tensor(name) - np.float32(1.0)

    params = {"embedding": gguf_file.tensor("token_embd.weight"), "final_norm/scale": norm("output_norm.weight")}
    for index in range(config["layers"]):
        prefix, out = f"blk.{index}.", f"blocks/{index}/"
        params.update(_attention_params(gguf_file, prefix, out, config, unpermute=False))
        params.update({
            out + "attn_norm/scale": norm(prefix + "attn_norm.weight"),
            out + "attn/query_norm/scale": norm(prefix + "attn_q_norm.weight"),
            out + "attn/key_norm/scale": norm(prefix + "attn_k_norm.weight"),
            out + "post_attn_norm/scale": norm(prefix + "post_attention_norm.weight"),
            out + "mlp_norm/scale": norm(prefix + "ffn_norm.weight"),
            out + "post_mlp_norm/scale": norm(prefix + "post_ffw_norm.weight"),
        })
    return PretrainedWeights(gguf_file.path, params, gguf_file.unused())


def load_llama_weights(config: dict[str, Any]) -> PretrainedWeights:
    """A Llama GGUF (SmolLM2) in this tower's layout: q and k rows un-permuted from llama.cpp's RoPE order;
    an untied `output.weight` is reported unused."""
    gguf_file = _open_checked(config, "llama", LLAMA_METADATA)
    params = {"embedding": gguf_file.tensor("token_embd.weight"),
              "final_norm/scale": gguf_file.tensor("output_norm.weight")}
    for index in range(config["layers"]):
        prefix, out = f"blk.{index}.", f"blocks/{index}/"
        params.update(_attention_params(gguf_file, prefix, out, config, unpermute=True))
        params[out + "attn_norm/scale"] = gguf_file.tensor(prefix + "attn_norm.weight")
        params[out + "mlp_norm/scale"] = gguf_file.tensor(prefix + "ffn_norm.weight")
    return PretrainedWeights(gguf_file.path, params, gguf_file.unused())


def _abstract_tokens(config: dict[str, Any], batch: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((batch, config["context_length"]), jnp.int32)


_COMMON_DEFAULTS = {"bidirectional_top_k": 0, "pool": "last", "proj": "linear", "eos_id": None, "weights": "",
                    "tokenizer": ""}
_REQUIRED = frozenset({"context_length", "vocab_size", "width", "layers", "heads", "kv_heads", "head_dim", "mlp_dim"})

GEMMA3_TEXT = register_tower(Tower(
    kind="gemma3",
    modality="text",
    module=Gemma3TextTower,
    input_field="token_ids",
    abstract_input=_abstract_tokens,
    required=_REQUIRED,
    # weights: a GGUF path or a known name (jclip.models.pretrained_files), "" for a scratch tower;
    # tokenizer: "" takes the GGUF's own (jclip.data.gguf_tokenizer).
    defaults={"norm_eps": 1e-6, "rope_base": 1e6, "rope_local_base": 1e4, "sliding_window": 512,
              "sliding_window_pattern": 6, "query_pre_attn_scalar": None, "max_positions": 32768, **_COMMON_DEFAULTS},
    check=_check_gemma3,
    non_architecture=frozenset({"weights", "tokenizer"}),
    tokenizer=decoder_tokenizer_spec,
    blocks="blocks",
    after_blocks=("final_norm", "projection"),
    load_weights=load_gemma3_weights,
))

LLAMA_TEXT = register_tower(Tower(
    kind="llama",
    modality="text",
    module=LlamaTextTower,
    input_field="token_ids",
    abstract_input=_abstract_tokens,
    required=_REQUIRED,
    defaults={"norm_eps": 1e-5, "rope_base": 1e4, "max_positions": 8192, **_COMMON_DEFAULTS},
    check=_check_llama,
    non_architecture=frozenset({"weights", "tokenizer"}),
    tokenizer=decoder_tokenizer_spec,
    blocks="blocks",
    after_blocks=("final_norm", "projection"),
    load_weights=load_llama_weights,
))
