"""Precompute SoftCLIP guidance features with a finished jclip run, for `guidance="batch"`.

    python -m jclip.write_guidance --checkpoint=/tmp/teacher --config=configs/softclip.py --output=/tmp/guidance
    python -m jclip.main --config=configs/softclip.py --workdir=/tmp/softclip \\
        --config.losses.softclip.guidance=batch --config.data.guidance_features=/tmp/guidance

Embeds every training example of `--config`'s data (each mixture component's training split) with the
checkpoint's model, once, and writes the folder `jclip.data.ops.guidance` reads: the examples' keys, their image
embeddings and the embeddings of their first caption (training samples among several captions; the guidance
is of the first). Images are preprocessed at the checkpoint's own image size and captions at its context
length, so the guiding model may differ from the model being trained. Unlike `teacher.checkpoint` (SoftCLIP
`guidance="outputs"`), the guiding model costs nothing per step; it sees the centre crop, not the step's
augmented view.
"""

from __future__ import annotations

import os
import time
from typing import Any

from absl import app, flags
from etils import epath
from ml_collections import config_flags

from jclip.cli import initialise_distributed, parse_flags, user_error

_CONFIG = config_flags.DEFINE_config_file("config", None, "The training config whose data to embed.", lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "The guiding model: a workdir, its checkpoints/ folder or a step folder.")
_STEP = flags.DEFINE_integer("step", None, "The checkpoint step (default: the latest).")
_OUTPUT = flags.DEFINE_string("output", None, "The folder to write (keys.npy, image.npy, text.npy), local or gs://.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Global batch size of the embedding passes.")
PROGRESS_EVERY = 10_000


def write_guidance(checkpoint: str, config: Any, output: str | os.PathLike, *, step: int | None = None,
                   batch_size: int = 256) -> epath.Path:
    """Embeds every training example with the checkpoint's model and writes the guidance folder."""
    import jax
    import numpy as np

    from jclip import parallel
    from jclip.data import robust
    from jclip.data.configured import ConfiguredData
    from jclip.data.ops import guidance
    from jclip.data.ops.captions import caption_candidates
    from jclip.evals.common import ImagesOnly, embed_split, embed_texts
    from jclip.restore import restore_run

    mesh = parallel.make_mesh(dict(config.mesh))

    setup, params, saved = restore_run(checkpoint, step, config, mesh)
    encoders = setup.encoders()
    data = ConfiguredData(config.data, saved.model)  # the guiding model's image size, context and tokenizer
    keys, images, texts = [], [], []
    for name, raw in data.random_access_training_sources():
        started = time.perf_counter()
        count = len(raw)
        component_keys, captions = [], []
        for index in range(count):
            if index and index % PROGRESS_EVERY == 0:
                print(f"guidance: {name}: read {index}/{count} keys and captions", flush=True)
            example = raw[index]
            key = robust.example_key(example)
            if key is None:
                raise ValueError(f"training component {name!r}: example {index} has no key")
            component_keys.append(key)
            candidates = caption_candidates(example.get("caption"))
            if not candidates:
                raise ValueError(f"training example {key!r} has no usable caption")
            captions.append(candidates[0])
        embedded = embed_split(params, encoders, raw, ImagesOnly(data.eval_preprocess()), batch_size=batch_size)
        keys += component_keys
        images.append(embedded["image_embeddings"])
        texts.append(embed_texts(params, encoders, captions, batch_size=batch_size))
        print(f"guidance: {name}: {count} examples in {time.perf_counter() - started:.1f} s", flush=True)
    output = epath.Path(output)  # local, or a bucket (gs://)
    if jax.process_index() == 0:
        guidance.write_guidance_features(output, keys, image=np.concatenate(images).astype(np.float32),
                                         text=np.concatenate(texts).astype(np.float32))
    return output


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    for flag in (_CONFIG, _CHECKPOINT, _OUTPUT):
        if flag.value is None:
            raise app.UsageError(f"--{flag.name} is required")
    from jclip.errors import ConfigError

    initialise_distributed()
    import jax

    try:
        directory = write_guidance(_CHECKPOINT.value, _CONFIG.value, _OUTPUT.value, step=_STEP.value,
                                   batch_size=_BATCH_SIZE.value)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        user_error(f"jclip.write_guidance: {error}", error)
    if jax.process_index() == 0:
        print(f"guidance features written to {directory}", flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
