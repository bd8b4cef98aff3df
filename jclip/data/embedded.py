"""`jclip_scenes`: the embedded dataset, a TFDS builder over `jclip.data.scenes`, stored as ArrayRecord.

Every jclip config defaults to it: it needs no download, builds in seconds on a laptop CPU, and carries the
annotations for zero-shot classification (`label`, `labels`), retrieval (`caption`), dense-caption methods
(`dense_caption`) and a SugarCrepe-like compositional benchmark (`probe_caption`, `negative_captions`).

Each example is a pure function of (config seed, split, index): its RNG is
`np.random.default_rng([seed, crc32(split), index])`, so generation order and worker count never change the
data. Shuffling is disabled in the writer, so record `i` of a split is the example with `id == i` (samplers
such as Grain's shuffle indices themselves).

Building needs neither TensorFlow nor Apache Beam: `GeneratorBasedBuilder` writes through TFDS's in-process
writer, which serialises examples with its own protobuf code, and `file_format='array_record'` makes it
write `.array_record` shards. Images are given to TFDS as PNG bytes (numpy arrays would need TF to encode).

Read back with `load_source(split)`: a random-access `ArrayRecordDataSource` whose items are dicts of NumPy
values decoded without TF (see `load_source` for the exact types).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import multiprocessing
import time
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from jclip.data import scenes

SPLITS: tuple[str, ...] = ("train", "validation", "test")


@dataclasses.dataclass(eq=False)
class JclipScenesConfig(tfds.core.BuilderConfig):
    """Split sizes, image side and seed of one variant of the dataset."""

    num_train: int = 40_000
    num_validation: int = 2_000
    num_test: int = 2_000
    seed: int = 0
    image_size: int = 64

    def num_examples(self, split: str) -> int:
        return {"train": self.num_train, "validation": self.num_validation, "test": self.num_test}[split]


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The RNG of one example, derived from (seed, split, index) only (crc32 is stable across runs and hosts)."""
    return np.random.default_rng([seed, zlib.crc32(split.encode("utf-8")), index])


def generate_record(seed: int, split: str, index: int, image_size: int = 64) -> dict[str, Any]:
    """One example as the dict of feature values TFDS encodes (image as PNG bytes)."""
    example = scenes.make_example(example_rng(seed, split, index), image_size)
    buffer = io.BytesIO()
    # compress_level=1: 2x faster than the default and about as small, since the background grain dominates.
    Image.fromarray(example.image).save(buffer, format="PNG", compress_level=1)
    scene = example.scene
    return {
        "id": index,
        "image": buffer.getvalue(),
        "caption": example.caption,
        "dense_caption": example.dense_caption,
        "labels": scene.labels,
        "label": scene.label,
        "probe_caption": example.probe.text,
        "negative_captions": np.array(example.negative_captions, dtype=object),
        "objects": {
            "label": scene.labels,
            "size": [scenes.SIZES.index(o.size) for o in scene.objects],
            "bbox": np.array([[o.y - o.half_size, o.x - o.half_size, o.y + o.half_size, o.x + o.half_size]
                              for o in scene.objects], dtype=np.float32),
        },
    }


def _generate_record_star(args: tuple[int, str, int, int]) -> tuple[int, dict[str, Any]]:
    return args[2], generate_record(*args)


class JclipScenes(tfds.core.GeneratorBasedBuilder):
    """Procedurally generated shapes with alt-text, dense captions, class labels and hard-negative probes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        JclipScenesConfig(name="default", description="40k/2k/2k images of 64x64, for training a tiny CLIP."),
        JclipScenesConfig(name="small", description="2000/256/256 images, for tests and smoke runs.",
                          num_train=2_000, num_validation=256, num_test=256),
        JclipScenesConfig(name="tiny", description="128/32/32 images, for unit tests.",
                          num_train=128, num_validation=32, num_test=32),
    ]
    DEFAULT_CONFIG_NAME = "default"
    # Record i is example i; shuffling belongs to the sampler.
    disable_shuffling = True
    #: Worker processes for generation (1: in-process). Records come back in index order either way.
    num_workers: int = 1

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """This file. TFDS's own lookup needs the undeclared `importlib_resources` package for installed packages."""
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        class_label = tfds.features.ClassLabel(names=scenes.CLASS_NAMES)
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "id": np.int64,
                "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                "caption": tfds.features.Text(),
                "dense_caption": tfds.features.Text(),
                "labels": tfds.features.Sequence(class_label),
                "label": class_label,
                "probe_caption": tfds.features.Text(),
                # Order: scenes.NEGATIVE_KINDS = (attribute_swap, relation_swap, object_replace).
                "negative_captions": tfds.features.Tensor(shape=(len(scenes.NEGATIVE_KINDS),), dtype=np.str_),
                "objects": tfds.features.Sequence({
                    "label": class_label,
                    "size": tfds.features.ClassLabel(names=scenes.SIZES),
                    # (ymin, xmin, ymax, xmax) as fractions of the image side, the TFDS bbox convention.
                    "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                }),
            }),
            supervised_keys=("image", "label"),
            homepage="https://github.com/jclip/jclip",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        config = self.builder_config
        jobs = ((config.seed, split, i, config.image_size) for i in range(config.num_examples(split)))
        if self.num_workers <= 1:
            yield from map(_generate_record_star, jobs)
            return
        # imap keeps input order, and each record depends only on its own arguments: deterministic.
        with multiprocessing.get_context("spawn").Pool(self.num_workers) as pool:
            yield from pool.imap(_generate_record_star, jobs, chunksize=256)


def load_source(split: str, data_dir: str | None = None, config: str = "default") -> Any:
    """A random-access source (len, __getitem__) over one split for Grain; builds the dataset on first use.

    The dataset lives under `data_dir` (default: TFDS's, `~/tensorflow_datasets` or `$TFDS_DATA_DIR`). Items
    are dicts decoded without TensorFlow:
      image: np.ndarray uint8 [64, 64, 3] (decoded from PNG, not bytes);
      caption, dense_caption, probe_caption: bytes (UTF-8);
      negative_captions: np.ndarray of object dtype, shape [3], holding bytes;
      labels: list of np.int64 class ids; label: int; id: int (the index within the split);
      objects: {"label": np.ndarray int64 [n], "size": np.ndarray int64 [n], "bbox": np.ndarray float32 [n, 4]}.
    """
    builder = JclipScenes(config=config, data_dir=data_dir)
    if not builder.is_prepared():
        cfg = builder.builder_config
        total = cfg.num_train + cfg.num_validation + cfg.num_test
        message = f"jclip_scenes/{config}: generating {total} examples into {builder.data_dir} (first use only)..."
        logging.info(message)
        print(message, flush=True)
        start = time.perf_counter()
        builder.download_and_prepare(file_format="array_record")
        message = f"jclip_scenes/{config}: built in {time.perf_counter() - start:.1f} s."
        logging.info(message)
        print(message, flush=True)
    return builder.as_data_source(split)
