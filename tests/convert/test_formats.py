"""jclip/convert/formats.py and `python -m jclip.convert` on the files OpenCLIP and transformers wrote
(../shared/reference): imports reproduce those libraries' features, and OpenCLIP -> jclip -> OpenCLIP through
the command line gives back OpenCLIP's file bit for bit (in safetensors and in torch.save form)."""

from __future__ import annotations

import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy as safetensors_numpy
from flax import nnx

from jclip.convert import formats, params_io
from jclip.convert.__main__ import main as convert_main
from jclip.convert.torch_files import load_torch_state_dict
from jclip.models import build_model, get_preset


def features(model: params_io.HostModel, io: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """jclip's projected image and text features of the reference inputs for an imported model."""
    batch = {"images": jnp.asarray(io["images"].transpose(0, 2, 3, 1)), "token_ids": jnp.asarray(io["token_ids"])}
    outputs = params_io.build(model)(batch)
    return np.asarray(outputs["image_features"]), np.asarray(outputs["text_features"])


def assert_reproduces(model: params_io.HostModel, io: dict[str, np.ndarray]) -> None:
    image, text = features(model, io)
    np.testing.assert_allclose(image, io["image_features"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(text, io["text_features"], atol=1e-5, rtol=1e-5)


def openclip_folder(reference_dir: pathlib.Path, name: str, folder: pathlib.Path) -> pathlib.Path:
    """An OpenCLIP `local-dir:` folder made of the reference files."""
    folder.mkdir()
    shutil.copy(reference_dir / f"{name}.json", folder / formats.OPENCLIP_CONFIG)
    shutil.copy(reference_dir / f"{name}.safetensors", folder / formats.OPENCLIP_WEIGHTS["safetensors"])
    return folder


@pytest.mark.parametrize("name", ["openclip_tiny", "openclip_tiny_quickgelu"])
def test_import_openclip_folder_and_bare_files(reference_dir: pathlib.Path, tmp_path: pathlib.Path, name: str) -> None:
    io = dict(np.load(reference_dir / f"{name}_io.npz"))
    assert_reproduces(formats.import_model(openclip_folder(reference_dir, name, tmp_path / "folder")), io)
    weights = reference_dir / f"{name}.safetensors"
    assert_reproduces(formats.import_model(weights, openclip_config=reference_dir / f"{name}.json"), io)
    quick_gelu = name.endswith("quickgelu")
    # Read off the weights: the head width (32 here) and the activation must be said.
    assert_reproduces(formats.import_model(weights, quick_gelu=quick_gelu, head_width=32), io)
    with pytest.raises(ValueError, match="do not show the activation"):
        formats.import_model(weights, head_width=32)


def test_openai_state_dicts_imply_quick_gelu(reference_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """OpenAI's state dicts carry input_resolution/context_length/vocab_size scalars; they are consumed and
    mean quick-GELU."""
    state = safetensors_numpy.load_file(str(reference_dir / "openclip_tiny_quickgelu.safetensors"))
    state.update(input_resolution=np.array(32), context_length=np.array(16), vocab_size=np.array(1000))
    path = tmp_path / "openai.safetensors"
    safetensors_numpy.save_file(state, str(path))
    model = formats.import_model(path, head_width=32)
    assert model.model_config["quick_gelu"]
    assert_reproduces(model, dict(np.load(reference_dir / "openclip_tiny_quickgelu_io.npz")))


def test_import_transformers_folder(reference_dir: pathlib.Path) -> None:
    model = formats.import_model(reference_dir / "hf_clip_tiny")
    assert model.preprocessing["end_token"] == 999
    assert_reproduces(model, dict(np.load(reference_dir / "hf_clip_tiny_io.npz")))
    with pytest.raises(ValueError, match="carries its own config"):
        formats.import_model(reference_dir / "hf_clip_tiny", preset="B/32")


def test_transformers_folders_pooling_elsewhere_or_normalising_otherwise(reference_dir, tmp_path, capsys) -> None:
    folder = tmp_path / "hf"
    shutil.copytree(reference_dir / "hf_clip_tiny", folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["eos_token_id"] = 500
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="pools at the end token 500, jclip's at the largest id 999"):
        formats.import_model(folder)
    config["text_config"]["eos_token_id"] = 2  # transformers' legacy argmax pooling: jclip's
    (folder / "config.json").write_text(json.dumps(config))
    (folder / formats.HF_PREPROCESSOR).write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    assert convert_main(["import", f"--source={folder}", f"--output={tmp_path / 'export'}"]) == 0
    assert "normalises images with mean [0.5, 0.5, 0.5]" in capsys.readouterr().err
    assert params_io.read(tmp_path / "export").preprocessing["mean"] == [0.5] * 3


def test_command_line_round_trip_is_exact(reference_dir: pathlib.Path, tmp_path: pathlib.Path, capsys) -> None:
    """OpenCLIP folder -> `import` -> params export -> `openclip` (safetensors and .pt) == OpenCLIP's file."""
    source = openclip_folder(reference_dir, "openclip_tiny", tmp_path / "source")
    assert convert_main(["import", f"--source={source}", f"--output={tmp_path / 'export'}"]) == 0
    original = safetensors_numpy.load_file(str(reference_dir / "openclip_tiny.safetensors"))
    assert f"{sum(v.size for v in original.values()):,} parameters" in capsys.readouterr().out
    for weights, reader in (("safetensors", safetensors_numpy.load_file), ("pt", load_torch_state_dict)):
        out = tmp_path / f"openclip_{weights}"
        assert convert_main(["openclip", f"--checkpoint={tmp_path / 'export'}", f"--output={out}",
                             f"--weights={weights}"]) == 0
        exported = reader(str(out / formats.OPENCLIP_WEIGHTS[weights]))
        assert set(exported) == set(original)
        for key, value in original.items():
            assert np.array_equal(exported[key], value), (weights, key)
        config = json.loads((out / formats.OPENCLIP_CONFIG).read_text())
        assert config["model_cfg"]["vision_cfg"]["head_width"] == 32
        assert config["preprocess_cfg"]["mean"] == [0.48145466, 0.4578275, 0.40821073]
        assert json.loads((out / formats.PREPROCESSING).read_text())["context_length"] == 16
    # An existing, non-empty output folder is never overwritten.
    assert convert_main(["hf", f"--checkpoint={tmp_path / 'export'}", f"--output={source}"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_sigmoid_models_export_to_transformers_only_when_the_bias_is_dropped(tmp_path: pathlib.Path) -> None:
    model_config = get_preset("tiny", init_logit_bias=-7.5)
    module = nnx.eval_shape(lambda: build_model(model_config, nnx.Rngs(0)))
    params = {tuple(p): np.full(v.shape, 0.5, np.float32) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    params[("logit_bias",)] = np.array(-7.5, np.float32)
    model = params_io.HostModel(model_config, params, params_io.preprocessing_spec(model_config))
    with pytest.raises(ValueError, match="no logit bias"):
        formats.export_hf(model, tmp_path / "refused")
    formats.export_hf(model, tmp_path / "hf", drop_logit_bias=True)
    assert json.loads((tmp_path / "hf" / formats.PREPROCESSING).read_text())["dropped_logit_bias"] == -7.5
    assert "logit_bias" not in safetensors_numpy.load_file(str(tmp_path / "hf" / formats.HF_WEIGHTS))
    formats.export_openclip(model, tmp_path / "openclip")  # OpenCLIP keeps it
    state = safetensors_numpy.load_file(str(tmp_path / "openclip" / formats.OPENCLIP_WEIGHTS["safetensors"]))
    assert float(state["logit_bias"]) == -7.5
    assert json.loads((tmp_path / "openclip" / formats.OPENCLIP_CONFIG).read_text())["model_cfg"]["init_logit_bias"] == -7.5


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_jclip_to_transformers_to_jclip_is_exact(tmp_path: pathlib.Path, quick_gelu: bool) -> None:
    model_config = get_preset("tiny", quick_gelu=quick_gelu)
    model_config.pop("name")
    module = build_model(model_config, nnx.Rngs(3))
    params = {tuple(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    formats.export_hf(params_io.HostModel(model_config, params, params_io.preprocessing_spec(model_config)),
                      tmp_path / "hf")
    back = formats.import_model(tmp_path / "hf")
    assert back.model_config["quick_gelu"] == quick_gelu
    assert set(back.params) == set(params)
    for path, value in params.items():
        assert np.array_equal(back.params[path], value), path


def test_import_a_state_dict_torch_saved(reference_dir: pathlib.Path, tmp_path: pathlib.Path, torch_python: str) -> None:
    """OpenCLIP's reference state dict, saved by real torch as an OpenCLIP training checkpoint (.pt, with
    DDP's `module.` prefix), imports to the same features."""
    import subprocess

    script = ("import sys, torch; from safetensors.torch import load_file; "
              "sd = {'module.' + k: v for k, v in load_file(sys.argv[1]).items()}; "
              "torch.save({'epoch': 1, 'name': 'run', 'state_dict': sd}, sys.argv[2])")
    path = tmp_path / "epoch_1.pt"
    result = subprocess.run([torch_python, "-c", script, str(reference_dir / "openclip_tiny.safetensors"), str(path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    model = formats.import_model(path, openclip_config=reference_dir / "openclip_tiny.json")
    assert_reproduces(model, dict(np.load(reference_dir / "openclip_tiny_io.npz")))


def test_import_a_bare_state_dict_by_preset(tmp_path: pathlib.Path) -> None:
    model_config = get_preset("tiny", init_logit_bias=-4.0)
    model_config.pop("name")
    module = build_model(model_config, nnx.Rngs(5))
    params = {tuple(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    formats.export_openclip(params_io.HostModel(model_config, params, params_io.preprocessing_spec(model_config)),
                            tmp_path / "openclip")
    weights = tmp_path / "openclip" / formats.OPENCLIP_WEIGHTS["safetensors"]
    with pytest.raises(ValueError, match="say --quick_gelu=true or false"):
        formats.import_model(weights, preset="tiny")
    with pytest.raises(ValueError, match=r"shape mismatch for 'visual.conv1.weight'"):
        formats.import_model(weights, preset="B/32", quick_gelu=False)
    back = formats.import_model(weights, preset="tiny", quick_gelu=False)
    assert back.model_config["init_logit_bias"] == -4.0  # the state dict's bias makes it a sigmoid model
    for path, value in params.items():
        assert np.array_equal(back.params[path], value), path
