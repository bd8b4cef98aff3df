"""`jclip_scenes`: the embedded dataset, a TFDS builder over `jclip.data.sources.scenes`, stored as ArrayRecord.

Every jclip config defaults to it: it needs no download, the `default` config (44k images, ~290 MB) builds in
about 30 s on 2 CPU cores (the `small` one in a few seconds), and it carries the annotations for zero-shot
classification (`label`, `labels`), retrieval (`caption`), dense-caption methods (`dense_caption`) and a
SugarCrepe-like compositional benchmark (`probe_caption`, `negative_captions`).

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
import fcntl
import io
import logging
import os
import pickle
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from jclip.data.sources import scenes

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


def encode_png(image: np.ndarray, level: int = 1) -> bytes:
    """Encodes uint8 [H, W, 3] as PNG with PIL at zlib `level` (1: fast; files ~5% larger than level 6)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected uint8 [H, W, 3], got {image.dtype} {image.shape}")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=level)
    return buffer.getvalue()


def generate_record(seed: int, split: str, index: int, image_size: int = 64) -> dict[str, Any]:
    """One example as the dict of feature values TFDS encodes (image as PNG bytes)."""
    example = scenes.make_example(example_rng(seed, split, index), image_size)
    scene = example.scene
    return {
        "id": index,
        "image": encode_png(example.image),
        "caption": example.caption,
        "dense_caption": example.dense_caption,
        "labels": scene.labels,
        "label": scene.label,
        "probe_caption": example.probe.text,
        "negative_captions": np.array(example.negative_captions, dtype=object),
        "object_sizes": np.array([scenes.SIZES.index(o.size) for o in scene.objects], dtype=np.int64),
        "object_bboxes": np.array([[o.y - o.half_size, o.x - o.half_size, o.y + o.half_size, o.x + o.half_size]
                                   for o in scene.objects], dtype=np.float32),
    }


def _worker_main(seed: int, split: str, num_examples: int, image_size: int, worker: int, num_workers: int,
                 block: int) -> None:
    """Entry point of a generation subprocess: pickles blocks worker, worker + num_workers, ... to stdout."""
    out = sys.stdout.buffer
    for start in range(worker * block, num_examples, num_workers * block):
        records = [generate_record(seed, split, i, image_size) for i in range(start, min(start + block, num_examples))]
        pickle.dump(records, out, protocol=pickle.HIGHEST_PROTOCOL)
        out.flush()


def _generate_in_subprocesses(seed: int, split: str, num_examples: int, image_size: int, num_workers: int,
                              block: int = 128) -> Iterator[dict[str, Any]]:
    """Records 0..num_examples-1 in order, made by `num_workers` fresh interpreters in round-robin blocks.

    Plain subprocesses rather than a multiprocessing pool: "fork" is unsafe under JAX's threads, and "spawn"
    re-imports the caller's `__main__`, which hangs or recurses for unguarded scripts and stdin.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    command = ("import sys; from jclip.data.sources import embedded; "
               "embedded._worker_main(int(sys.argv[1]), sys.argv[2], *map(int, sys.argv[3:]))")
    workers = [
        subprocess.Popen([sys.executable, "-c", command, str(seed), split, str(num_examples), str(image_size),
                          str(k), str(num_workers), str(block)], stdout=subprocess.PIPE, env=env)
        for k in range(num_workers)
    ]
    try:
        for b in range(-(-num_examples // block)):
            worker = workers[b % num_workers]
            try:
                records = pickle.load(worker.stdout)
            except EOFError:
                raise RuntimeError(f"jclip_scenes generation worker exited with code {worker.wait()}") from None
            yield from records
    finally:
        for worker in workers:
            worker.stdout.close()
            worker.kill()
            worker.wait()


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
    #: Worker processes generating the splits of at least `min_examples_for_workers` examples (the main
    #: process encodes and writes). Records come back in index order either way, so the data is the same.
    num_workers: int = min(4, os.cpu_count() or 1)
    min_examples_for_workers: int = 1_000

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
                # Per object, aligned with `labels` (plain tensors: a third cheaper to serialise than a
                # Sequence of dicts). Sizes index scenes.SIZES (0 small, 1 large); boxes are
                # (ymin, xmin, ymax, xmax) as fractions of the image side, the TFDS bbox convention.
                "object_sizes": tfds.features.Tensor(shape=(None,), dtype=np.int64),
                "object_bboxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # record i is example i; shuffling belongs to the sampler
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        config = self.builder_config
        num_examples = config.num_examples(split)
        if self.num_workers <= 1 or num_examples < self.min_examples_for_workers:
            records = (generate_record(config.seed, split, i, config.image_size) for i in range(num_examples))
        else:  # each record depends only on (seed, split, index): the same data, whoever makes it
            records = _generate_in_subprocesses(config.seed, split, num_examples, config.image_size, self.num_workers)
        for record in records:
            yield record["id"], record


def load_source(split: str, data_dir: str | None = None, config: str = "default") -> Any:
    """A random-access source (len, __getitem__) over one split for Grain; builds the dataset on first use.

    The dataset lives under `data_dir` (default: TFDS's, `~/tensorflow_datasets` or `$TFDS_DATA_DIR`). Items
    are dicts decoded without TensorFlow:
      image: np.ndarray uint8 [64, 64, 3] (decoded from the stored PNG by PIL, not bytes);
      caption, dense_caption, probe_caption: bytes (UTF-8);
      negative_captions: np.ndarray, object dtype, shape [3], of bytes (attribute, relation, object);
      labels: list of np.int64 class ids (n = 2..4 objects); label: int; id: int (the index in the split);
      object_sizes: np.ndarray int64 [n] (0 small, 1 large); object_bboxes: np.ndarray float32 [n, 4].
    Processes that start together (a local multi-process launch) build it once: a file lock serialises them.
    """
    builder = JclipScenes(config=config, data_dir=data_dir)
    if not builder.is_prepared():
        _build_once(builder)
        builder = JclipScenes(config=config, data_dir=data_dir)  # reload the info the build wrote
    return builder.as_data_source(split)


def _build_once(builder: JclipScenes) -> None:
    """Builds under an exclusive lock next to the version folder, unless another process did it meanwhile."""
    config_dir = epath.Path(builder.data_dir).parent
    config_dir.mkdir(parents=True, exist_ok=True)
    with open(config_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if builder.is_prepared():
                return
            cfg = builder.builder_config
            total = cfg.num_train + cfg.num_validation + cfg.num_test
            message = f"jclip_scenes/{cfg.name}: generating {total} examples into {builder.data_dir} (first use)..."
            logging.info(message)
            print(message, flush=True)
            start = time.perf_counter()
            builder.download_and_prepare(file_format="array_record")
            message = f"jclip_scenes/{cfg.name}: built in {time.perf_counter() - start:.1f} s."
            logging.info(message)
            print(message, flush=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
