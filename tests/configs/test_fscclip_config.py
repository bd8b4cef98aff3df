"""configs/fscclip.py: the variants' loss terms and the recipe's optimiser settings (Oh et al. 2024, the
official code's defaults as shared/METHODS.md section 4 gives them)."""

from __future__ import annotations

import numpy as np
import pytest

from configs import common, fscclip


def test_split_arg_separates_a_configs_own_args_from_the_common_ones():
    own, rest = common.split_arg("variant=negclip,steps=20,lora,init=/w/run", variant="fsc", lora=False, init="")
    assert (own.variant, own.lora, own.init) == ("negclip", True, "/w/run")
    assert rest == "steps=20"
    own, rest = common.split_arg(None, variant="fsc")
    assert own.variant == "fsc" and rest == ""


def test_the_method_is_clip_plus_both_hard_negative_terms_with_scr_at_the_official_weights():
    config = fscclip.get_config("init=/w/pretrain,negatives=/w/negatives")
    terms = config.losses.to_dict()
    assert terms == {
        "clip": {"weight": 1.0},
        "global_hn": {"weight": 0.5, "gamma": 2.0, "beta": 0.02},
        "local_hn": {"weight": 0.2, "gamma": 2.0, "beta": 0.02},
    }
    assert config.init_from == "/w/pretrain" and config.data.hard_negatives == "/w/negatives"
    assert config.optim.learning_rate == 5e-6 and config.optim.warmup_steps == 50
    assert config.optim.weight_decay == 0.1 and config.total_steps == 300


@pytest.mark.parametrize("variant, expected", [
    ("clip", {"clip"}),
    ("negclip", {"negclip"}),
    ("fsc_global", {"clip", "global_hn"}),
    ("fsc_no_scr", {"clip", "global_hn", "local_hn"}),
])
def test_each_variant_is_one_switch(variant, expected):
    config = fscclip.get_config(f"variant={variant},negatives=/w/negatives,steps=40")
    assert set(config.losses) == expected and config.total_steps == 40
    if variant == "fsc_no_scr":
        assert all(config.losses[t].gamma == 0.0 and config.losses[t].beta == 0.0 for t in ("global_hn", "local_hn"))
    # Plain fine-tuning reads no negatives, so it prepares none (an unread batch field is refused).
    assert config.data.hard_negatives == (None if variant == "clip" else "/w/negatives")


def test_an_unknown_variant_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown FSC-CLIP variant 'fcs'.*fsc, fsc_global"):
        fscclip.get_config("variant=fcs")


@pytest.mark.slow
def test_fine_tunes_a_pretrained_run_on_pools_made_by_the_generator(tmp_path, scenes_data_dir, micro_clip_run):
    """The user's path end to end: pools from `make_negatives` (the built-in lexicon backend, which needs no
    parser), then configs/fscclip.py from a finished CLIP run: all three terms train, on negatives the op drew."""
    import json

    from jclip import make_negatives
    from jclip_testing import micro_run_flags, run_jclip_main

    config = fscclip.get_config()
    config.data.embedded_config, config.data.data_dir = "small", str(scenes_data_dir)
    summary = make_negatives.make_negatives(config, tmp_path / "pools", backend="lexicon", log=lambda *_: None)
    assert summary["backend"].startswith("lexicon") and summary["coverage"]["swap"] > 0.5
    workdir = tmp_path / "fsc"
    stdout = run_jclip_main(workdir, f"configs/fscclip.py:init={micro_clip_run},negatives={tmp_path / 'pools'}",
                            micro_run_flags(scenes_data_dir, total_steps=2, checkpoint_every=2))
    assert f"initialised the parameters from {micro_clip_run}" in stdout
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "loss/total" in r]
    assert [r["step"] for r in trained] == [1, 2]
    for record in trained:
        for term in ("clip", "global_hn", "local_hn"):
            assert np.isfinite(record[f"loss/{term}"]) and record[f"loss/{term}"] > 0, term
        # Most rows have a valid negative: the batch carried the op's negatives, tokenized with their mask.
        assert record["global_hn/valid_rows"] >= 8


def test_lora_trains_the_adapters_alone_at_ten_times_the_learning_rate():
    from jclip import param_rules

    config = fscclip.get_config("lora")
    assert config.model.lora.rank == 4 and config.model.lora.alpha == 1.0
    assert tuple(config.model.lora.targets) == ("attention", "mlp", "patch_embedding")
    assert [list(rule) for rule in config.optim.param_rules] == [[".*lora_.*", "trainable"], [".*", "frozen"]]
    assert param_rules.lora_only_rules() == [[".*lora_.*", "trainable"], [".*", "frozen"]]
    assert config.optim.learning_rate == 5e-5
    assert fscclip.get_config("lora,lr=1e-4").optim.learning_rate == 1e-4
