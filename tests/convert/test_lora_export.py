"""LoRA end to end: a micro run starts from a plain params export with adapters on every target and trains
them alone (`param_rules.lora_only_rules()`); every `python -m jclip.convert` export merges the adapters
into the weights, and the exported model (params export, OpenCLIP folder, transformers folder, each read
back) embeds like the adapted model; `init_from` a LoRA checkpoint merges it or takes its adapters."""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jclip.convert import formats, params_io
from jclip.convert.__main__ import main as convert_main
from jclip.models import build_model
from jclip_testing import MICRO_MODEL_OVERRIDES, config_with_flags, micro_run_flags, run_jclip_main

LORA_TARGETS = ("attention", "mlp", "patch_embedding")
CONFIG = '''
from configs import clip
from jclip import param_rules


def get_config(arg=None):
    config = clip.get_config(arg)
    config.model.lora.rank = 2
    config.model.lora.targets = {targets!r}
    config.optim.param_rules = param_rules.lora_only_rules()
    return config
'''


def micro_model_config():
    """configs/clip.py's model with the micro run's overrides (what `micro_run_flags` trains)."""
    return config_with_flags(MICRO_MODEL_OVERRIDES).model


@pytest.fixture(scope="module")
def lora_run(scenes_data_dir, tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("lora_run")
    model_config = params_io.plain_model_config(micro_model_config())
    initialised = build_model(model_config, nnx.Rngs(11))  # another draw than the run's own initialisation
    source = {path: np.asarray(value) for path, value in
              params_io.flatten(nnx.to_pure_dict(nnx.state(initialised, nnx.Param))).items()}
    params_io.write(root / "plain", params_io.HostModel(model_config, source, params_io.preprocessing_spec(model_config)),
                    {"test": True})
    (root / "lora_config.py").write_text(CONFIG.format(targets=LORA_TARGETS))
    stdout = run_jclip_main(root / "run", str(root / "lora_config.py"), micro_run_flags(
        scenes_data_dir, total_steps=3, checkpoint_every=3, init_from=str(root / "plain"),
        **{"optim.warmup_steps": 1, "optim.learning_rate": 0.01}))
    return {"root": root, "plain": root / "plain", "run": root / "run", "stdout": stdout}


def features(model: params_io.HostModel) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    images = jnp.asarray(rng.normal(size=(3, 32, 32, 3)), jnp.float32)
    token_ids = np.zeros((3, 16), np.int32)
    token_ids[:, 0] = 49406
    token_ids[:, 1:6] = rng.integers(1, 49000, size=(3, 5))
    token_ids[:, 6] = 49407
    module = params_io.build(model)
    return np.asarray(module.encode_image(images)), np.asarray(module.encode_text(jnp.asarray(token_ids)))


def test_lora_training_moves_the_adapters_alone(lora_run) -> None:
    trained = params_io.read(lora_run["run"])
    plain = params_io.read(lora_run["plain"])
    assert trained.model_config["lora"] == {"rank": 2, "alpha": 1.0, "targets": list(LORA_TARGETS)}
    adapters = {path for path in trained.params if "lora_" in str(path[-1])}
    assert set(trained.params) - adapters == set(plain.params)
    for path, value in plain.params.items():  # frozen: bit-identical to the export, the logit scale too
        np.testing.assert_array_equal(trained.params[path], value, err_msg=str(path))
    for path in adapters:
        if str(path[-1]).endswith("lora_b"):
            assert np.abs(trained.params[path]).max() > 0, path  # B left zero: it trained
    assert "kept at initialisation: " in lora_run["stdout"] and "visual/patch_lora_b" in lora_run["stdout"]
    # 1 vision and 1 text block of width 32 at rank 2 (2·16·E each), and the patch pair (3·8)·(2·8) + (2·8)·(32·8)
    assert "(6,528 trainable)" in lora_run["stdout"]


def with_strong_adapters(model: params_io.HostModel, seed: int = 5) -> params_io.HostModel:
    """`model` with every B factor redrawn from N(0, 0.2^2), far from what 3 steps move them to."""
    rng = np.random.default_rng(seed)
    params = {path: (0.2 * rng.standard_normal(value.shape)).astype(value.dtype) if str(path[-1]).endswith("lora_b")
              else value for path, value in model.params.items()}
    return params_io.HostModel(model.model_config, params, model.preprocessing)


@pytest.mark.parametrize("strong", [False, True], ids=["trained", "strong_adapters"])
def test_every_export_merges_the_adapters(lora_run, tmp_path, strong: bool) -> None:
    """The trained run through the command line; the same model with large random B factors through the
    export functions the command line calls (params_io.write, formats.export_openclip, formats.export_hf)."""
    adapted = params_io.read(lora_run["run"])
    if strong:
        adapted = with_strong_adapters(adapted)
        params_io.write(tmp_path / "params", adapted, {"test": True})
        formats.export_openclip(adapted, tmp_path / "openclip")
        formats.export_hf(adapted, tmp_path / "hf")
    else:
        for command in ("params", "openclip", "hf"):
            assert convert_main([command, f"--checkpoint={lora_run['run']}", f"--output={tmp_path / command}"]) == 0
    want_image, want_text = features(adapted)
    unadapted = params_io.HostModel(adapted.model_config, {
        path: np.zeros_like(value) if str(path[-1]).endswith("lora_b") else value
        for path, value in adapted.params.items()}, adapted.preprocessing)
    assert np.abs(want_image - features(unadapted)[0]).max() > (0.1 if strong else 1e-3)  # the adapters count
    exported = {
        "params": params_io.read(tmp_path / "params"),
        "openclip": formats.import_model(tmp_path / "openclip"),
        "hf": formats.import_model(tmp_path / "hf"),
    }
    info = json.loads((tmp_path / "params" / "jclip_export.json").read_text())
    assert "lora" not in info["model"]
    state_dict = formats.read_state_dict(tmp_path / "openclip" / formats.OPENCLIP_WEIGHTS["safetensors"])
    assert not [key for key in state_dict if "lora" in key]
    for name, model in exported.items():
        assert "lora" not in model.model_config, name
        assert not [path for path in model.params if "lora" in str(path[-1])], name
        image, text = features(model)
        np.testing.assert_allclose(image, want_image, rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(text, want_text, rtol=1e-5, atol=1e-5, err_msg=name)
    # the merged kernels are W + scale·A·B, worked out here in float64 for one MLP layer and the patch kernel
    block = ("visual", "transformer", "blocks", 0, "mlp", "c_fc")
    p = {name: adapted.params[(*block, name)].astype(np.float64) for name in ("kernel", "lora_a", "lora_b")}
    np.testing.assert_allclose(exported["params"].params[(*block, "kernel")],
                               p["kernel"] + 0.5 * p["lora_a"] @ p["lora_b"], rtol=1e-6, atol=1e-7)
    a, b = adapted.params[("visual", "patch_lora_a")], adapted.params[("visual", "patch_lora_b")]
    oihw = adapted.params[("visual", "patch_embedding")].astype(np.float64).transpose(3, 2, 0, 1)
    oihw = oihw + 0.5 * (b.T.astype(np.float64) @ a.T.astype(np.float64)).reshape(oihw.shape)
    np.testing.assert_allclose(state_dict["visual.conv1.weight"], oihw, rtol=1e-6, atol=1e-7)


def test_init_from_a_lora_checkpoint(lora_run) -> None:
    """Into a model without LoRA (or with other settings) the source's adapters are merged; into one with
    the same settings they are taken as they are."""
    from jclip import parallel
    from jclip.build import TrainSetup
    from jclip.init_from import initial_params
    from configs import clip

    adapted = params_io.read(lora_run["run"])
    merged = params_io.without_lora(adapted)
    mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    for lora, expect in (({"rank": 0}, merged.params), ({"rank": 3}, merged.params),
                         ({"rank": 2, "targets": LORA_TARGETS}, adapted.params)):
        config = clip.get_config()
        config.model = micro_model_config()
        config.model.lora.update(lora)
        config.init_from = str(lora_run["run"])
        setup = TrainSetup.create(config, mesh)
        fresh = setup.init_state()["params"]
        params, kept = initial_params(config, setup, fresh)
        flat = params_io.flatten(params)
        for path, value in expect.items():
            np.testing.assert_allclose(np.asarray(flat[path]), value, rtol=1e-6, atol=1e-7, err_msg=f"{lora} {path}")
            assert flat[path].sharding == params_io.flatten(fresh)[path].sharding
        assert kept == sorted("/".join(map(str, p)) for p in set(params_io.flatten(fresh)) - set(expect))


def test_evaluation_runs_the_adapted_model_and_the_merged_export_alike(lora_run, scenes_data_dir, tmp_path) -> None:
    """`python -m jclip.evaluate` on the LoRA checkpoint reproduces the run's own final evaluation (the
    adapted model, unmerged); on the merged params export it gives the same numbers."""
    import subprocess
    import sys

    from jclip_testing import REPO_ROOT, read_final_evaluation

    def evaluate(checkpoint, output, *flags):
        result = subprocess.run([sys.executable, "-m", "jclip.evaluate", f"--checkpoint={checkpoint}",
                                 f"--output={output}", *flags], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(pathlib.Path(output).read_text())

    expected = read_final_evaluation(lora_run["run"])
    assert expected, "the LoRA run logged no evaluation"
    assert convert_main(["params", f"--checkpoint={lora_run['run']}", f"--output={tmp_path / 'export'}"]) == 0
    flags = [f for f in micro_run_flags(scenes_data_dir, total_steps=3) if not f.startswith("--config.model.")]
    reports = {
        "checkpoint": evaluate(lora_run["run"], tmp_path / "checkpoint.json"),
        "export": evaluate(tmp_path / "export", tmp_path / "export.json", "--config=configs/clip.py", *flags),
    }
    for key, value in expected.items():
        _, name, metric = key.split("/", 2)
        assert reports["checkpoint"]["evaluators"][name][metric] == pytest.approx(value, abs=1e-9), key
        assert reports["export"]["evaluators"][name][metric] == pytest.approx(value, abs=1e-6), key
