"""Exports loaded by the real PyTorch libraries give jclip's embeddings: randomly initialised jclip models
(tiny and ViT-B/32 shapes, exact GELU and quick-GELU) written as transformers and OpenCLIP folders, loaded
with `CLIPModel.from_pretrained` and `open_clip.create_model_and_transforms("local-dir:...")` in their own
interpreters (tests/convert/pytorch_embed.py), and compared on the same inputs within 1e-5."""

from __future__ import annotations

import pathlib
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jclip.convert import formats, params_io
from jclip.data.tokenizer import make_tokenizer
from jclip.models import build_model, get_preset

EMBED_SCRIPT = pathlib.Path(__file__).with_name("pytorch_embed.py")
CAPTIONS = ["a photo of a red cube.", "two small green spheres left of a large metal cylinder", ""]
MODELS = [("tiny", False), ("tiny", True), ("B/32", False), ("B/32", True)]


@pytest.fixture(scope="module", params=MODELS, ids=[f"{p}-{'quickgelu' if q else 'gelu'}" for p, q in MODELS])
def exported(request, tmp_path_factory) -> tuple[params_io.HostModel, pathlib.Path, dict[str, np.ndarray]]:
    """A random jclip model, a folder holding its inputs (inputs.npz), and jclip's features of them."""
    preset, quick_gelu = request.param
    model_config = get_preset(preset, quick_gelu=quick_gelu)
    model_config.pop("name")
    module = build_model(model_config, nnx.Rngs(7))
    params = {tuple(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    size, context = model_config["vision"]["image_size"], model_config["text"]["context_length"]
    tokenizer = make_tokenizer("clip", context)
    inputs = {"images": np.random.default_rng(0).standard_normal((3, 3, size, size)).astype(np.float32),
              "token_ids": np.stack([tokenizer(caption) for caption in CAPTIONS])}
    graphdef, state = nnx.split(module)  # the weights as arguments: as closed-over constants they took 5 s to compile
    outputs = jax.jit(lambda state, i, t: nnx.merge(graphdef, state)({"images": i, "token_ids": t}))(
        state, jnp.asarray(inputs["images"].transpose(0, 2, 3, 1)), jnp.asarray(inputs["token_ids"]))
    folder = tmp_path_factory.mktemp("parity")
    np.savez(folder / "inputs.npz", **inputs)
    model = params_io.HostModel(model_config, params, params_io.preprocessing_spec(model_config))
    return model, folder, {k: np.asarray(outputs[k]) for k in ("image_features", "text_features")}


def run_library(python: str, kind: str, folder: pathlib.Path, inputs: pathlib.Path) -> dict[str, np.ndarray]:
    out = folder / "outputs.npz"
    result = subprocess.run([python, str(EMBED_SCRIPT), kind, str(folder), str(inputs), str(out)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = dict(np.load(out))
    if (folder / "outputs.npz.tokens.npy").exists():
        outputs["tokens"] = np.load(folder / "outputs.npz.tokens.npy")
    return outputs


def assert_same_features(library: dict[str, np.ndarray], jclip: dict[str, np.ndarray]) -> None:
    for key in ("image_features", "text_features"):
        error = float(np.max(np.abs(library[key] - jclip[key])))
        print(f"{key}: max abs difference {error:.2e} (max |value| {np.max(np.abs(jclip[key])):.2f})")
        np.testing.assert_allclose(library[key], jclip[key], atol=1e-5, rtol=1e-5)


def test_transformers_clipmodel_gives_jclips_features(exported, torch_python: str) -> None:
    model, work, jclip = exported
    folder = work / "hf"
    formats.export_hf(model, folder)
    library = run_library(torch_python, "hf", folder, work / "inputs.npz")
    assert_same_features(library, jclip)
    assert float(library["logit_scale"]) == pytest.approx(float(model.params[("logit_scale",)]), rel=1e-7)


@pytest.mark.parametrize("weights", ["safetensors", "pt"])
def test_openclip_gives_jclips_features_and_tokens(exported, openclip_python: str, weights: str) -> None:
    model, work, jclip = exported
    folder = work / f"openclip_{weights}"
    formats.export_openclip(model, folder, weights=weights)
    library = run_library(openclip_python, "openclip", folder, work / "inputs.npz")
    assert_same_features(library, jclip)
    # OpenCLIP's tokenizer for the folder (from its config) gives jclip's token ids.
    context = model.model_config["text"]["context_length"]
    np.testing.assert_array_equal(library["tokens"][0], make_tokenizer("clip", context)("a photo of a red cube."))


PREPROCESS_SCRIPT = """
import json, sys
import numpy as np
import open_clip
from PIL import Image
from transformers import CLIPImageProcessor

folder, images, out = sys.argv[1:]  # an OpenCLIP export with a transformers export in folder/hf
config = json.load(open(f"{folder}/open_clip_config.json"))["preprocess_cfg"]
transform = open_clip.image_transform(config["size"], is_train=False, mean=config["mean"], std=config["std"],
                                      resize_mode=config["resize_mode"], interpolation=config["interpolation"])
hf = CLIPImageProcessor.from_pretrained(f"{folder}/hf")
pil = [Image.open(path) for path in images.split(",")]
np.savez(out, openclip=np.stack([transform(image).numpy() for image in pil]),
         hf=hf(images=pil, return_tensors="np")["pixel_values"])
"""


def test_exported_preprocessing_gives_jclips_pixels(openclip_python: str, tmp_path: pathlib.Path) -> None:
    """OpenCLIP's transform built from the exported preprocess_cfg gives jclip's pixels exactly; transformers'
    CLIPImageProcessor from preprocessor_config.json within one 8-bit level (its resize rounds differently)."""
    from PIL import Image

    from jclip.data.ops.image import centre_crop, normalise, resize_short_side

    model_config = get_preset("tiny", vision={**get_preset("tiny")["vision"], "image_size": 224, "patch_size": 32})
    module = nnx.eval_shape(lambda: build_model(model_config, nnx.Rngs(0)))
    params = {tuple(p): np.zeros(v.shape, np.float32) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    model = params_io.HostModel(model_config, params, params_io.preprocessing_spec(model_config))
    formats.export_openclip(model, tmp_path / "export")
    formats.export_hf(model, tmp_path / "export" / "hf")
    rng = np.random.default_rng(0)
    paths, expected = [], []
    for index, (width, height) in enumerate([(32, 32), (48, 32), (300, 400), (224, 224)]):
        smooth = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(smooth).resize((width, height), Image.BILINEAR)
        paths.append(tmp_path / f"image{index}.png")
        image.save(paths[-1])
        expected.append(normalise(centre_crop(resize_short_side(image, 224), 224)).transpose(2, 0, 1))
    script = tmp_path / "preprocess.py"
    script.write_text(PREPROCESS_SCRIPT)
    result = subprocess.run([openclip_python, str(script), str(tmp_path / "export"), ",".join(map(str, paths)),
                             str(tmp_path / "pixels.npz")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    pixels = np.load(tmp_path / "pixels.npz")
    np.testing.assert_array_equal(pixels["openclip"], np.stack(expected))
    one_level = 1 / 255 / min(model.preprocessing["std"])
    difference = np.abs(pixels["hf"] - np.stack(expected))
    print(f"CLIPImageProcessor vs jclip: max {difference.max():.4f}, mean {difference.mean():.2e}")
    assert difference.max() <= one_level * 1.01
