"""jclip.models.gguf_weights: metadata, dequantised tensors in NumPy order, the unused-tensor report, and the
errors for missing, truncated, foreign and wrong-architecture files. The files are tiny GGUFs written here."""

from __future__ import annotations

import numpy as np
import pytest

from jclip_testing import write_gguf

gguf = pytest.importorskip("gguf")

from jclip.models.gguf_weights import check_metadata, open_gguf  # noqa: E402


@pytest.fixture
def small_gguf(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"blk.0.attn_q.weight": rng.normal(size=(8, 64)).astype(np.float32),
               "blk.0.ffn_up.weight": rng.normal(size=(16, 64)).astype(np.float32),
               "output_norm.weight": rng.normal(size=(64,)).astype(np.float32)}
    metadata = {"llama.block_count": 1, "llama.rope.freq_base": 10000.0, "llama.attention.layer_norm_rms_epsilon": 1e-5,
                "general.name": "tiny", "tokenizer.ggml.add_bos_token": False}
    path = write_gguf(tmp_path / "tiny.gguf", "llama", metadata, tensors,
                      quantise={"blk.0.attn_q.weight": "Q8_0", "blk.0.ffn_up.weight": "Q4_1"})
    return path, tensors


def test_metadata_and_architecture(small_gguf):
    path, _ = small_gguf
    file = open_gguf(str(path), "llama")
    assert file.architecture == "llama"
    assert file.arch_value("block_count") == 1 and file.value("general.name") == "tiny"
    assert file.value("tokenizer.ggml.add_bos_token") is False
    assert file.arch_value("rope.freq_base") == 10000.0
    assert file.arch_value("missing", None) is None
    with pytest.raises(ValueError, match="tiny.gguf has no metadata 'llama.missing'"):
        file.arch_value("missing")


def test_tensors_are_dequantised_float32_in_numpy_order(small_gguf):
    path, tensors = small_gguf
    file = open_gguf(str(path))
    for name, array in tensors.items():
        loaded = file.tensor(name)
        assert loaded.dtype == np.float32 and loaded.shape == array.shape == file.shape(name)
    np.testing.assert_array_equal(file.tensor("output_norm.weight"), tensors["output_norm.weight"])
    # Quantised tensors: gguf's own round trip, and close to the original (Q8_0 ~0.5%, Q4_1 ~10% of the range).
    query = file.tensor("blk.0.attn_q.weight")
    expected = gguf.quants.dequantize(gguf.quants.quantize(tensors["blk.0.attn_q.weight"],
                                                           gguf.GGMLQuantizationType.Q8_0),
                                      gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(query, expected)
    assert np.max(np.abs(query - tensors["blk.0.attn_q.weight"])) < 0.05
    assert np.max(np.abs(file.tensor("blk.0.ffn_up.weight") - tensors["blk.0.ffn_up.weight"])) < 0.6


def test_unused_lists_the_tensors_not_taken(small_gguf):
    path, _ = small_gguf
    file = open_gguf(str(path))
    file.tensor("output_norm.weight")
    assert file.unused() == ("blk.0.attn_q.weight", "blk.0.ffn_up.weight")
    with pytest.raises(ValueError, match="lacks the tensor blk.9.attn_q.weight"):
        file.tensor("blk.9.attn_q.weight")


def test_a_missing_file_is_file_not_found_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'absent.gguf'} does not exist"):
        open_gguf(str(tmp_path / "absent.gguf"))


@pytest.mark.parametrize("keep", [3, 200, -100])
def test_a_truncated_file_is_a_value_error_naming_it(small_gguf, tmp_path, keep):
    path, _ = small_gguf
    data = path.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[:keep] if keep > 0 else data[:keep])
    with pytest.raises(ValueError, match=f"{truncated} (is not a readable GGUF file|is truncated)"):
        open_gguf(str(truncated))


def test_a_foreign_file_is_a_value_error_naming_it(tmp_path):
    other = tmp_path / "model.safetensors"
    other.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " * 10)
    with pytest.raises(ValueError, match=f"{other} is not a readable GGUF file"):
        open_gguf(str(other))


def test_another_architecture_is_an_error_naming_the_file_and_both(small_gguf):
    path, _ = small_gguf
    with pytest.raises(ValueError, match=f"{path} holds a 'llama' model .*not 'gemma3'"):
        open_gguf(str(path), "gemma3")


def test_check_metadata_names_every_mismatch(small_gguf):
    path, _ = small_gguf
    file = open_gguf(str(path))
    config = {"layers": 2, "rope_base": 10000, "norm_eps": 1e-5, "width": 64}
    with pytest.raises(ValueError, match=r"model.text.layers is 2 but the file's llama.block_count is 1$"):
        check_metadata(file, config, [("layers", "block_count"), ("rope_base", "rope.freq_base"),
                                      ("norm_eps", "attention.layer_norm_rms_epsilon"),
                                      ("width", "embedding_length")])  # absent in the file: not checked
    check_metadata(file, {**config, "layers": 1}, [("layers", "block_count"), ("norm_eps",
                                                                               "attention.layer_norm_rms_epsilon")])


def test_every_field_and_tensor_equals_the_stock_readers(tmp_path):
    """The reader reads through a plain view of its memory map (for speed); gguf's own reader is the reference,
    on a file with a vocabulary-like string array, float and int arrays, scalars and quantised tensors."""
    rng = np.random.default_rng(1)
    tokens = [f"tok{i}" for i in range(3000)] + ["Ünïcödé 日本語 🙂", ""]
    metadata = {"llama.block_count": 2, "llama.rope.freq_base": 500000.0, "general.name": "vocab",
                "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": rng.normal(size=len(tokens)).tolist(),
                "tokenizer.ggml.token_type": [1] * len(tokens), "tokenizer.ggml.add_bos_token": True}
    tensors = {"token_embd.weight": rng.normal(size=(len(tokens), 32)).astype(np.float32),
               "blk.0.attn_q.weight": rng.normal(size=(8, 256)).astype(np.float32)}
    path = write_gguf(tmp_path / "vocab.gguf", "llama", metadata, tensors,
                      quantise={"token_embd.weight": "Q8_0", "blk.0.attn_q.weight": "Q4_1"})
    stock = gguf.GGUFReader(str(path))
    file = open_gguf(str(path), "llama")
    assert file.keys() == list(stock.fields)
    for key, field in stock.fields.items():
        assert file.value(key) == field.contents(), key
    assert file.value("tokenizer.ggml.tokens") == tokens
    assert file.tensor_names == [tensor.name for tensor in stock.tensors]
    for tensor in stock.tensors:
        expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        np.testing.assert_array_equal(file.tensor(tensor.name), expected.reshape(file.shape(tensor.name)))
