"""The causal Transformer text tower of CLIP, parameter for parameter OpenCLIP's `CLIP` text half.

Follows Radford et al. 2021 (CLIP) as implemented in mlfoundations/open_clip (`model.py::CLIP.encode_text`):
token embedding + learned positional embedding, pre-norm residual blocks under a causal mask, `ln_final`,
pooling at the end-of-text token — the position of the largest token id, since CLIP's tokenizer gives the
end token the largest id — and a bias-free `text_projection`. With `lora` (jclip.models.lora), the blocks'
attention and MLP projections carry adapters.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jclip.models.layers import LayerNorm, Transformer, logical_param, normal
from jclip.models.lora import LoraSettings
from jclip.models.towers import Tower, TowerModule, register_tower, require_multiple, require_positive
from jclip.parallel import constrain


class TextTransformer(TowerModule):
    """Text tower (kind `clip`): token ids [batch, length] -> projected text features [batch, output_dim]."""

    def __init__(self, *, context_length: int, vocab_size: int, width: int, heads: int, layers: int,
                 output_dim: int, mlp_ratio: float = 4.0, quick_gelu: bool = False, remat: bool = False,
                 scan_layers: bool = False, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, lora: LoraSettings | None = None,
                 rngs: nnx.Rngs | None = None) -> None:
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.dtype = dtype
        # OpenCLIP `CLIP.init_parameters`: token std 0.02, positions std 0.01, projection std width^-0.5.
        self.token_embedding = logical_param(rngs, normal(0.02), (vocab_size, width), ("vocab", "embed"),
                                             param_dtype)
        self.positional_embedding = logical_param(rngs, normal(0.01), (context_length, width),
                                                  ("length", "embed"), param_dtype)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, causal=True, quick_gelu=quick_gelu,
                                       remat=remat, scan_layers=scan_layers, dtype=dtype, param_dtype=param_dtype, lora=lora, rngs=rngs)
        self.ln_final = LayerNorm(width, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
        self.projection = logical_param(rngs, normal(width ** -0.5), (width, output_dim), ("embed", "proj"),
                                        param_dtype)

    def encode(self, token_ids: jax.Array, *, tokens: bool = False) -> dict[str, jax.Array]:
        """`features`: the projected end-of-text token [batch, output_dim], float32; with `tokens`, also
        `tokens`, every position after `ln_final` and the projection [batch, length, output_dim], float32, and
        `token_mask` [batch, length]: True from the start token up to and including the end-of-text token.

        Sequences may be shorter than `context_length` (positions are sliced, as OpenCLIP does).
        """
        batch, length = token_ids.shape
        if length > self.context_length:
            raise ValueError(f"token sequences of length {length} exceed context_length {self.context_length}")
        hidden = jnp.take(self.token_embedding[...], token_ids, axis=0).astype(self.dtype)
        hidden = hidden + self.positional_embedding[...][:length].astype(self.dtype)
        hidden = constrain(hidden, ("batch", "length", "act_embed"))
        hidden = self.transformer(hidden)
        end_positions = jnp.argmax(token_ids, axis=-1)
        pooled = jnp.take_along_axis(hidden, end_positions[:, None, None], axis=1)[:, 0]
        pooled = self.ln_final(pooled)  # per-token LayerNorm: pooling first equals OpenCLIP's order
        pooled = constrain(pooled, ("batch", "act_embed"))
        outputs = {"features": self.project(pooled)}
        if tokens:
            every = constrain(self.ln_final(hidden), ("batch", "length", "act_embed"))
            outputs["tokens"] = self.project(every)
            outputs["token_mask"] = jnp.arange(length)[None, :] <= end_positions[:, None]
        return outputs


def _check_clip_text(config: dict[str, Any]) -> None:
    require_positive("model.text", config, ("context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"))
    require_multiple("model.text", config, "width", "heads")
    if not isinstance(config["tokenizer"], str) or not config["tokenizer"]:
        raise ValueError(f"model.text.tokenizer must be a tokenizer spec such as 'clip', got {config['tokenizer']!r}")


CLIP_TEXT = register_tower(Tower(
    kind="clip",
    modality="text",
    module=TextTransformer,
    input_field="token_ids",
    abstract_input=lambda config, batch: jax.ShapeDtypeStruct((batch, config["context_length"]), jnp.int32),
    required=frozenset({"context_length", "vocab_size", "width", "heads", "layers"}),
    # The tokenizer: OpenAI's BPE ("clip"), or "sentencepiece:/path/model.model[:lower]".
    defaults={"mlp_ratio": 4.0, "tokenizer": "clip"},
    check=_check_clip_text,
    non_architecture=frozenset({"tokenizer"}),
    tokenizer=lambda config: str(config["tokenizer"]),
    weight_formats=("openclip", "hf"),
    after_blocks=("ln_final", "projection"),
    lora_targets=("attention", "mlp"),
    scannable=True,
))
