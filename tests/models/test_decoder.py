"""The decoder text towers (`gemma3`, `llama`, jclip.models.decoder): loading GGUF files into the module's
layout, parity with transformers' Gemma3TextModel / LlamaModel (tiny GGUFs written here, and the real Gemma 3
270M and SmolLM2-135M files when their wheels are installed), the bidirectional top blocks and padding masks
block by block, the tower locks' paths, and bad files at start-up."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jclip import models, pretrained
from jclip.build import ModelFunctions
from jclip.data.tokenizer import make_tokenizer
from jclip.errors import ConfigError
from jclip.models import decoder, pretrained_files
from jclip_testing import (dense_scene_captions, needs_pretrained, run_reference, tiny_decoder_config, write_gguf,
                           write_gguf_without_vocabulary, write_tiny_decoder_gguf)

gguf = pytest.importorskip("gguf")


def model_config(text: dict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "embed_dim": 16,
        "vision": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        "text": text,
    })


def loaded_model(text: dict, loaded=None):
    """The CLIP model of `text` with its weights file placed as a run places it (`loaded`: the file as read
    before), and the load report."""
    config = model_config(text)
    functions = ModelFunctions.create(config, seed=0)
    loaded = pretrained.load_pretrained(config) if loaded is None else loaded
    params, report = pretrained.place_pretrained(loaded, zero_params(functions))
    return functions.model(params), report


def zero_params(functions: ModelFunctions) -> dict:
    """The model's parameters as zeros, for the file's tensors to replace: the text tower's hidden states read
    nothing else, and a random init of Gemma's 262k-row embedding (eager, float64) cost seconds per model."""
    return jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), nnx.to_pure_dict(functions.abstract_state))


def scratch_tower(kind: str, **overrides) -> decoder.DecoderTextTower:
    config = tiny_decoder_config(kind, **overrides)
    tower = models.tower_for({"text": config}, "text")
    return tower.module(**tower.build_args(config), output_dim=8, rngs=nnx.Rngs(0))


def right_padded(rows: list[list[int]], length: int) -> np.ndarray:
    return np.array([row + [-1] * (length - len(row)) for row in rows], np.int32)


# -- transformers, in the PyTorch environment ------------------------------------------------------------

TORCH_DECODER = r"""
import json, os, sys
import numpy as np, torch, transformers
from transformers.initialization import no_init_weights
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
inputs = json.load(open(sys.argv[1]))
path = inputs["gguf"]
config = transformers.AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
for key, value in inputs["config"].items():
    setattr(config, key, value)
config._attn_implementation = "eager"
with no_init_weights():  # every weight comes from the file (the head is the tied embedding)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
# transformers' own GGUF reading: gguf's dequantisation, its name map, Gemma's norms minus 1, Llama's q/k
# un-permuted.
tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
missing, unexpected = model.load_state_dict(tensors, strict=False)
assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
ids, mask = torch.tensor(inputs["ids"]), torch.tensor(inputs["mask"])
outputs = {"layer_types": np.array(getattr(config, "layer_types", None) or [], dtype=str),
           "sliding_window": np.array(getattr(config, "sliding_window", None) or 0),
           "scale": np.array(model.model.layers[0].self_attn.scaling)}
with torch.no_grad():
    outputs["causal"] = model.model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    if inputs.get("bidirectional"):  # EmbeddingGemma's switch: every block bidirectional, windows halved
        both = type(config)(**{**config.to_dict(), "use_bidirectional_attention": True})
        both._attn_implementation = "eager"
        with no_init_weights():
            other = transformers.AutoModelForCausalLM.from_config(both, dtype=torch.float32).eval()
        other.load_state_dict(model.state_dict())
        outputs["bidirectional"] = other.model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
        outputs["bidirectional_window"] = np.array(both.sliding_window)
    if inputs.get("float64"):  # the same weights and maths in float64, free of float32 rounding
        outputs["causal64"] = model.double().model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
        if inputs.get("bidirectional"):
            outputs["bidirectional64"] = other.double().model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
np.savez(sys.argv[2], **outputs)
"""


def reference(torch_python, gguf_path, ids: np.ndarray, tmp_path, *, bidirectional=False, config=None,
              float64=False) -> dict:
    mask = (ids >= 0).astype(np.int64)
    return run_reference(torch_python, TORCH_DECODER, {
        "gguf": str(gguf_path), "ids": np.where(ids >= 0, ids, 0).tolist(), "mask": mask.tolist(),
        "bidirectional": bidirectional, "config": config or {}, "float64": float64}, tmp_path)


def real_file_reference(torch_python, name: str, ids: np.ndarray, tmp_path, bidirectional=False) -> dict:
    """`reference` (with float64) for the real file `name`, given to transformers without its vocabulary arrays
    (`write_gguf_without_vocabulary`): the ids are made here, and parsing the arrays was most of its minute."""
    path = tmp_path / f"{name}-weights.gguf"
    vocab_size = write_gguf_without_vocabulary(pretrained_files.weights_path(name), path)
    return reference(torch_python, path, ids, tmp_path, bidirectional=bidirectional, float64=True,
                     config={"vocab_size": vocab_size})


def float64_hidden_states(text: dict, ids: np.ndarray, loaded) -> np.ndarray:
    """The tower's final hidden states with float64 parameters and compute (the same file's weights)."""
    with jax.enable_x64(True):
        config = model_config(text)
        config.dtype = config.param_dtype = "float64"
        functions = ModelFunctions.create(config, seed=0)
        params, _ = pretrained.place_pretrained(loaded, zero_params(functions))
        return np.asarray(functions.model(params).text.hidden_states(ids))


def max_real_diff(hidden, expected, ids) -> float:
    real = ids >= 0
    return float(np.max(np.abs(np.asarray(hidden)[real] - expected[real])))


def assert_float32_close(hidden, expected, ids) -> None:
    """Real tokens' hidden states: 99.9% within 1e-4, on average within 1e-5, all within 5e-6 of the largest
    |value| (about 40 float32 ulps there).

    Why not all within 1e-4: the real models' final hidden states reach 50-140 in a few channels (Gemma's
    residual stream reaches 1e5 before the final norm), and float32 rounding over the blocks, relative to those
    values, moves any implementation by about 1e-4: transformers' own float32 result is 1.1-1.4e-4 from a
    float64 run (Gemma 3 270M, measured), jclip's 2.4e-4, so two float32 implementations differ by as much."""
    real = ids >= 0
    diff = np.abs(np.asarray(hidden)[real] - expected[real])
    assert np.quantile(diff, 0.999) < 1e-4 and np.mean(diff) < 1e-5
    assert np.max(diff) < 5e-6 * np.max(np.abs(expected[real]))


def mean_real_diff(hidden, expected, ids) -> float:
    real = ids >= 0
    return float(np.mean(np.abs(np.asarray(hidden)[real] - expected[real])))


# -- loading tiny GGUFs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gemma3", "llama"])
def test_a_gguf_loads_into_the_towers_layout(tmp_path, kind):
    path = tmp_path / f"{kind}.gguf"
    hf = write_tiny_decoder_gguf(path, kind)
    config = tiny_decoder_config(kind, weights=str(path), tokenizer="gguf:unused.gguf")
    tower = models.tower_for({"text": config}, "text")
    weights = tower.load_weights(tower.settings(config))
    width, heads, kv_heads, head_dim = (config[k] for k in ("width", "heads", "kv_heads", "head_dim"))
    params = weights.params
    assert weights.unused == () and weights.source == str(path)
    # transformers' q_proj [heads * head_dim, width] is the query kernel [width, heads, head_dim] transposed:
    # for a Llama file this holds only once llama.cpp's RoPE permutation of q and k is undone.
    q = hf["model.layers.1.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(params["blocks/1/attn/query"], q.T.reshape(width, heads, head_dim))
    k = hf["model.layers.1.self_attn.k_proj.weight"]
    np.testing.assert_array_equal(params["blocks/1/attn/key"], k.T.reshape(width, kv_heads, head_dim))
    o = hf["model.layers.1.self_attn.o_proj.weight"]
    np.testing.assert_array_equal(params["blocks/1/attn/out"], o.T.reshape(heads, head_dim, width))
    np.testing.assert_array_equal(params["blocks/1/mlp/down"], hf["model.layers.1.mlp.down_proj.weight"].T)
    # Norms: transformers' weights (Gemma's w of (1 + w); the file holds 1 + w), to float32 rounding.
    np.testing.assert_allclose(params["final_norm/scale"], hf["model.norm.weight"], atol=1e-7)
    np.testing.assert_allclose(params["blocks/1/attn_norm/scale"], hf["model.layers.1.input_layernorm.weight"],
                               atol=1e-7)
    if kind == "gemma3":
        np.testing.assert_allclose(params["blocks/1/attn/query_norm/scale"],
                                   hf["model.layers.1.self_attn.q_norm.weight"], atol=1e-7)
        np.testing.assert_allclose(params["blocks/1/mlp_norm/scale"],
                                   hf["model.layers.1.pre_feedforward_layernorm.weight"], atol=1e-7)
    else:
        np.testing.assert_allclose(params["blocks/1/mlp_norm/scale"],
                                   hf["model.layers.1.post_attention_layernorm.weight"], atol=1e-7)
    # The embedding is Q8_0 in the file.
    assert np.max(np.abs(params["embedding"] - hf["model.embed_tokens.weight"])) < 0.05
    model_paths = {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(
        tower.module(**tower.build_args(config), output_dim=8, rngs=nnx.Rngs(0)), nnx.Param))}
    assert set(params) == model_paths - {"projection/kernel"}


@pytest.mark.parametrize("kind, bidirectional, window", [("gemma3", False, 4), ("gemma3", True, 32),
                                                         ("llama", False, None)])
def test_tiny_gguf_hidden_states_equal_transformers(torch_python, tmp_path, kind, bidirectional, window):
    """Causal Gemma with a 4-token window over 11 tokens (the window binds in the local blocks), every block
    bidirectional against transformers' use_bidirectional_attention (texts within its halved window), Llama."""
    path = tmp_path / f"{kind}.gguf"
    numbers = {"sliding_window": window} if window else {}
    write_tiny_decoder_gguf(path, kind, seed=1, **numbers)
    layers = tiny_decoder_config(kind)["layers"]
    text = tiny_decoder_config(kind, weights=str(path), tokenizer="gguf:unused.gguf",
                               bidirectional_top_k=layers if bidirectional else 0, **numbers)
    model, _ = loaded_model(text)
    ids = right_padded([[2, 17, 33, 5, 60, 61, 8, 90, 11, 4, 3], [2, 45, 7], [2, 9, 9, 9, 30, 1]], 11)
    config = {"query_pre_attn_scalar": text["head_dim"]} if kind == "gemma3" else {}
    expected = reference(torch_python, path, ids, tmp_path, bidirectional=bidirectional, config=config)
    if kind == "gemma3":  # the file's numbers as transformers reads them
        assert list(expected["layer_types"]) == ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                                 for i in range(layers)]
        assert int(expected["sliding_window"]) == window
    with jax.default_matmul_precision("highest"):
        hidden = model.text.hidden_states(ids)
    assert max_real_diff(hidden, expected["bidirectional" if bidirectional else "causal"], ids) < 1e-5
    if bidirectional:
        assert max_real_diff(hidden, expected["causal"], ids) > 1e-2  # the switch matters


# -- the real files ----------------------------------------------------------------------------------------

def parity_texts() -> list[str]:
    # Several lengths in one right-padded batch: dense captions, a short caption, a word, unicode.
    return [*dense_scene_captions(2, seed=5), "A red circle on a grey background.", "Hello",
            "Ünïcödé — 日本語 🙂, 3.14 and it's"]


@pytest.mark.slow
@pytest.mark.xla_optimized  # a real-sized decoder in float32 and float64
@needs_pretrained("gemma3-270m")
def test_gemma3_270m_hidden_states_equal_transformers(torch_python, tmp_path):
    text = models.pretrained_text_tower("gemma3-270m", context_length=96)
    loaded = pretrained.load_pretrained(model_config(text))
    causal, report = loaded_model(text, loaded)
    both, _ = loaded_model({**text, "bidirectional_top_k": 18}, loaded)
    ids = make_tokenizer(models.tokenizer_spec(model_config(text)), 96).batch(parity_texts())
    ids = ids[:, : int(np.max(np.sum(ids >= 0, axis=1)))]
    assert 60 < ids.shape[1] < 257  # within transformers' halved bidirectional window (257)
    expected = real_file_reference(torch_python, "gemma3-270m", ids, tmp_path, bidirectional=True)
    assert float(expected["scale"]) == 256 ** -0.5 and int(expected["sliding_window"]) == 512
    with jax.default_matmul_precision("highest"):
        causal_hidden, both_hidden = causal.text.hidden_states(ids), both.text.hidden_states(ids)
    for name, hidden in (("causal", causal_hidden), ("bidirectional", both_hidden)):
        print(f"gemma3-270m, {name}: max abs diff {max_real_diff(hidden, expected[name], ids):.3g}, mean "
              f"{mean_real_diff(hidden, expected[name], ids):.3g} (largest |hidden| "
              f"{np.max(np.abs(expected[name][ids >= 0])):.1f})")
        assert_float32_close(hidden, expected[name], ids)
    # In float64 on both sides the implementations agree to the acceptance bound everywhere.
    for name, k in (("causal", 0), ("bidirectional", 18)):
        hidden64 = float64_hidden_states({**text, "bidirectional_top_k": k}, ids, loaded)
        diff = max_real_diff(hidden64, expected[name + "64"], ids)
        print(f"gemma3-270m, {name}, float64: max abs diff {diff:.3g}")
        assert diff < 1e-4
    assert "model.text: loaded 236 tensors" in "\n".join(report)  # 2 + 13 per block; nothing unused
    assert "in the file but not used: nothing" in "\n".join(report)


@pytest.mark.slow
@pytest.mark.xla_optimized  # a real-sized decoder in float32 and float64
@needs_pretrained("smollm2-135m")
def test_smollm2_135m_hidden_states_equal_transformers(torch_python, tmp_path):
    text = models.pretrained_text_tower("smollm2-135m", context_length=96)
    loaded = pretrained.load_pretrained(model_config(text))
    model, report = loaded_model(text, loaded)
    ids = make_tokenizer(models.tokenizer_spec(model_config(text)), 96).batch(parity_texts())
    ids = ids[:, : int(np.max(np.sum(ids >= 0, axis=1)))]
    expected = real_file_reference(torch_python, "smollm2-135m", ids, tmp_path)
    with jax.default_matmul_precision("highest"):
        hidden = model.text.hidden_states(ids)
    print(f"smollm2-135m: max abs diff {max_real_diff(hidden, expected['causal'], ids):.3g}, mean "
          f"{mean_real_diff(hidden, expected['causal'], ids):.3g} (largest |hidden| "
          f"{np.max(np.abs(expected['causal'][ids >= 0])):.1f})")
    assert_float32_close(hidden, expected["causal"], ids)
    diff = max_real_diff(float64_hidden_states(text, ids, loaded), expected["causal64"], ids)
    print(f"smollm2-135m, float64: max abs diff {diff:.3g}")
    assert diff < 1e-4
    assert "model.text: loaded 272 tensors" in "\n".join(report)  # 2 + 9 per block


# -- masks -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, k", [("gemma3", 0), ("gemma3", 2), ("gemma3", 6), ("llama", 1)])
def test_a_later_token_reaches_earlier_ones_from_the_first_bidirectional_block(kind, k):
    tower = scratch_tower(kind, bidirectional_top_k=k)
    layers = len(tower.blocks)
    ids = right_padded([[2, 10, 11, 12, 13, 14, 15]], 9)
    changed = ids.copy()
    changed[0, 5] = 40  # a later token
    before, after = tower.block_outputs(ids), tower.block_outputs(changed)
    for index in range(layers):
        earlier = np.max(np.abs(np.asarray(before[index])[0, :5] - np.asarray(after[index])[0, :5]))
        if index < layers - k:
            assert earlier == 0.0, f"block {index} (causal) lets position 5 reach an earlier one"
        else:
            assert earlier > 1e-4, f"block {index} (bidirectional) does not let position 5 reach an earlier one"
        later = np.max(np.abs(np.asarray(before[index])[0, 5] - np.asarray(after[index])[0, 5]))
        assert later > 1e-4


@pytest.mark.parametrize("kind, k", [("gemma3", 0), ("gemma3", 3), ("gemma3", 6), ("llama", 3)])
def test_padding_never_reaches_real_tokens_in_any_block(kind, k):
    tower = scratch_tower(kind, bidirectional_top_k=k)
    rows = [[2, 10, 11, 12], [2, 30, 31, 32, 33, 34]]
    ids = right_padded(rows, 8)
    reference_outputs = [np.asarray(output) for output in tower.block_outputs(ids)]
    other_pads = np.where(ids >= 0, ids, -7)  # any negative id is padding
    more_padding = right_padded(rows, 14)  # within the 4-token window of the local blocks or not
    for variant in (other_pads, more_padding):
        outputs = tower.block_outputs(variant)
        for index, (output, expected) in enumerate(zip(outputs, reference_outputs)):
            for row, tokens in enumerate(rows):
                np.testing.assert_allclose(np.asarray(output)[row, : len(tokens)], expected[row, : len(tokens)],
                                           atol=1e-5, err_msg=f"block {index}, row {row}")
    features = tower(ids)
    np.testing.assert_allclose(tower(more_padding), features, atol=1e-5)


def test_the_sliding_window_of_local_blocks_in_both_modes():
    valid = jnp.ones((1, 6), bool)
    causal = np.asarray(decoder.attention_mask(valid, causal=True, window=3))[0, 0]
    both = np.asarray(decoder.attention_mask(valid, causal=False, window=3))[0, 0]
    assert causal[5].tolist() == [False, False, False, True, True, True]  # i - 3 < j <= i
    assert both[2].tolist() == [True, True, True, True, True, False]  # |i - j| < 3
    padded = np.asarray(decoder.attention_mask(jnp.array([[True, True, True, False, False, False]]), causal=False,
                                               window=None))[0, 0]
    assert not padded[:, 3:].any() and padded[:, :3].all()


def test_remat_changes_nothing():
    ids = right_padded([[2, 10, 11, 12], [2, 30, 31, 32, 33, 34]], 8)
    plain, remat = scratch_tower("gemma3", bidirectional_top_k=2), scratch_tower("gemma3", bidirectional_top_k=2)
    remat.remat = True
    np.testing.assert_array_equal(np.asarray(remat(ids)), np.asarray(plain(ids)))


def test_pooling_and_token_outputs():
    tower = scratch_tower("llama", pool="last")
    ids = right_padded([[2, 10, 11, 12], [2, 30, 31, 32, 33, 34]], 8)
    out = tower.encode(ids, tokens=True)
    np.testing.assert_allclose(out["features"][0], out["tokens"][0, 3], atol=1e-6)  # the last real token
    np.testing.assert_allclose(out["features"][1], out["tokens"][1, 5], atol=1e-6)
    np.testing.assert_array_equal(out["token_mask"], ids >= 0)


# -- config, locks, presets --------------------------------------------------------------------------------

def test_tower_locks_leave_the_top_four_blocks_the_final_norm_and_the_projection():
    from flax.traverse_util import flatten_dict

    from jclip.param_rules import FROZEN, Partition

    text = tiny_decoder_config("gemma3", layers=18, tokenizer="gguf:unused.gguf")
    config = ml_collections.ConfigDict({"model": model_config(text).to_dict(), "optim": {
        "tower_locks": {"text": {"enabled": True, "unlocked_layers": 4}}}})
    params = ModelFunctions.create(config.model, seed=0).init_params()
    actions = {"/".join(map(str, key)): action
               for key, action in flatten_dict(Partition.create(config, params).actions).items()}
    trainable = {path for path, action in actions.items() if path.startswith("text/") and action != FROZEN}
    expected = {path for path in actions if path.startswith(tuple(f"text/blocks/{i}/" for i in range(14, 18)))}
    expected |= {"text/final_norm/scale", "text/projection/kernel"}
    assert trainable == expected
    assert len(expected) == 4 * 13 + 2
    assert actions["text/embedding"] == FROZEN and actions["text/blocks/13/mlp/up"] == FROZEN
    assert all(action != FROZEN for path, action in actions.items() if not path.startswith("text/"))


@pytest.mark.parametrize("change, message", [
    ({"bidirectional_top_k": 7}, r"bidirectional_top_k must be an integer in \[0, layers = 6\], got 7"),
    ({"kv_heads": 3}, r"heads \(4\) must be a multiple of kv_heads \(3\): set model.text.kv_heads to one of "
                      r"\[1, 2, 4\] or change model.text.heads$"),
    ({"context_length": 40000}, r"context_length \(40000\) exceeds the tower's max_positions \(32768\)"),
    ({"pool": "eos"}, "pool 'eos' needs model.text.eos_id"),
    ({"tokenizer": ""}, "model.text.tokenizer is needed"),
])
def test_config_checks_name_the_field(change, message):
    config = {**tiny_decoder_config("gemma3", tokenizer="gguf:unused.gguf"), **change}
    tower = models.tower_for({"text": config}, "text")
    with pytest.raises(ValueError, match=message):
        tower.check(tower.settings(config))


def test_a_sharded_init_and_forward_equal_the_single_device_ones():
    from jax.sharding import PartitionSpec

    from jclip.parallel import DEFAULT_RULES, make_mesh, sharding_context

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices; tests/conftest.py sets XLA_FLAGS before jax is imported")
    config = model_config(tiny_decoder_config("gemma3", tokenizer="gguf:unused.gguf", bidirectional_top_k=2)).to_dict()
    ids = jnp.asarray(right_padded([[2, 10, 11, 12]] * 4 + [[2, 30, 31, 32, 33, 34]] * 4, 8))
    expected = nnx.jit(lambda model, x: model.text(x))(models.build_model(config, nnx.Rngs(0)), ids)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with sharding_context(mesh, DEFAULT_RULES):
        graphdef, abstract_state = nnx.split(models.abstract_model(config))
        shardings = nnx.get_named_sharding(abstract_state, mesh)
        state = jax.jit(lambda: nnx.state(models.build_model(config, nnx.Rngs(0))), out_shardings=shardings)()
        blocks = state["text"]["blocks"][0]["attn"]
        assert blocks["query"].get_value().sharding.spec == PartitionSpec("fsdp", "tensor", None)
        assert blocks["key"].get_value().sharding.spec == PartitionSpec("fsdp", None, None)  # one KV head
        features = nnx.jit(lambda model, x: model.text(x))(nnx.merge(graphdef, state), ids)
    np.testing.assert_allclose(np.asarray(features), np.asarray(expected), atol=1e-5)


def test_the_gemma_preset_maps_to_valid_mesh_specs():
    from jax.sharding import PartitionSpec

    from jclip.parallel import DEFAULT_RULES

    config = {"embed_dim": 640, "vision": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1,
                                           "head_width": 16},
              "text": models.pretrained_text_tower("gemma3-270m", tokenizer="gguf:unused.gguf")}
    params = nnx.state(models.abstract_model(config), nnx.Param)
    with nnx.logical_axis_rules(DEFAULT_RULES):
        specs = dict(nnx.to_flat_state(nnx.get_partition_spec(params)))
    shapes = dict(nnx.to_flat_state(params))
    sizes = {"data": 2, "fsdp": 2, "tensor": 2}
    for path, spec in specs.items():
        spec = spec.get_value()
        assert isinstance(spec, PartitionSpec), path
        for dim, entry in zip(shapes[path].shape, spec):
            axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
            assert dim % int(np.prod([sizes[a] for a in axes])) == 0, (path, spec)
    assert specs[("text", "embedding")].get_value() == PartitionSpec("tensor", "fsdp")
    assert specs[("text", "blocks", 5, "mlp", "gate")].get_value() == PartitionSpec("fsdp", "tensor")


# -- bad files at start-up ---------------------------------------------------------------------------------

def test_missing_gguf_is_an_error_naming_it(tmp_path):
    text = tiny_decoder_config("gemma3", weights=str(tmp_path / "absent.gguf"))
    with pytest.raises(ConfigError, match="absent.gguf does not exist"):
        pretrained.load_pretrained(model_config(text))


def test_truncated_gguf_is_an_error_naming_it(tmp_path):
    whole = tmp_path / "whole.gguf"
    write_tiny_decoder_gguf(whole, "gemma3")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ConfigError, match=f"{truncated} is not a readable GGUF file"):
        pretrained.load_pretrained(model_config(tiny_decoder_config("gemma3", weights=str(truncated))))


def test_a_gguf_of_another_architecture_is_an_error_naming_both(tmp_path):
    llama = tmp_path / "llama.gguf"
    write_tiny_decoder_gguf(llama, "llama")
    with pytest.raises(ConfigError, match=f"{llama} holds a 'llama' model .*not 'gemma3'"):
        pretrained.load_pretrained(model_config(tiny_decoder_config("gemma3", weights=str(llama))))


def test_a_gguf_of_other_numbers_is_an_error_naming_them(tmp_path):
    path = tmp_path / "gemma.gguf"
    write_tiny_decoder_gguf(path, "gemma3")
    with pytest.raises(ConfigError, match="model.text.layers is 4 but the file's gemma3.block_count is 6"):
        pretrained.load_pretrained(model_config(tiny_decoder_config("gemma3", weights=str(path), layers=4)))
    with pytest.raises(ConfigError, match="model.text.sliding_window is 512 but the file's "
                                          "gemma3.attention.sliding_window is 4"):
        pretrained.load_pretrained(model_config(tiny_decoder_config("gemma3", weights=str(path),
                                                                    sliding_window=512)))
    with pytest.raises(ConfigError, match="model.text.vocab_size is 100 but the file's gemma3.vocab_size is 96"):
        pretrained.load_pretrained(model_config(tiny_decoder_config("gemma3", weights=str(path), vocab_size=100)))
    write_tiny_decoder_gguf(path, "gemma3", vocab_metadata=False)  # as the real Gemma 3 file: the shape says it
    with pytest.raises(ConfigError, match=r"token_embd.weight is \[96, 32\] .*model.text.vocab_size 100, width 32"):
        pretrained.load_pretrained(model_config(tiny_decoder_config("gemma3", weights=str(path), vocab_size=100)))


def test_a_tokenizer_larger_than_the_vocabulary_stops_validation(tmp_path):
    """Through validate_config, as `python -m jclip.main` runs it: the GGUF's own tokenizer has 100 tokens."""
    from configs import clip
    from jclip.config_validation import validate_config

    path = tmp_path / "tokens.gguf"
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", *[chr(ord("a") + i) for i in range(26)],
              *[f"{a}{b}" for a in "abcdefg" for b in "abcdefghij"]]
    write_gguf(path, "gemma3", {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
                                "tokenizer.ggml.scores": [0.0] * len(tokens),
                                "tokenizer.ggml.token_type": [3, 3, 3, 3] + [1] * (len(tokens) - 4),
                                "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.unknown_token_id": 3},
               {"output_norm.weight": np.ones(4, np.float32)})
    config = clip.get_config()
    config.model.text = tiny_decoder_config("gemma3", tokenizer=f"gguf:{path}", vocab_size=96)
    with pytest.raises(ConfigError, match=f"model.text.tokenizer 'gguf:{path}' has 100 ids but "
                                          "model.text.vocab_size is 96"):
        validate_config(config)
    config.model.text.vocab_size = 100
    validate_config(config)


# -- a run -------------------------------------------------------------------------------------------------

RUN_CONFIG = '''
from configs import clip


def get_config(arg=None):
    config = clip.get_config(arg)
    config.model.text = {text!r}
    config.optim.tower_locks.text = {{"enabled": True, "unlocked_layers": 2}}
    config.data.caption_field = "dense_caption"
    return config
'''


@pytest.mark.slow
def test_a_run_trains_the_top_blocks_of_a_gguf_tower_and_leaves_the_rest(scenes_data_dir, tmp_path):
    """A micro run (3 steps, 8 fake devices) with a tiny Gemma GGUF, weights and tokenizer: loaded and reported,
    the two top blocks bidirectional and trained, the rest bit-identical."""
    import json
    import re

    from flax.traverse_util import flatten_dict

    from jclip import parallel
    from jclip.restore import restore_run
    from jclip_testing import gemma_style_tokenizer, micro_run_flags, run_jclip_main

    words = sorted({word for caption in dense_scene_captions(300) for word in re.findall(r"[A-Za-z]+", caption)})
    tokenizer = gemma_style_tokenizer(words)
    vocab_size = len(tokenizer["tokenizer.ggml.tokens"])
    path = tmp_path / "tiny-gemma.gguf"
    write_tiny_decoder_gguf(path, "gemma3", tokenizer=tokenizer, vocab_size=vocab_size)
    text = tiny_decoder_config("gemma3", context_length=160, vocab_size=vocab_size, weights=str(path),
                               bidirectional_top_k=2)
    config_file = tmp_path / "gemma_config.py"
    config_file.write_text(RUN_CONFIG.format(text=text))
    flags = [flag for flag in micro_run_flags(scenes_data_dir, total_steps=3, checkpoint_every=3)
             if not flag.startswith("--config.model.text.")]
    stdout = run_jclip_main(tmp_path / "run", str(config_file), flags)
    assert f"model.text: loaded 80 tensors from {path}" in stdout  # 2 + 13 per block
    assert "kept at initialisation: projection/kernel" in stdout and "not used: nothing" in stdout

    config = ml_collections.ConfigDict(json.loads((tmp_path / "run" / "config.json").read_text()))
    _, params, _ = restore_run(str(tmp_path / "run"), None, config, parallel.make_mesh({"data": -1, "fsdp": 1,
                                                                                         "tensor": 1}))
    params = {"/".join(map(str, key)): np.asarray(jax.device_get(value)) for key, value in flatten_dict(params).items()}
    loaded = models.tower_for({"text": text}, "text").load_weights(models.towers.tower_settings({"text": text}, "text"))
    for name in ("embedding", "blocks/0/attn/query", "blocks/3/mlp/down", "blocks/3/post_mlp_norm/scale"):
        np.testing.assert_array_equal(params["text/" + name], loaded.params[name], err_msg=name)
    for name in ("blocks/4/attn/query", "blocks/5/mlp/down", "final_norm/scale"):
        assert not np.array_equal(params["text/" + name], loaded.params[name]), name
