"""LoRA adapters (jclip.models.lora): B = 0 leaves the model exactly as it is; with nonzero B each adapted
layer computes W + scale·A·B, checked against NumPy float64 written here from the formulas (Hu et al. 2021;
loralib's Conv2d view for the patch embedding, as FSC-CLIP uses it); `merge_lora` folds the adapters in; bad
settings stop a run at start-up."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict
from jclip_testing import make_small_config

from jclip.models import build_model, get_preset
from jclip.models.layers import Dense, MultiHeadSelfAttention
from jclip.models.lora import LoraSettings, lora_settings, merge_lora

ALL_TARGETS = ("attention", "mlp", "patch_embedding")
RANK, ALPHA = 3, 1.5


def lora_config(**lora):
    return make_small_config(lora={"rank": RANK, "alpha": ALPHA, "targets": ALL_TARGETS, **lora})


def batch(seed: int = 0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(1, 60, size=(3, 8)).astype(np.int32)
    token_ids[:, 5] = 63  # the end token (the largest id), padding after it
    token_ids[:, 6:] = 0
    return {"images": jnp.asarray(rng.normal(size=(3, 16, 16, 3)), jnp.float32), "token_ids": jnp.asarray(token_ids)}


def flat_params(model) -> dict[tuple, np.ndarray]:
    return {path: np.asarray(value) for path, value in flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}


def set_params(model, flat: dict[tuple, np.ndarray]) -> None:
    nnx.update(model, unflatten_dict({path: jnp.asarray(value) for path, value in flat.items()}))


def randomise_b(model, seed: int = 1, std: float = 0.3) -> dict[tuple, np.ndarray]:
    """Draws every B factor (zero at init) from N(0, std^2); returns the model's parameters."""
    rng = np.random.default_rng(seed)
    flat = flat_params(model)
    for path, value in flat.items():
        if str(path[-1]).endswith("lora_b"):
            assert not value.any()
            flat[path] = (std * rng.standard_normal(value.shape)).astype(value.dtype)
    set_params(model, flat)
    return flat


def numpy_merged(flat: dict[tuple, np.ndarray], scale: float) -> dict[tuple, np.ndarray]:
    """The base model's kernels W + scale·A·B in float64 NumPy, each written out from its layout."""
    merged = {path: value.astype(np.float64) for path, value in flat.items() if "lora" not in str(path[-1])}
    f64 = {path: value.astype(np.float64) for path, value in flat.items()}
    for path, a in f64.items():
        parent, name = path[:-1], str(path[-1])
        if name == "in_lora_a":  # [E, r] x [r, 3, H, D]
            merged[parent + ("in_kernel",)] += scale * np.einsum("er,rkhd->ekhd", a, f64[parent + ("in_lora_b",)])
        elif name == "out_lora_a":  # [H, D, r] x [r, E]
            merged[parent + ("out_kernel",)] += scale * np.einsum("hdr,re->hde", a, f64[parent + ("out_lora_b",)])
        elif name == "lora_a":  # Dense [in, r] x [r, out]
            merged[parent + ("kernel",)] += scale * a @ f64[parent + ("lora_b",)]
        elif name == "patch_lora_a":  # loralib Conv2d: (B A).view(O, I, p, p) with A = a^T, B = b^T; kernel HWIO
            patch, _, channels, out = merged[parent + ("patch_embedding",)].shape
            oihw = (f64[parent + ("patch_lora_b",)].T @ a.T).reshape(out, channels, patch, patch)
            merged[parent + ("patch_embedding",)] += scale * oihw.transpose(2, 3, 1, 0)
    return merged


def test_settings_scale_and_names() -> None:
    settings = lora_settings(lora_config())
    assert settings == LoraSettings(RANK, ALPHA, ALL_TARGETS) and settings.scale == ALPHA / RANK
    assert lora_settings(make_small_config()) is None
    assert lora_settings(make_small_config(lora={"rank": 0})) is None
    model = build_model(lora_config(), nnx.Rngs(0))
    adapters = {"/".join(map(str, p)) for p in flat_params(model) if "lora" in "/".join(map(str, p))}
    block = {"attn/in_lora_a", "attn/in_lora_b", "attn/out_lora_a", "attn/out_lora_b",
             "mlp/c_fc/lora_a", "mlp/c_fc/lora_b", "mlp/c_proj/lora_a", "mlp/c_proj/lora_b"}
    want = {f"{tower}/transformer/blocks/{i}/{name}" for tower in ("visual", "text") for i in range(2) for name in block}
    assert adapters == want | {"visual/patch_lora_a", "visual/patch_lora_b"}
    attention_only = build_model(lora_config(targets=("attention",)), nnx.Rngs(0))
    assert {str(p[-1]) for p in flat_params(attention_only) if "lora" in str(p[-1])} == {
        "in_lora_a", "in_lora_b", "out_lora_a", "out_lora_b"}


def test_zero_b_reproduces_the_base_model_exactly() -> None:
    base = build_model(make_small_config(), nnx.Rngs(0))
    adapted = build_model(lora_config(), nnx.Rngs(1))
    base_params = flat_params(base)
    adapted_params = flat_params(adapted)
    assert set(base_params) < set(adapted_params)
    for path, value in adapted_params.items():
        if str(path[-1]).endswith("lora_b"):
            assert not value.any(), path
        elif str(path[-1]).endswith("lora_a"):
            assert np.abs(value).max() > 0, path
    set_params(adapted, base_params)
    wanted = ["image_features", "text_features", "image_tokens", "text_tokens"]
    want, got = base(batch(), wanted), adapted(batch(), wanted)
    for name in wanted:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_dense_adapter_against_numpy() -> None:
    lora = LoraSettings(RANK, ALPHA, ALL_TARGETS)
    dense = Dense(7, 5, logical_axes=("embed", "mlp"), stddev=0.5, lora=lora, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(0)
    dense.lora_b[...] = jnp.asarray(rng.standard_normal((RANK, 5)), jnp.float32)
    dense.bias[...] = jnp.asarray(rng.standard_normal(5), jnp.float32)
    x = rng.standard_normal((2, 4, 7)).astype(np.float32)
    w, b = np.asarray(dense.kernel[...], np.float64), np.asarray(dense.bias[...], np.float64)
    a, bb = np.asarray(dense.lora_a[...], np.float64), np.asarray(dense.lora_b[...], np.float64)
    want = x.astype(np.float64) @ (w + lora.scale * a @ bb) + b
    np.testing.assert_allclose(np.asarray(dense(jnp.asarray(x)), np.float64), want, rtol=1e-5, atol=1e-5)
    assert np.abs(want - (x.astype(np.float64) @ w + b)).max() > 0.1  # the adapter does change the layer


@pytest.mark.parametrize("causal", [False, True])
def test_attention_adapters_against_numpy(causal: bool) -> None:
    lora = LoraSettings(RANK, ALPHA, ("attention",))
    width, heads, head_dim = 12, 3, 4
    attn = MultiHeadSelfAttention(width, heads, causal=causal, init_std=0.3, out_std=0.3, lora=lora, rngs=nnx.Rngs(5))
    rng = np.random.default_rng(1)
    attn.in_lora_b[...] = jnp.asarray(rng.standard_normal((RANK, 3, heads, head_dim)), jnp.float32)
    attn.out_lora_b[...] = jnp.asarray(rng.standard_normal((RANK, width)), jnp.float32)
    attn.in_bias[...] = jnp.asarray(0.1 * rng.standard_normal((3, heads, head_dim)), jnp.float32)
    x = rng.standard_normal((2, 6, width)).astype(np.float32)

    p = {name: np.asarray(getattr(attn, name)[...], np.float64) for name in (
        "in_kernel", "in_bias", "out_kernel", "out_bias", "in_lora_a", "in_lora_b", "out_lora_a", "out_lora_b")}
    # torch's in_proj_weight [3E, E] and its loralib update B_t A_t with A_t [r, E], B_t [3E, r] (FSC-CLIP)
    in_proj = p["in_kernel"].reshape(width, 3 * width).T + lora.scale * (
        p["in_lora_b"].reshape(RANK, 3 * width).T @ p["in_lora_a"].T)
    out_proj = p["out_kernel"].reshape(width, width).T + lora.scale * (p["out_lora_b"].T @ p["out_lora_a"].reshape(width, RANK).T)
    qkv = x.astype(np.float64) @ in_proj.T + p["in_bias"].reshape(-1)
    q, k, v = (qkv[..., i * width:(i + 1) * width].reshape(2, 6, heads, head_dim) for i in range(3))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
    if causal:
        scores = np.where(np.tril(np.ones((6, 6), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attended = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(2, 6, width)
    want = attended @ out_proj.T + p["out_bias"]
    np.testing.assert_allclose(np.asarray(attn(jnp.asarray(x)), np.float64), want, rtol=1e-5, atol=1e-5)


def test_patch_embedding_adapter_against_numpy() -> None:
    config = lora_config(targets=("patch_embedding",))
    model = build_model(config, nnx.Rngs(2))
    flat = randomise_b(model)
    patch, scale = 8, ALPHA / RANK
    kernel = flat[("visual", "patch_embedding")].astype(np.float64).transpose(3, 2, 0, 1)  # HWIO -> OIHW
    a, b = flat[("visual", "patch_lora_a")].astype(np.float64), flat[("visual", "patch_lora_b")].astype(np.float64)
    assert a.shape == (3 * patch, RANK * patch) and b.shape == (RANK * patch, 32 * patch)
    kernel = kernel + scale * (b.T @ a.T).reshape(kernel.shape)  # loralib: (lora_B @ lora_A).view(weight.shape)
    images = np.asarray(batch()["images"], np.float64)
    want = np.stack([np.einsum("yxi,oiyx->o", images[n, gh * patch:(gh + 1) * patch, gw * patch:(gw + 1) * patch], kernel)
                     for n in range(3) for gh in range(2) for gw in range(2)]).reshape(3, 4, 32)
    got = model.visual.embed_patches(batch()["images"])
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5)


def test_adapted_model_is_the_base_model_with_numpy_merged_kernels() -> None:
    """Every adapter at once: the LoRA model's features equal those of a plain model whose kernels are
    W + scale·A·B computed in float64 NumPy; `merge_lora` gives those kernels and a config without LoRA."""
    config = lora_config()
    adapted = build_model(config, nnx.Rngs(0))
    flat = randomise_b(adapted)
    merged = numpy_merged(flat, ALPHA / RANK)
    plain = build_model(make_small_config(), nnx.Rngs(0))
    set_params(plain, {path: value.astype(np.float32) for path, value in merged.items()})
    wanted = ["image_features", "text_features", "image_tokens", "text_tokens"]
    want, got = plain(batch(), wanted), adapted(batch(), wanted)
    for name in wanted:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)
    # the adapters do change the model: the same base weights without them give other features
    unadapted = build_model(make_small_config(), nnx.Rngs(0))
    set_params(unadapted, {p: v for p, v in flat.items() if "lora" not in str(p[-1])})
    assert np.abs(np.asarray(unadapted(batch())["image_features"]) - np.asarray(got["image_features"])).max() > 1e-2

    for params in (unflatten_dict(flat), jax.tree.map(jnp.asarray, unflatten_dict(flat))):  # NumPy and jax
        folded, folded_config = merge_lora(params, config)
        folded = flatten_dict(folded)
        assert "lora" not in folded_config and folded_config["vision"] == config["vision"]
        assert set(folded) == set(merged)
        for path, value in folded.items():
            assert value.dtype == np.float32
            np.testing.assert_allclose(np.asarray(value, np.float64), merged[path], rtol=1e-6, atol=1e-6,
                                       err_msg=str(path))


def test_merge_lora_of_a_model_without_lora_and_inconsistent_inputs() -> None:
    plain = flat_params(build_model(make_small_config(), nnx.Rngs(0)))
    params, config = merge_lora(unflatten_dict(plain), make_small_config(lora={"rank": 0}))
    assert "lora" not in config
    assert all(np.array_equal(value, plain[path]) for path, value in flatten_dict(params).items())
    adapted = flat_params(build_model(lora_config(), nnx.Rngs(0)))
    with pytest.raises(ValueError, match="hold LoRA adapters .* no model.lora"):
        merge_lora(unflatten_dict(adapted), make_small_config())
    del adapted[("visual", "patch_lora_b")]
    with pytest.raises(ValueError, match="patch_lora_a has no kernel or no B factor"):
        merge_lora(unflatten_dict(adapted), lora_config())


@pytest.mark.parametrize("lora, message", [
    ({"rank": -1}, r"model.lora.rank must be an integer >= 0"),
    ({"rank": 2.5}, r"model.lora.rank must be an integer >= 0"),
    ({"rank": 4, "alpha": 0.0}, r"model.lora.alpha must be a positive number"),
    ({"rank": 4, "targets": ("attention", "embeddings")}, r"model.lora.targets must be a non-empty subset of "
                                                          r"\['attention', 'mlp', 'patch_embedding'\], got \['attention', 'embeddings'\]"),
    ({"rank": 4, "targets": ()}, r"model.lora.targets must be a non-empty subset"),
    ({"rank": 4, "dropout": 0.1}, r"unknown model.lora keys \['dropout'\]"),
])
def test_bad_lora_settings_are_config_errors_at_start_up(lora, message) -> None:
    from configs import clip
    from jclip.config_validation import validate_config
    from jclip.errors import ConfigError

    config = clip.get_config()
    validate_config(config)  # the default (rank 0) is valid
    config.model.lora = lora
    with pytest.raises(ConfigError, match=message):
        validate_config(config)
    with pytest.raises(ValueError, match=message):
        build_model(make_small_config(lora=lora), nnx.Rngs(0))


def test_a_tower_without_adapters_refuses_lora() -> None:
    from jclip.models import towers
    from jclip.models.text import CLIP_TEXT
    import dataclasses

    towers.register_tower(dataclasses.replace(CLIP_TEXT, kind="clip_without_lora", lora_targets=()))
    config = make_small_config(lora={"rank": 2})
    config["text"] = {**config["text"], "kind": "clip_without_lora"}
    with pytest.raises(ValueError, match="model.text.kind 'clip_without_lora' has no LoRA adapters"):
        towers.check_tower(config, "text")
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        build_model(config, nnx.Rngs(0))
    config["lora"] = {"rank": 0}
    build_model(config, nnx.Rngs(0))  # LoRA off: the tower builds as before


def test_adapters_map_to_valid_mesh_specs_and_count() -> None:
    from jclip.models import abstract_model, count_params
    from jclip.parallel import DEFAULT_RULES

    config = get_preset("B/32", lora={"rank": 4, "targets": ALL_TARGETS})
    model = abstract_model(config)
    params = nnx.state(model, nnx.Param)
    with nnx.logical_axis_rules(DEFAULT_RULES):
        specs = dict(nnx.to_flat_state(nnx.get_partition_spec(params)))
    shapes = dict(nnx.to_flat_state(params))
    sizes = {"data": 2, "fsdp": 2, "tensor": 2}
    adapters = 0
    for path, spec in specs.items():
        if "lora" not in str(path[-1]):
            continue
        shape = shapes[path].shape
        adapters += int(np.prod(shape))
        for dim, entry in zip(shape, spec.get_value()):
            axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
            assert dim % int(np.prod([sizes[a] for a in axes])) == 0, (path, spec, shape)
    # per block, rank 4: in (E + 3E)·4, out (E + E)·4, c_fc (E + 4E)·4, c_proj (4E + E)·4 = 64·E;
    # the patch convolution: (3·32)·(4·32) + (4·32)·(768·32) (loralib's Conv2d, as FSC-CLIP adapts conv1)
    want = 12 * 64 * 768 + 12 * 64 * 512 + 96 * 128 + 128 * 768 * 32
    assert adapters == want == 4_141_056
    assert count_params(config) == 151_277_313 + want


def test_adapters_take_weight_decay_like_fscclips() -> None:
    """FSC-CLIP (OpenCLIP's trainer) decays every parameter of 2 or more dimensions that is not a norm, bias
    or the logit scale: its lora_A/lora_B matrices included. jclip's decay mask does the same for the adapters."""
    from jclip.optim import decay_mask, path_name

    params = nnx.to_pure_dict(nnx.state(build_model(lora_config(), nnx.Rngs(0)), nnx.Param))
    decays = {path_name(path): flag for path, flag in jax.tree_util.tree_flatten_with_path(decay_mask(params))[0]}
    adapters = {path: flag for path, flag in decays.items() if "lora_" in path}
    assert len(adapters) == 2 * 2 * 8 + 2 and all(adapters.values())
