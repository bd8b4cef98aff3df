"""configs/dense_captions.py: each rung of the improved-captions ladder (Stone et al. 2412.15396) is the switch
the paper's ablation names, and the ladder tool runs rung 5 from the same seed's rung 4."""

from __future__ import annotations

import pathlib

import pytest

from configs import dense_captions
from jclip.tools import ladder


def test_the_scratch_rungs_differ_only_in_the_caption_rule():
    short, dense = dense_captions.get_config("rung=1"), dense_captions.get_config("rung=2")
    assert short.data.caption_rule == "short" and dense.data.caption_rule == "dense"
    for config in (short, dense):
        assert config.model.text.kind == "clip" and config.model.text.context_length == 128
        assert not config.optim.tower_locks.text.enabled
        assert "sample_sentences" not in config.data.preprocess
        assert config.losses.to_dict() == {"clip": {"weight": 1.0}}
    short.data.caption_rule = "dense"
    assert short.to_dict() == dense.to_dict()


def test_the_pretrained_rungs_lock_all_but_the_top_blocks_and_rung_4_samples_sentences():
    three, four = dense_captions.get_config("rung=3"), dense_captions.get_config("rung=4")
    for config in (three, four):
        assert config.model.text.kind == "bert" and config.model.text.weights == "minilm-l6"
        assert config.model.text.context_length == 128
        assert config.optim.tower_locks.text.to_dict() == {"enabled": True, "unlocked_layers": 2,
                                                           "freeze_layer_norm": True}
    assert "sample_sentences" not in three.data.preprocess
    assert four.data.preprocess.startswith("choose_caption|sample_sentences(distribution='uniform')|")


def test_rung_5_fine_tunes_with_negclip_on_hard_negatives_and_needs_them():
    config = dense_captions.get_config("rung=5,negatives=/w/negatives,init=/w/rung_4")
    assert config.losses.to_dict() == {"negclip": {"weight": 1.0}}
    assert config.data.hard_negatives == "/w/negatives" and config.init_from == "/w/rung_4"
    assert config.data.caption_rule == "short" and config.total_steps == 150
    with pytest.raises(ValueError, match="rung 5 .* needs negatives=DIR"):
        dense_captions.get_config("rung=5")
    with pytest.raises(ValueError, match="rung must be one of"):
        dense_captions.get_config("rung=6")


def test_each_setting_can_be_chosen_alone():
    config = dense_captions.get_config("tower=gemma3-270m,context=512,bidirectional=4,unlocked=4,captions=mixed:0.5,"
                                       "sentences=bernoulli:0.5,batch=32")
    assert config.model.text.kind == "gemma3" and config.model.text.context_length == 512
    assert config.model.text.bidirectional_top_k == 4 and config.optim.tower_locks.text.unlocked_layers == 4
    assert config.data.caption_rule == "mixed:0.5" and config.data.batch_size == 32
    assert "sample_sentences(distribution='bernoulli:0.5')" in config.data.preprocess


def test_dense_descriptions_are_evaluated_docci_style():
    config = dense_captions.get_config("rung=2")
    assert config.evals.dense_retrieval.type == "retrieval"
    assert config.evals.dense_retrieval.caption_field == "dense_caption"
    assert config.evals.retrieval.get("caption_field") in (None, "caption")


def test_the_ladder_starts_rung_5_from_the_same_seeds_rung_4(tmp_path):
    args = type("Args", (), {"workdir": tmp_path, "steps": 300, "finetune_steps": 60, "batch": 64,
                             "negatives": "/w/negatives"})()
    assert ladder.config_args(3, 1, args) == "steps=300,batch=64"
    assert ladder.config_args(5, 2, args) == f"steps=60,batch=64,negatives=/w/negatives,init={tmp_path / 'rung_4' / 'seed_2'}"
    with pytest.raises(SystemExit, match="rung 5 needs --negatives"):
        ladder.main(["--workdir", str(tmp_path), "--rungs", "5"])
    with pytest.raises(SystemExit, match="has not run"):
        ladder.main(["--workdir", str(tmp_path), "--rungs", "5", "--negatives", "/w/n", "--seeds", "0"])


def test_the_ladder_table_gives_mean_and_std_per_rung_beside_the_paper():
    runs = {1: {0: {"eval/dense_retrieval/text_to_image_R@1": 0.1}, 1: {"eval/dense_retrieval/text_to_image_R@1": 0.3}}}
    markdown = ladder.table(runs)
    row = markdown.splitlines()[2]
    assert row.startswith("| 1. scratch tower, alt-text | 2 |") and "0.200 ± 0.141" in row and row.endswith("| 53.5 |")
    assert pathlib.Path(dense_captions.__file__).name == "dense_captions.py"
