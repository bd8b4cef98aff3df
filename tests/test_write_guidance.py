"""`python -m jclip.write_guidance`: a finished run's embeddings of every training example, written as the
guidance folder SoftCLIP's guidance='batch' trains with."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from jclip import checkpoint, parallel
from jclip.data import configured
from jclip.data.ops import guidance, image as image_ops
from jclip.data.ops.captions import caption_candidates
from jclip.build import TrainSetup
from jclip_testing import REPO_ROOT, micro_run_flags, read_losses


def run_module(module, *flags):
    result = subprocess.run([sys.executable, "-m", module, *flags], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=600)
    return result


@pytest.fixture(scope="module")
def guide_run(scenes_data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("guide")
    result = run_module("jclip.main", "--config=configs/clip.py", f"--workdir={workdir}",
                        *micro_run_flags(scenes_data_dir, total_steps=3, checkpoint_every=3))
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def guidance_dir(guide_run, scenes_data_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("guidance")
    result = run_module("jclip.write_guidance", "--config=configs/softclip.py", f"--checkpoint={guide_run}",
                        f"--output={output}", "--batch_size=32", *micro_run_flags(scenes_data_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "guidance features written to" in result.stdout
    return output


def test_written_features_are_the_models_embeddings_of_each_example(guide_run, guidance_dir, scenes_data_dir):
    saved = ml_collections.ConfigDict(json.loads((guide_run / "config.json").read_text()))
    setup = TrainSetup.create(saved, parallel.make_mesh({"data": -1}))
    checkpointer = checkpoint.Checkpointer(guide_run / "checkpoints", keep=10, async_save=False)
    params = checkpointer.restore(3, setup.abstract_state(), None)["params"]
    checkpointer.close()

    raw = configured.ConfiguredData(saved.data, saved.model).source("train")
    keys = np.load(guidance_dir / "keys.npy")
    assert sorted(keys.tolist()) == sorted(raw[i]["key"] for i in range(len(raw))), "every training example, once"
    features = guidance.GuidanceFeatures(guidance_dir)
    preprocess = image_ops.ImageTextPreprocessor(image_size=saved.model.vision.image_size,
                                                  context_length=saved.model.text.context_length)
    for index in (0, 7, len(raw) - 1):  # one example at a time, unbatched
        example = raw[index]
        inputs = preprocess({"image": image_ops.decode_image(example["image"]),
                             "caption": caption_candidates(example["caption"])[0]})
        image = np.asarray(setup.functions.encode_images(params, inputs["images"][None]))[0]
        text = np.asarray(setup.functions.encode_texts(params, inputs["token_ids"][None]))[0]
        row = features.lookup(example["key"])
        np.testing.assert_allclose(row["guidance_image_features"], image, atol=2e-5)
        np.testing.assert_allclose(row["guidance_text_features"], text, atol=2e-5)


@pytest.mark.slow
def test_softclip_trains_with_the_written_guidance(guidance_dir, scenes_data_dir, tmp_path):
    flags = micro_run_flags(scenes_data_dir, total_steps=2, checkpoint_every=2)
    runs = {}
    for name, extra in {"self": [], "batch": ["--config.losses.softclip.guidance=batch",
                                              f"--config.data.guidance_features={guidance_dir}"]}.items():
        result = run_module("jclip.main", "--config=configs/softclip.py", f"--workdir={tmp_path / name}", *flags, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = read_losses(tmp_path / name)
    # Same initialisation and data; only the guidance differs, so the first step's loss does.
    assert runs["batch"][1] != pytest.approx(runs["self"][1], rel=1e-6)


def test_bad_checkpoint_is_a_clear_error(tmp_path, scenes_data_dir):
    result = run_module("jclip.write_guidance", "--config=configs/softclip.py", f"--checkpoint={tmp_path / 'none'}",
                        f"--output={tmp_path / 'out'}", *micro_run_flags(scenes_data_dir))
    assert result.returncode == 2 and "jclip.write_guidance:" in result.stderr


def test_the_command_writes_into_a_bucket(gcs, guide_run, guidance_dir, scenes_data_dir, tmp_path):
    """--output=gs://…: the same files as the local folder, in the bucket (and no local folder named gs:)."""
    from etils import epath

    from gcs_emulator import BUCKET

    output = f"gs://{BUCKET}/guidance"
    result = subprocess.run([sys.executable, "-m", "jclip.write_guidance", f"--config={REPO_ROOT}/configs/softclip.py",
                             f"--checkpoint={guide_run}", f"--output={output}", "--batch_size=32",
                             *micro_run_flags(scenes_data_dir)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"guidance features written to {output}" in result.stdout
    for name in ("keys.npy", "image.npy", "text.npy"):
        assert epath.Path(output, name).read_bytes() == (guidance_dir / name).read_bytes(), name
    assert not (tmp_path / "gs:").exists()
