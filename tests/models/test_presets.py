"""Tests for jclip/models/presets.py and `count_params`: OpenCLIP's exact parameter counts (and those of its
docs/model_profile.csv, per tower); the pretrained text towers' configs (`pretrained_text_tower`)."""

from __future__ import annotations

import numpy as np
import pytest

from jclip.convert.openclip import openclip_state_shapes
from jclip.models import PRESETS, abstract_model, count_params, get_preset, pretrained_files, pretrained_text_tower, tokenizer_spec, \
    tower_for


@pytest.mark.parametrize("name,expected", [
    ("B/32", 151_277_313),  # open_clip ViT-B-32, including logit_scale
    ("B/16", 149_620_737),
    ("L/14", 427_616_513),
    ("g/14", 1_366_678_273),
])
def test_parameter_counts_equal_openclip(name: str, expected: int) -> None:
    assert count_params(get_preset(name)) == expected
    # OpenCLIP's state-dict shapes, written out independently of the model code (jclip.convert.openclip).
    assert sum(int(np.prod(shape)) for shape in openclip_state_shapes(get_preset(name)).values()) == expected


# OpenCLIP's docs/model_profile.csv: mparams, image_mparams, text_mparams (millions, two decimals).
MODEL_PROFILE = {"B/16": (149.62, 86.19, 63.43), "L/14": (427.62, 303.97, 123.65), "g/14": (1366.68, 1012.65, 354.03)}


@pytest.mark.parametrize("name", sorted(MODEL_PROFILE))
def test_tower_parameter_counts_equal_openclips_model_profile(name: str) -> None:
    config = get_preset(name)
    total, image, text = MODEL_PROFILE[name]
    counted = {modality: tower_for(config, modality).count_params(config[modality], config["embed_dim"])
               for modality in ("vision", "text")}
    assert round(counted["vision"] / 1e6, 2) == image
    assert round(counted["text"] / 1e6, 2) == text
    assert round(count_params(config) / 1e6, 2) == total
    assert counted["vision"] + counted["text"] + 1 == count_params(config)  # + logit_scale


def test_g14_has_openclips_shapes_and_the_scanned_layout_the_same_count() -> None:
    config = get_preset("g/14")
    model = abstract_model(config)
    block = model.visual.transformer.blocks[0]
    assert block.mlp.c_fc.kernel.shape == (1408, 6144)  # OpenCLIP: int(1408 * 4.3637)
    assert block.attn.in_kernel.shape == (1408, 3, 16, 88)  # 16 heads of width 88
    assert len(model.visual.transformer.blocks) == 40 and len(model.text.transformer.blocks) == 24
    scanned = abstract_model(get_preset("g/14", scan_layers=True))
    assert scanned.visual.transformer.blocks.mlp.c_fc.kernel.shape == (40, 1408, 6144)
    assert count_params(get_preset("g/14", scan_layers=True)) == count_params(config)


def test_siglip_bias_adds_one_parameter() -> None:
    tiny = get_preset("tiny")
    assert count_params(get_preset("tiny", init_logit_bias=-10.0)) == count_params(tiny) + 1


def test_get_preset_returns_an_independent_copy() -> None:
    config = get_preset("tiny", dtype="bfloat16")
    config["vision"]["width"] = 1
    assert PRESETS["tiny"]["vision"]["width"] != 1
    assert config["name"] == "tiny" and config["dtype"] == "bfloat16"
    assert set(PRESETS) >= {"tiny", "B/32", "B/16", "L/14", "g/14"}
    with pytest.raises(KeyError, match="unknown model preset"):
        get_preset("H/14")


def test_parameter_counts_of_the_presets():
    gemma = pretrained_text_tower("gemma3-270m", proj="none")
    smollm = pretrained_text_tower("smollm2-135m", proj="none")
    assert tower_for({"text": gemma}, "text").count_params(gemma, 640) == 268_098_176  # Gemma 3 270M
    assert tower_for({"text": smollm}, "text").count_params(smollm, 576) == 134_515_008  # SmolLM2-135M


def test_presets_and_tokenizer_specs(monkeypatch):
    monkeypatch.setattr(pretrained_files, "weights_path", lambda name: f"/files/{name}.gguf")
    gemma = pretrained_text_tower("gemma3-270m", context_length=512, bidirectional_top_k=4)
    assert gemma["kind"] == "gemma3" and gemma["context_length"] == 512 and gemma["bidirectional_top_k"] == 4
    assert tokenizer_spec({"text": gemma}) == "gguf:/files/gemma3-270m.gguf"
    smollm = pretrained_text_tower("smollm2-135m", context_length=256)
    assert tokenizer_spec({"text": smollm}) == "gguf:/files/smollm2-135m.gguf?append_eos=2"
    assert tokenizer_spec({"text": {**smollm, "tokenizer": "hf:/t.json"}}) == "hf:/t.json"
    minilm = pretrained_text_tower("minilm-l6", context_length=128, bidirectional_top_k=4)  # BERT: both ways
    assert minilm["kind"] == "bert" and minilm["pool"] == "mean" and "bidirectional_top_k" not in minilm
    assert minilm["context_length"] == 128 and minilm["weights"] == "minilm-l6"
    with pytest.raises(KeyError, match="unknown pretrained text tower 'gemma-7b'"):
        pretrained_text_tower("gemma-7b")
    for config in (gemma, smollm):
        tower = tower_for({"text": config}, "text")
        tower.check(tower.settings(config))
