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


def test_num_workers_takes_a_count_or_auto():
    config = clip.get_config()
    for setting in (0, 4, -1):
        config.data.num_workers = setting
        validate_config(config)
    config.data.num_workers = -2
    with pytest.raises(ConfigError, match=r"data.num_workers must be an integer >= 0, or -1 \(auto\), got -2"):
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


# ----- check_inputs: the paths a config names exist, before the workdir is written --------------------------


def inputs_error(config, fresh: bool = True) -> str:
    from jclip.config_validation import check_inputs

    with pytest.raises(ConfigError) as error:
        check_inputs(config, fresh=fresh)
    return str(error.value)


def test_missing_shards_are_named_with_the_key_and_what_to_set(tmp_path):
    from jclip.config_validation import check_inputs

    for shard in (0, 1):
        (tmp_path / f"{shard}.tar").write_bytes(b"")
    config = clip.get_config()
    config.data.source = f"wds:{tmp_path}/{{0..3}}.tar"
    assert inputs_error(config) == (
        f"config.data.source='wds:{tmp_path}/{{0..3}}.tar': 2 of 4 shards are missing: {tmp_path}/2.tar, "
        f"{tmp_path}/3.tar; correct the path (or set config.data.allow_missing_shards=True to train on the shards "
        "that exist)")
    config.data.allow_missing_shards = True
    check_inputs(config)
    config.data.source = "wds:/nonexistent/{000..001}.tar"
    assert inputs_error(config) == ("config.data.source='wds:/nonexistent/{000..001}.tar': 2 of 2 shards are "
                                    "missing: /nonexistent/000.tar, /nonexistent/001.tar; correct the path")
    config.data.source = "wds:@/nonexistent/shards.txt"
    assert inputs_error(config) == ("config.data.source='wds:@/nonexistent/shards.txt': shard list file "
                                    "'/nonexistent/shards.txt' does not exist; correct the path")


@pytest.mark.parametrize("spec, problem", [
    ("folder:/nonexistent/captions.jsonl", "the file /nonexistent/captions.jsonl does not exist; correct the path"),
    ("docci:/nonexistent/docci_descriptions.jsonlines",
     "the file /nonexistent/docci_descriptions.jsonlines does not exist; correct the path"),
    ("classfolders:/nonexistent/val", "the folder /nonexistent/val does not exist; correct the path"),
    ("arrayrecord:/nonexistent/cc3m", "/nonexistent/cc3m/dataset.json does not exist: correct the path, or convert "
                                      "tar shards there with python -m jclip.data.sources.convert_webdataset"),
])
def test_a_missing_file_or_folder_source_is_named(spec, problem):
    config = clip.get_config()
    config.data.source = spec
    assert inputs_error(config) == f"config.data.source={spec!r}: {problem}"
    config = clip.get_config()
    config.data.mixture = {"web": {"source": "embedded", "weight": 1.0}, "extra": {"source": spec, "weight": 1.0}}
    assert inputs_error(config) == f"config.data.mixture.extra.source={spec!r}: {problem}"
    config = clip.get_config()
    config.evals.zeroshot.source = spec
    assert inputs_error(config) == f"config.evals.zeroshot.source={spec!r}: {problem}"


def test_a_tfds_source_needs_its_data_dir_and_the_prepared_dataset(scenes_data_dir, tmp_path):
    from jclip.config_validation import check_inputs

    config = clip.get_config()
    config.data.source, config.data.data_dir = "tfds:jclip_scenes/small", str(tmp_path / "nowhere")
    assert inputs_error(config) == (
        f"config.data.source='tfds:jclip_scenes/small': the TFDS data dir config.data.data_dir="
        f"'{tmp_path / 'nowhere'}' does not exist; set it to the folder that holds the prepared dataset (the "
        "--data_dir of `tfds build`)")
    config.data.data_dir = str(tmp_path)
    message = inputs_error(config)
    assert message.startswith(f"config.data.source='tfds:jclip_scenes/small': TFDS dataset 'jclip_scenes/small' is "
                              f"not prepared in {tmp_path}")
    assert "\n" not in message
    config.data.data_dir = str(scenes_data_dir)
    check_inputs(config)
    config.data.source, config.data.data_dir = "embedded", str(tmp_path / "nowhere")
    check_inputs(config)  # the embedded dataset builds itself in its data dir
    assert not (tmp_path / "nowhere").exists()


def test_a_compositional_benchmark_file_is_checked_only_when_its_format_reads_one(tmp_path):
    from jclip.config_validation import check_inputs

    config = clip.get_config()
    config.evals.compositional.path = "/nonexistent/sugarcrepe"
    check_inputs(config)  # the embedded format reads no file
    config.evals.compositional.format = "sugarcrepe"
    assert inputs_error(config) == ("config.evals.compositional.path='/nonexistent/sugarcrepe' does not exist; "
                                    "correct the path")
    config.evals.compositional.path = str(tmp_path)
    config.evals.compositional.source = "folder:/nonexistent/unread.jsonl"
    check_inputs(config)


RUN = "a finished jclip run (its workdir, checkpoints/ folder or a step folder)"


def test_init_from_and_the_teacher_must_name_a_run(tmp_path):
    from jclip.config_validation import check_inputs

    config = clip.get_config()
    config.init_from = "/nonexistent/run"
    assert inputs_error(config) == (f"config.init_from='/nonexistent/run' does not exist; set it to {RUN} or a "
                                    "params export (python -m jclip.convert params|import)")
    check_inputs(config, fresh=False)  # a resumed run never reads init_from
    config.init_from = str(tmp_path)
    assert inputs_error(config) == (f"config.init_from='{tmp_path}': {tmp_path} holds no checkpoints (no "
                                    f"checkpoints/ folder, no step folders); set it to {RUN} or a params export "
                                    "(python -m jclip.convert params|import)")
    (tmp_path / "jclip_export.json").write_text("{}")
    check_inputs(config)  # a params export

    config = clip.get_config()
    config.teacher.checkpoint = "/nonexistent/teacher"
    assert inputs_error(config, fresh=False) == (f"config.teacher.checkpoint='/nonexistent/teacher' does not exist; "
                                                 f"set it to {RUN}")
    (tmp_path / "run" / "checkpoints" / "3").mkdir(parents=True)
    config.teacher.checkpoint = str(tmp_path / "run")
    check_inputs(config, fresh=False)
    config.teacher.checkpoint = str(tmp_path)  # a params export is no teacher
    assert inputs_error(config).startswith(f"config.teacher.checkpoint='{tmp_path}': {tmp_path} holds no checkpoints")


def test_paths_in_a_bucket_are_checked_too(gcs):
    from etils import epath

    from gcs_emulator import BUCKET
    from jclip.config_validation import check_inputs

    bucket = f"gs://{BUCKET}/check_inputs"
    epath.Path(f"{bucket}/shards/0.tar").write_bytes(b"")
    epath.Path(f"{bucket}/run/checkpoints/3/state/x").write_bytes(b"")
    config = clip.get_config()
    config.data.source = f"wds:{bucket}/shards/{{0..1}}.tar"
    config.init_from = f"{bucket}/nothing"
    config.teacher.checkpoint = f"{bucket}/run"
    assert inputs_error(config).startswith(f"config.data.source='wds:{bucket}/shards/{{0..1}}.tar': 1 of 2 shards "
                                           f"are missing: {bucket}/shards/1.tar; correct the path")
    config.data.source = f"wds:{bucket}/shards/0.tar"
    assert inputs_error(config) == (f"config.init_from='{bucket}/nothing' does not exist; set it to {RUN} or a "
                                    "params export (python -m jclip.convert params|import)")
    config.init_from = f"{bucket}/run"
    check_inputs(config)
