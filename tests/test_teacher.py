"""A frozen teacher from a finished run: its embeddings reach the loss (SoftCLIP guidance='outputs'), its
parameters never change, and a missing or mismatched teacher is a clear config error."""

from __future__ import annotations

import json

import jax
import ml_collections
import numpy as np
import pytest

from jclip import checkpoint, parallel
from jclip.config_validation import validate_config
from jclip.errors import ConfigError
from jclip.teacher import load_teacher
from jclip.build import TrainSetup
from jclip_testing import micro_config, micro_run_flags, read_losses, run_jclip_main


@pytest.fixture(scope="module")
def teacher_run(micro_clip_run):
    return micro_clip_run


@pytest.mark.slow
def test_teacher_guidance_changes_the_soft_targets(teacher_run, scenes_data_dir, tmp_path):
    flags = micro_run_flags(scenes_data_dir, total_steps=2, checkpoint_every=2)
    run_jclip_main(tmp_path / "self", "configs/softclip.py", flags)
    run_jclip_main(tmp_path / "teacher", "configs/softclip.py",
             flags + ["--config.losses.softclip.guidance=outputs", f"--config.teacher.checkpoint={teacher_run}"])
    # Same initialisation and data: only the guidance differs, so the first step's loss differs.
    assert read_losses(tmp_path / "teacher")[1] != pytest.approx(read_losses(tmp_path / "self")[1], rel=1e-6)


def test_restored_teacher_embeds_like_the_teachers_own_checkpoint(teacher_run):
    saved = json.loads((teacher_run / "config.json").read_text())
    config = ml_collections.ConfigDict(saved)
    config.teacher = {"checkpoint": str(teacher_run), "step": None}
    mesh = parallel.make_mesh({"data": -1})
    teacher = load_teacher(config, mesh)
    # The step-3 params, restored independently through the teacher's own TrainSetup.
    setup = TrainSetup.create(ml_collections.ConfigDict(saved), mesh)
    checkpointer = checkpoint.Checkpointer(teacher_run / "checkpoints", keep=10, async_save=False)
    state = checkpointer.restore(3, setup.abstract_state(), None)
    checkpointer.close()
    for got, expected in zip(jax.tree.leaves(teacher.params), jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    rng = np.random.default_rng(0)
    size = config.model.vision.image_size
    batch = {"images": rng.normal(size=(8, size, size, 3)).astype(np.float32),
             "token_ids": rng.integers(1, 100, size=(8, config.model.text.context_length)).astype(np.int32)}
    outputs = teacher.outputs(teacher.params, batch)
    norms = np.linalg.norm(np.asarray(outputs["teacher_image_embeddings"]), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(outputs["teacher_text_embeddings"]),
        np.asarray(setup.functions.encode_texts(state["params"], batch["token_ids"])), rtol=1e-6,
    )


def test_outputs_guidance_without_teacher_is_a_config_error():
    config = micro_config(**{"model.text.vocab_size": 49408})
    config.losses = {"softclip": {"guidance": "outputs"}}
    with pytest.raises(ConfigError, match="teacher.checkpoint"):
        validate_config(config)


def test_teacher_with_another_image_size_is_refused(teacher_run):
    config = micro_config()
    config.teacher = {"checkpoint": str(teacher_run), "step": None}
    config.model.vision.image_size = 64
    with pytest.raises(ConfigError, match="image_size"):
        load_teacher(config, parallel.make_mesh({"data": -1}))
