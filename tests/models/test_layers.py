"""Tests for jclip/models/layers.py against a float64 NumPy transcription of OpenCLIP's residual block."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jclip.models import layers


def _np_layer_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * scale + bias


def _np_gelu(x: np.ndarray, quick: bool) -> np.ndarray:
    if quick:
        return x / (1 + np.exp(-1.702 * x))
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def _np_block(x: np.ndarray, p: dict[str, np.ndarray], heads: int, causal: bool, quick: bool) -> np.ndarray:
    """OpenCLIP ResidualAttentionBlock in torch layouts: x + MHA(ln_1 x); x + c_proj(act(c_fc(ln_2 x)))."""
    batch, length, width = x.shape
    head_dim = width // heads
    h = _np_layer_norm(x, p["ln_1.weight"], p["ln_1.bias"])
    qkv = h @ p["attn.in_proj_weight"].T + p["attn.in_proj_bias"]
    q, k, v = np.split(qkv, 3, axis=-1)
    split = lambda t: t.reshape(batch, length, heads, head_dim).transpose(0, 2, 1, 3)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim)
    if causal:
        logits = np.where(np.tril(np.ones((length, length), bool)), logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attended = (weights @ v).transpose(0, 2, 1, 3).reshape(batch, length, width)
    x = x + attended @ p["attn.out_proj.weight"].T + p["attn.out_proj.bias"]
    h = _np_layer_norm(x, p["ln_2.weight"], p["ln_2.bias"])
    h = _np_gelu(h @ p["mlp.c_fc.weight"].T + p["mlp.c_fc.bias"], quick)
    return x + h @ p["mlp.c_proj.weight"].T + p["mlp.c_proj.bias"]


def _torch_layout_params(width: int, hidden: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {
        "ln_1.weight": (width,), "ln_1.bias": (width,), "ln_2.weight": (width,), "ln_2.bias": (width,),
        "attn.in_proj_weight": (3 * width, width), "attn.in_proj_bias": (3 * width,),
        "attn.out_proj.weight": (width, width), "attn.out_proj.bias": (width,),
        "mlp.c_fc.weight": (hidden, width), "mlp.c_fc.bias": (hidden,),
        "mlp.c_proj.weight": (width, hidden), "mlp.c_proj.bias": (width,),
    }
    params = {k: rng.normal(0, 0.3, s) for k, s in shapes.items()}
    params["ln_1.weight"] += 1
    params["ln_2.weight"] += 1
    return params


def _load_block(block: layers.ResidualBlock, p: dict[str, np.ndarray], heads: int) -> None:
    """Fills the block from torch-layout arrays (independently of jclip.convert)."""
    width = p["ln_1.weight"].shape[0]
    head_dim = width // heads
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    block.ln_1.scale[...] = f32(p["ln_1.weight"])
    block.ln_1.bias[...] = f32(p["ln_1.bias"])
    block.ln_2.scale[...] = f32(p["ln_2.weight"])
    block.ln_2.bias[...] = f32(p["ln_2.bias"])
    in_w = p["attn.in_proj_weight"].reshape(3, heads, head_dim, width)
    block.attn.in_kernel[...] = f32(np.einsum("khdw->wkhd", in_w))
    block.attn.in_bias[...] = f32(p["attn.in_proj_bias"].reshape(3, heads, head_dim))
    block.attn.out_kernel[...] = f32(p["attn.out_proj.weight"].T.reshape(heads, head_dim, width))
    block.attn.out_bias[...] = f32(p["attn.out_proj.bias"])
    block.mlp.c_fc.kernel[...] = f32(p["mlp.c_fc.weight"].T)
    block.mlp.c_fc.bias[...] = f32(p["mlp.c_fc.bias"])
    block.mlp.c_proj.kernel[...] = f32(p["mlp.c_proj.weight"].T)
    block.mlp.c_proj.bias[...] = f32(p["mlp.c_proj.bias"])


@pytest.mark.parametrize("causal,quick", [(False, False), (True, True)])
def test_residual_block_matches_float64_numpy(causal: bool, quick: bool) -> None:
    width, heads, hidden, batch, length = 32, 4, 128, 2, 7
    block = layers.ResidualBlock(width, heads, hidden, causal=causal, quick_gelu=quick, num_layers=2,
                                 rngs=nnx.Rngs(0))
    params = _torch_layout_params(width, hidden, seed=1)
    _load_block(block, params, heads)
    x = np.random.default_rng(2).normal(size=(batch, length, width))
    expected = _np_block(x, params, heads, causal, quick)
    got = np.asarray(block(jnp.asarray(x, jnp.float32)), np.float64)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)


def test_layer_norm_eps_and_float32_statistics() -> None:
    norm = layers.LayerNorm(16, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(3.0, 0.01, size=(4, 16))  # small variance: eps matters
    got = norm(jnp.asarray(x, jnp.float32))
    assert got.dtype == jnp.bfloat16
    expected = _np_layer_norm(x.astype(np.float32).astype(np.float64), np.ones(16), np.zeros(16))
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, atol=3e-2)


def test_activations() -> None:
    x = jnp.linspace(-4, 4, 33)
    np.testing.assert_allclose(layers.quick_gelu(x), x * jax.nn.sigmoid(1.702 * x), rtol=1e-6)
    np.testing.assert_allclose(layers.exact_gelu(x), _np_gelu(np.asarray(x, np.float64), False), atol=1e-6)


def test_every_parameter_has_logical_axes_of_its_rank() -> None:
    block = layers.ResidualBlock(32, 2, 64, causal=False, quick_gelu=False, num_layers=1, rngs=nnx.Rngs(0))
    for path, variable in nnx.to_flat_state(nnx.state(block, nnx.Param)):
        names = variable.get_metadata().get("out_sharding")
        assert names is not None and len(names) == variable.ndim, path


def test_heads_count_follows_head_width() -> None:
    assert layers.num_heads_for(768, 64) == 12
    with pytest.raises(ValueError, match="head_width"):
        layers.num_heads_for(100, 64)


def test_next_key_gives_the_keys_of_nnxs_own_stream() -> None:
    ours, theirs = nnx.Rngs(3), nnx.Rngs(3)
    for _ in range(4):
        np.testing.assert_array_equal(jax.random.key_data(layers.next_key(ours.params)),
                                      jax.random.key_data(theirs.params()))
    np.testing.assert_array_equal(ours.params.count[...], theirs.params.count[...])


@pytest.mark.parametrize("scan_layers", [False, True])
def test_a_jitted_init_equals_the_one_drawing_through_nnxs_stream(monkeypatch, scan_layers) -> None:
    """Every parameter of the tiny preset, initialised in a jit as a run does, with `next_key` and with nnx's own
    `stream()` (the reference), scanned layers (nnx.split_rngs) included."""
    from jclip import models

    def init(seed: int = 0) -> dict:
        return jax.jit(lambda: nnx.to_pure_dict(nnx.state(models.build_model(config, nnx.Rngs(seed)))))()

    config = models.get_preset("tiny", scan_layers=scan_layers)
    ours = init()
    monkeypatch.setattr(layers, "next_key", lambda stream: stream())
    theirs = init()
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)
    assert len(jax.tree.leaves(ours)) > 20


def test_building_a_model_under_tracing_never_walks_the_trace_per_parameter(monkeypatch) -> None:
    """The probe `next_key` avoids: JAX describes a tracer's origin by walking every equation traced so far
    (`_origin_msg`), which made an abstract model's build quadratic in its parameter count. nnx's own
    `stream()` calls it twice per parameter (for the new count and the old one)."""
    from jax._src.interpreters import partial_eval

    from jclip import models

    walks = []
    original = partial_eval.DynamicJaxprTracer._origin_msg
    monkeypatch.setattr(partial_eval.DynamicJaxprTracer, "_origin_msg",
                        lambda tracer: walks.append(1) or original(tracer))
    config = models.get_preset("tiny")
    parameters = len(jax.tree.leaves(nnx.state(models.abstract_model(config), nnx.Param)))
    assert walks == [] and parameters > 20
    monkeypatch.setattr(layers, "next_key", lambda stream: stream())
    models.abstract_model(config)
    assert len(walks) == 2 * parameters
