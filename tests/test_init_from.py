"""`config.init_from`: a fresh run starts from a params export or a training checkpoint, exactly; a source
with another architecture, or with parameters the model has no place for, is a config error; parameters the
source lacks keep their initialisation and are named."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jclip import checkpoint, parallel
from jclip.errors import ConfigError
from jclip.convert import params_io
from jclip.convert.__main__ import main as convert_main
from jclip.init_from import initial_params
from jclip.build import TrainSetup
from jclip_testing import micro_config, micro_run_flags, run_jclip_main


def _export(directory, config, seed: int, drop=()) -> dict:
    """A params export of random weights for `config.model` (leaving out the parameters in `drop`)."""
    abstract = params_io.flatten(params_io.abstract_params(config.model))
    rng = np.random.default_rng(seed)
    params = {p: rng.standard_normal(x.shape).astype(x.dtype) for p, x in abstract.items() if p[0] not in drop}
    model_config = params_io.plain_model_config(config.model)
    params_io.write(directory, params_io.HostModel(model_config, params, params_io.preprocessing_spec(model_config)),
                    {"test": True})
    return params


def _setup_and_fresh(config):
    mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    setup = TrainSetup.create(config, mesh)
    return setup, setup.init_state()["params"]


def test_params_come_from_the_export_on_the_runs_shardings(tmp_path) -> None:
    config = micro_config(init_from=str(tmp_path / "export"))
    config.model.init_logit_bias = -10.0  # a SigLIP-style model from a CLIP export: the bias is kept
    source = _export(tmp_path / "export", micro_config(), seed=1)
    setup, fresh = _setup_and_fresh(config)
    params, kept = initial_params(config, setup, fresh)
    assert kept == ["logit_bias"]
    flat, fresh_flat = params_io.flatten(params), params_io.flatten(fresh)
    for path, value in source.items():
        np.testing.assert_array_equal(np.asarray(flat[path]), value)
        assert flat[path].sharding == fresh_flat[path].sharding
    assert float(flat[("logit_bias",)]) == -10.0


def test_a_scanned_run_takes_a_per_layer_export_and_reads_back_per_layer(tmp_path) -> None:
    """`model.scan_layers` stacks the blocks: an export (per layer, OpenCLIP's layout) fills a scanned run exactly,
    and the run's parameters read back (params_io, what every converter writes) per layer again."""
    from jclip.models import stacking

    config = micro_config(init_from=str(tmp_path / "export"))
    config.model.vision.layers = 3
    config.model.scan_layers = True
    plain = micro_config()
    plain.model.vision.layers = 3
    source = _export(tmp_path / "export", plain, seed=1)
    setup, fresh = _setup_and_fresh(config)
    params, kept = initial_params(config, setup, fresh)
    assert kept == []
    stacked_kernel = ("visual", "transformer", "blocks", "mlp", "c_fc", "kernel")
    kernel = params_io.flatten(params)[stacked_kernel]
    assert kernel.shape[0] == 3 and kernel.sharding == params_io.flatten(fresh)[stacked_kernel].sharding
    host = params_io._to_host(params)
    assert set(host) == set(source) and not stacking.is_stacked(host)
    for path, value in source.items():
        np.testing.assert_array_equal(host[path], value)
    assert "scan_layers" not in params_io.plain_model_config(config.model)


def test_another_architecture_or_extra_parameters_are_refused(tmp_path) -> None:
    _export(tmp_path / "export", micro_config(), seed=1)
    config = micro_config(init_from=str(tmp_path / "export"))
    config.model.quick_gelu = True
    setup, fresh = _setup_and_fresh(config)
    with pytest.raises(ConfigError, match=r"another architecture.*quick_gelu: False vs True"):
        initial_params(config, setup, fresh)
    with_bias = micro_config()
    with_bias.model.init_logit_bias = -10.0
    _export(tmp_path / "biased", with_bias, seed=1)
    config = micro_config(init_from=str(tmp_path / "biased"))
    setup, fresh = _setup_and_fresh(config)
    with pytest.raises(ConfigError, match=r"no place for these parameters.*\['logit_bias'\]"):
        initial_params(config, setup, fresh)
    config = micro_config(init_from=str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match="init_from:.*does not exist"):
        initial_params(config, setup, fresh)


def test_params_export_of_a_training_checkpoint_is_its_params(micro_clip_run, tmp_path) -> None:
    assert convert_main(["params", f"--checkpoint={micro_clip_run}", f"--output={tmp_path / 'export'}"]) == 0
    exported = params_io.read(tmp_path / "export")
    trained = params_io.read(micro_clip_run, step=3)
    assert exported.model_config == trained.model_config
    assert exported.preprocessing["tokenizer"] == "clip" and exported.preprocessing["context_length"] == 16
    assert set(exported.params) == set(trained.params)
    for path, value in trained.params.items():
        np.testing.assert_array_equal(exported.params[path], value)
    with pytest.raises(ValueError, match="params export, which has no steps"):
        params_io.read(tmp_path / "export", step=3)


def test_a_run_starts_exactly_from_the_export(micro_clip_run, scenes_data_dir, tmp_path) -> None:
    """With a vanishing learning rate the parameters after step 1 are the export's (a fresh initialisation
    differs from them by about 1e-2)."""
    convert_main(["params", f"--checkpoint={micro_clip_run}", f"--output={tmp_path / 'export'}"])
    flags = micro_run_flags(scenes_data_dir, total_steps=1, checkpoint_every=1, seed=5)
    out = run_jclip_main(tmp_path / "run", "configs/clip.py", flags + [
        f"--config.init_from={tmp_path / 'export'}", "--config.optim.learning_rate=1e-30",
        "--config.async_checkpointing=False"])
    assert f"initialised the parameters from {tmp_path / 'export'}" in out
    run = params_io.read(tmp_path / "run")
    export = params_io.read(tmp_path / "export")
    for path, value in export.params.items():
        np.testing.assert_allclose(run.params[path], value, rtol=1e-6, atol=1e-20)
    assert checkpoint.is_params_export(tmp_path / "export") and not checkpoint.is_params_export(tmp_path / "run")
    jax.clear_caches()


def test_params_come_from_a_training_checkpoint(micro_clip_run) -> None:
    import json

    import ml_collections

    config = ml_collections.ConfigDict(json.loads((micro_clip_run / "config.json").read_text()))
    config.seed = 11  # a fresh initialisation other than the run's
    config.init_from = str(micro_clip_run)
    setup, fresh = _setup_and_fresh(config)
    params, kept = initial_params(config, setup, fresh)
    assert kept == []
    trained = params_io.read(micro_clip_run, step=3).params
    flat = params_io.flatten(params)
    assert set(flat) == set(trained)
    for path, value in trained.items():
        np.testing.assert_array_equal(np.asarray(flat[path]), value)
