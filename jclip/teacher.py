"""A frozen teacher from a jclip checkpoint, whose embeddings join the model outputs of every train step.

`config.teacher.checkpoint` (a workdir, its checkpoints/ folder or a step folder; `config.teacher.step`
optional) names a finished jclip run. Its model is rebuilt from the config saved with it, its parameters are
restored onto the current mesh and never updated, and each step adds `teacher_image_embeddings` and
`teacher_text_embeddings` (L2-normalised, stop-gradient) to the outputs the loss terms see. SoftCLIP's
`guidance="outputs"` uses them (shared/METHODS.md section 2, guidance source (c)). The teacher reads the
same batch, so its image size and context length must equal the student's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from jclip.build import TEACHER_OUTPUTS
from jclip.errors import ConfigError
from jclip.restore import restore_run



@dataclasses.dataclass(frozen=True)
class Teacher:
    """The teacher's pure functions, its restored parameters and their shardings."""

    functions: Any
    params: Any
    shardings: Any

    def outputs(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """The teacher's stop-gradient embeddings of the batch."""
        images = self.functions.encode_images(params, batch["images"])
        texts = self.functions.encode_texts(params, batch["token_ids"])
        return dict(zip(TEACHER_OUTPUTS, (jax.lax.stop_gradient(images), jax.lax.stop_gradient(texts))))


def load_teacher(config: ml_collections.ConfigDict, mesh: Mesh) -> Teacher | None:
    """The configured teacher restored onto `mesh`, or None when `config.teacher.checkpoint` is unset."""
    spec = config.get("teacher") or {}
    if not spec.get("checkpoint"):
        return None
    try:
        setup, params, saved = restore_run(spec["checkpoint"], spec.get("step"), config, mesh)
    except ConfigError as error:
        raise ConfigError(f"teacher.checkpoint: {error}") from error
    if int(saved.model.vision.image_size) != int(config.model.vision.image_size):
        raise ConfigError(f"teacher.checkpoint: the teacher's vision.image_size {saved.model.vision.image_size} "
                          f"differs from the model's {config.model.vision.image_size}")
    if int(saved.model.text.context_length) != int(config.model.text.context_length):
        raise ConfigError("teacher.checkpoint: the teacher's text.context_length differs from the model's")
    return Teacher(setup.functions, params, setup.state_shardings["params"])
