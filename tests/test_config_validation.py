"""Start-up validation of the model contract: every field a term or tower reads is written by the ops or
produced by the model (or a teacher), and every field the ops write is read; messages name term and field."""

from __future__ import annotations

import pytest

from configs import clip
from jclip.config_validation import validate_config
from jclip.errors import ConfigError
from jclip.losses import Reads, register_term


@register_term("probe_negatives", reads=Reads(outputs=("negative_text_embeddings", "text_tokens"),
                                              batch=("negative_mask",)))
def probe_negatives(outputs, batch, ctx):
    raise AssertionError("validation never runs a term")


def config_with(**terms):
    config = clip.get_config()
    config.losses = {"clip": {"weight": 1.0}, **terms}
    return config


def test_an_output_of_an_extra_caption_field_needs_the_op_that_writes_the_field():
    config = config_with(probe_negatives={"weight": 1.0})
    with pytest.raises(ConfigError, match="losses: term 'probe_negatives' reads the batch field 'negative_mask', "
                                          "which no preprocessing op writes; set data.hard_negatives=DIR .*; the pipeline "
                                          "writes: images"):
        validate_config(config)
    config.data.preprocess += "|tokenize(field='negative_captions', out='negative_token_ids', max_count=3)"
    validate_config(config)  # the op writes negative_token_ids and negative_mask; the model embeds the former


def test_missing_outputs_say_what_would_provide_them():
    config = config_with(siglip={"weight": 1.0})
    with pytest.raises(ConfigError, match="term 'siglip' reads the model output 'logit_bias', which only a model "
                                          "with a logit bias produces: set model.init_logit_bias"):
        validate_config(config)
    config.model.init_logit_bias = -10.0
    validate_config(config)

    config = config_with(softclip={"weight": 1.0, "guidance": "outputs"})
    with pytest.raises(ConfigError, match="term 'softclip' reads the model output 'teacher_image_embeddings', which "
                                          "only a frozen teacher provides: set teacher.checkpoint"):
        validate_config(config)


def test_a_field_nothing_reads_is_refused():
    config = config_with()
    config.data.preprocess += "|tokenize(field='negative_captions', out='negative_token_ids', max_count=3)"
    with pytest.raises(ConfigError, match=r"the preprocessing writes \['negative_mask', 'negative_token_ids'\] "
                                          r"\(tokenize\), which no loss term or tower reads"):
        validate_config(config)


def test_a_term_reading_hard_negatives_without_pools_is_told_how_to_make_them():
    from configs import fscclip

    with pytest.raises(ConfigError, match=r"term 'global_hn' reads the batch field 'negative_mask', which no "
                                          r"preprocessing op writes; set data.hard_negatives=DIR \(candidate pools "
                                          r"made by python -m jclip.make_negatives\) to provide it"):
        validate_config(fscclip.get_config())


def test_scanned_layers_need_a_rule_for_the_layers_axis_and_scannable_towers():
    from configs import clip
    from jclip.config_validation import validate_config
    from jclip.models import pretrained_text_tower

    config = clip.get_config()
    config.model.scan_layers = True
    validate_config(config)  # the default rules name `layers`
    config.sharding_rules = [rule for rule in config.sharding_rules if rule[0] != "layers"]
    with pytest.raises(ConfigError, match=r"model.scan_layers .* add \['layers', None\]"):
        validate_config(config)
    config = clip.get_config()
    config.model.scan_layers = True
    config.model.text = pretrained_text_tower("minilm-l6")
    with pytest.raises(ConfigError, match="model.text.kind 'bert' has no scanned layout"):
        validate_config(config)


def test_checkpoint_failure_takes_stop_or_continue():
    config = clip.get_config()
    config.checkpoint_failure = "continue"
    validate_config(config)
    config.checkpoint_failure = "retry"
    with pytest.raises(ConfigError, match=r"checkpoint_failure must be one of \('stop', 'continue'\), got 'retry'"):
        validate_config(config)


@pytest.mark.parametrize("key, value, message", [
    ("policy", "ignore", "nonfinite.policy must be one of ('halt', 'skip'), got 'ignore'"),
    ("max_skips", -1, "nonfinite.max_skips must be an integer >= 0, got -1"),
    ("window", 0, "nonfinite.window must be an integer >= 1, got 0"),
])
def test_the_non_finite_policy_is_checked(key, value, message):
    config = clip.get_config()
    assert dict(config.nonfinite) == {"policy": "halt", "max_skips": 10, "window": 1000}
    config.nonfinite[key] = value
    with pytest.raises(ConfigError) as error:
        validate_config(config)
    assert str(error.value) == message
