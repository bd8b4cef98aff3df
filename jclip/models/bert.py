"""A BERT encoder as the text tower (kind `bert`), loadable from a Hugging Face `BertModel` safetensors file.

Follows Devlin et al. 2019 as transformers' `BertModel` computes it (and all-MiniLM-L6-v2 with it, the
measured recipe in shared/notes/pretrained-text-towers-offline.md): word + position + token-type-0
embeddings, LayerNorm; post-norm blocks `x = LN(x + attn(x))`, `x = LN(x + mlp(x))` with the erf GELU and
LayerNorm eps 1e-12; pad keys masked. The head (`jclip.models.text_heads`) pools by `pool` (all-MiniLM is
trained for `mean`) and projects by `proj`. Bidirectional throughout. With `lora`, the blocks' attention and
MLP projections carry adapters.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jclip.models import pretrained_files, text_heads
from jclip.models.layers import MLP, LayerNorm, MultiHeadSelfAttention, logical_param, normal
from jclip.models.lora import LoraSettings
from jclip.models.towers import PretrainedWeights, Tower, register_tower, require_multiple, require_positive
from jclip.parallel import constrain

BERT_LAYER_NORM_EPS = 1e-12


class BertLayer(nnx.Module):
    """Post-norm encoder block: LN(x + attn(x)), then LN(x + mlp(x))."""

    def __init__(self, width: int, heads: int, mlp_dim: int, *, eps: float, dtype: Any, param_dtype: Any,
                 lora: LoraSettings | None, rngs: nnx.Rngs | None) -> None:
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        std = 0.02  # BERT's initializer_range
        self.attn = MultiHeadSelfAttention(width, heads, causal=False, init_std=std, out_std=std,
                                           lora=lora if lora and lora.adapts("attention") else None, **common)
        self.attn_norm = LayerNorm(width, eps=eps, **common)
        self.mlp = MLP(width, mlp_dim, quick_gelu=False, fc_std=std, proj_std=std,
                       lora=lora if lora and lora.adapts("mlp") else None, **common)
        self.mlp_norm = LayerNorm(width, eps=eps, **common)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = self.attn_norm(x + self.attn(x, key_mask=mask))
        x = constrain(x, ("batch", "length", "act_embed"))
        x = self.mlp_norm(x + self.mlp(x))
        return constrain(x, ("batch", "length", "act_embed"))


def _apply_layer(layer: BertLayer, x: jax.Array, mask: jax.Array) -> jax.Array:
    return layer(x, mask)


_apply_layer_remat = nnx.remat(_apply_layer)


class BertTextTower(text_heads.PooledTextTower):
    """Text tower (kind `bert`): token ids [batch, length] (padding -1) -> projected features."""

    def __init__(self, *, context_length: int, vocab_size: int, width: int, heads: int, layers: int, mlp_dim: int,
                 output_dim: int, max_positions: int = 512, type_vocab_size: int = 2,
                 layer_norm_eps: float = BERT_LAYER_NORM_EPS, pool: str = "mean", proj: str = "linear",
                 eos_id: int | None = None, quick_gelu: bool = False, remat: bool = False, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, lora: LoraSettings | None = None,
                 rngs: nnx.Rngs | None = None) -> None:
        del quick_gelu  # BERT's activation is the erf GELU whatever the model's CLIP-tower setting
        self.context_length, self.pool, self.eos_id, self.remat, self.dtype = context_length, pool, eos_id, remat, dtype
        self.word_embeddings = logical_param(rngs, normal(0.02), (vocab_size, width), ("vocab", "embed"), param_dtype)
        self.position_embeddings = logical_param(rngs, normal(0.02), (max_positions, width), ("length", "embed"),
                                                 param_dtype)
        self.token_type_embeddings = logical_param(rngs, normal(0.02), (type_vocab_size, width), (None, "embed"),
                                                   param_dtype)
        self.embedding_norm = LayerNorm(width, eps=layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([
            BertLayer(width, heads, mlp_dim, eps=layer_norm_eps, dtype=dtype, param_dtype=param_dtype, lora=lora,
                      rngs=rngs)
            for _ in range(layers)
        ])
        self.projection = text_heads.Projection(proj, width, output_dim, param_dtype=param_dtype, rngs=rngs)

    def hidden_states(self, token_ids: jax.Array) -> jax.Array:
        """The last layer's hidden states [batch, length, width] (transformers' `last_hidden_state`)."""
        length = token_ids.shape[1]
        if length > self.context_length:
            raise ValueError(f"token sequences of length {length} exceed context_length {self.context_length}")
        mask = text_heads.token_mask(token_ids)
        hidden = jnp.take(self.word_embeddings[...], jnp.where(mask, token_ids, 0), axis=0)
        hidden = hidden + self.position_embeddings[...][:length] + self.token_type_embeddings[...][0]
        hidden = self.embedding_norm(hidden.astype(self.dtype))
        hidden = constrain(hidden, ("batch", "length", "act_embed"))
        apply = _apply_layer_remat if self.remat else _apply_layer
        for layer in self.layers:
            hidden = apply(layer, hidden, mask)
        return hidden


def _check_bert(config: dict[str, Any]) -> None:
    require_positive("model.text", config, ("context_length", "vocab_size", "width", "heads", "layers", "mlp_dim",
                                            "max_positions", "type_vocab_size", "layer_norm_eps"))
    require_multiple("model.text", config, "width", "heads")
    if config["context_length"] > config["max_positions"]:
        raise ValueError(f"model.text.context_length ({config['context_length']}) exceeds the tower's "
                         f"max_positions ({config['max_positions']})")
    text_heads.check_head("model.text", config)
    pretrained_tokenizer_spec(config)


def pretrained_tokenizer_spec(config: dict[str, Any]) -> str:
    """`model.text.tokenizer`, or the tokenizer shipped beside `weights` (`hf:` its tokenizer.json, `gguf:` the
    GGUF itself); ValueError when there is neither."""
    if config.get("tokenizer"):
        return str(config["tokenizer"])
    weights = str(config.get("weights") or "")
    if weights:
        if weights.endswith(".gguf") or weights in pretrained_files.KNOWN and not pretrained_files.KNOWN[weights].tokenizer:
            return f"gguf:{pretrained_files.weights_path(weights)}"
        return f"hf:{pretrained_files.tokenizer_path(weights)}"
    raise ValueError("model.text.tokenizer is needed (an 'hf:/path/tokenizer.json' spec) when model.text.weights "
                     "is not set")


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as NumPy; FileNotFoundError / ValueError naming the file."""
    from safetensors.numpy import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"the weights file {path} does not exist")
    try:
        return load_file(path)
    except Exception as error:  # safetensors raises its own SafetensorError for a truncated or foreign file
        raise ValueError(f"{path} is not a readable safetensors file ({type(error).__name__}: {error})") from None


def load_bert_weights(config: dict[str, Any]) -> PretrainedWeights:
    """A transformers `BertModel` safetensors file in this tower's layout (torch Linear (out, in) transposed,
    q/k/v fused); the pooler and `position_ids` are reported unused. The file's layer count must be the
    config's."""
    path = pretrained_files.weights_path(str(config["weights"]))
    tensors = read_safetensors(path)
    prefix = "bert." if any(name.startswith("bert.") for name in tensors) else ""
    if prefix + "embeddings.word_embeddings.weight" not in tensors:
        raise ValueError(f"{path} is not a BERT checkpoint: it has no embeddings.word_embeddings.weight "
                         f"(its tensors start {sorted(tensors)[:3]})")
    layer_ids = {int(name[len(prefix):].split(".")[2]) for name in tensors if name.startswith(prefix + "encoder.layer.")}
    if len(layer_ids) != int(config["layers"]):
        raise ValueError(f"{path} has {len(layer_ids)} layers, model.text.layers is {config['layers']}")
    heads, width = int(config["heads"]), int(config["width"])
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        used.add(prefix + name)
        try:
            return np.asarray(tensors[prefix + name], np.float32)
        except KeyError:
            raise ValueError(f"{path} lacks the tensor {prefix + name}") from None

    def norm(name: str) -> dict[str, np.ndarray]:
        return {"scale": take(f"{name}.weight"), "bias": take(f"{name}.bias")}

    params: dict[str, np.ndarray] = {
        "word_embeddings": take("embeddings.word_embeddings.weight"),
        "position_embeddings": take("embeddings.position_embeddings.weight"),
        "token_type_embeddings": take("embeddings.token_type_embeddings.weight"),
        **{f"embedding_norm/{k}": v for k, v in norm("embeddings.LayerNorm").items()},
    }
    for i in sorted(layer_ids):
        base, out = f"encoder.layer.{i}.", f"layers/{i}/"
        qkv = [take(f"{base}attention.self.{part}.weight").T.reshape(width, heads, -1) for part in ("query", "key", "value")]
        params[out + "attn/in_kernel"] = np.stack(qkv, axis=1)
        params[out + "attn/in_bias"] = np.stack(
            [take(f"{base}attention.self.{part}.bias").reshape(heads, -1) for part in ("query", "key", "value")])
        params[out + "attn/out_kernel"] = take(f"{base}attention.output.dense.weight").T.reshape(heads, -1, width)
        params[out + "attn/out_bias"] = take(f"{base}attention.output.dense.bias")
        params[out + "mlp/c_fc/kernel"] = take(f"{base}intermediate.dense.weight").T
        params[out + "mlp/c_fc/bias"] = take(f"{base}intermediate.dense.bias")
        params[out + "mlp/c_proj/kernel"] = take(f"{base}output.dense.weight").T
        params[out + "mlp/c_proj/bias"] = take(f"{base}output.dense.bias")
        params.update({f"{out}attn_norm/{k}": v for k, v in norm(f"{base}attention.output.LayerNorm").items()})
        params.update({f"{out}mlp_norm/{k}": v for k, v in norm(f"{base}output.LayerNorm").items()})
    return PretrainedWeights(path, params, tuple(sorted(set(tensors) - used)))


BERT_TEXT = register_tower(Tower(
    kind="bert",
    modality="text",
    module=BertTextTower,
    input_field="token_ids",
    abstract_input=lambda config, batch: jax.ShapeDtypeStruct((batch, config["context_length"]), jnp.int32),
    required=frozenset({"context_length", "vocab_size", "width", "heads", "layers", "mlp_dim"}),
    # weights: a safetensors path or a known name (jclip.models.pretrained_files), "" for a scratch tower;
    # tokenizer: "" takes the tokenizer.json beside the weights.
    defaults={"max_positions": 512, "type_vocab_size": 2, "layer_norm_eps": BERT_LAYER_NORM_EPS, "pool": "mean",
              "proj": "linear", "eos_id": None, "weights": "", "tokenizer": ""},
    check=_check_bert,
    non_architecture=frozenset({"weights", "tokenizer"}),
    tokenizer=pretrained_tokenizer_spec,
    blocks="layers",
    after_blocks=("projection",),
    lora_targets=("attention", "mlp"),
    load_weights=load_bert_weights,
))
