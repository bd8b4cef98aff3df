"""Input-pipeline throughput benchmark: can this host's CPUs feed the train step?

Command:
    python -m jclip.tools.data_bench --config=configs/clip.py[:args] [--config.x=y ...]
        [--jpegs=PATH] [--num_images=2000] [--random_crop_scale=0.9,1.0] [--steps=10] [--json=PATH]
        [--parts=jpegs,config,sizes] [--sizes=256,512,640x480] [--photo_images=70]

It prints (and with `--json` writes) these measurements (`--parts`, default the first two):

1. Real JPEGs (default `<repo>/../shared/data/cifar10/cifar10-train.tar.gz`; `--jpegs` takes a tar(.gz) or
   a folder; generated JPEGs, labelled synthetic, when none is found). `--num_images` files are read into
   memory first (file reading is not timed), captioned "a photo of a {class}.", then timed through
   `ConfiguredData.train_preprocess()` (decode, resize/crop to the config's image size, optional random-resized
   crop, normalise, tokenise): one thread, in images per CPU-second (= per core) and per wall second; and
   through the full Grain training pipeline (the config's num_threads / num_workers) in examples/s.
2. The config: the jitted train step's consumption (examples/s, random inputs of the config's shapes, on the
   local devices), the delivery of `ConfiguredData(config.data, config.model).training_dataset(...)` on the
   config's own source, their ratio pipeline/step (> 1: the accelerators never wait for data), and both
   running together (pull a batch, run a step, as `jclip.train.run` does), the real rate when they share
   the CPU.

3. Photo sizes (`--parts=sizes --sizes=256,512,640x480`): real photos that scikit-image ships (optional:
   `pip install scikit-image`; PIL-generated images, labelled synthetic, without it), re-encoded with PIL as
   JPEG quality 90 at each size (`N`: shorter side N; `WxH`: covered and centre-cropped), then per size,
   exact decode and JPEG draft mode (`data.jpeg_draft`): decode + resize/crop to the config's image size,
   and the whole training preprocessing, in images per CPU-second (per core); the pixel difference of the
   draft from the exact path (centre crop, uint8, mean and max absolute); and the Grain pipeline with the
   config's num_threads / num_workers (`--config.data.num_workers=-1`: auto) in examples/s.

The pipeline is one process's (one host's): with P hosts each reads its 1/P of every global batch, so the
ratio here is that of a single-host run; the per-core rate says how many cores a host needs.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import pathlib
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

import configs

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_JPEGS = REPO_ROOT.parent / "shared" / "data" / "cifar10" / "cifar10-train.tar.gz"
JPEG_SUFFIXES = (".jpg", ".jpeg")
CAPTION_TEMPLATE = "a photo of {}."
SYNTHETIC_CLASSES = ("red", "green", "blue", "yellow", "cyan", "magenta", "orange", "purple", "grey", "brown")
#: Colour photos shipped inside the scikit-image wheel (no download): skimage.data function -> caption name.
SKIMAGE_PHOTOS = {"astronaut": "astronaut", "coffee": "cup of coffee", "chelsea": "cat", "rocket": "rocket",
                  "stereo_motorcycle": "motorcycle", "hubble_deep_field": "galaxy field", "retina": "retina"}
PHOTO_QUALITY = 90
PARTS = ("jpegs", "config", "sizes")

RawExample = dict[str, Any]


# ---------------------------------------------------------------------------------------------------------
# JPEGs in memory


@dataclasses.dataclass
class JpegSet:
    """Raw examples {image (JPEG bytes), caption, label, key} held in memory, and where they came from."""

    examples: list[RawExample]
    origin: str
    synthetic: bool
    class_names: list[str]

    def describe(self) -> str:
        sizes = [len(e["image"]) for e in self.examples]
        kind = "SYNTHETIC JPEGs (generated here)" if self.synthetic else "JPEGs"
        return (f"{len(self.examples)} {kind} from {self.origin}, {len(self.class_names)} classes, "
                f"mean {np.mean(sizes) / 1024:.1f} KiB, {self.pixel_size()} px")

    def pixel_size(self) -> str:
        """The first image's width x height (PIL reads the header only)."""
        from PIL import Image

        width, height = Image.open(io.BytesIO(self.examples[0]["image"])).size
        return f"{width}x{height}"


class InMemorySource:
    """A random-access source over a list of raw examples (picklable, for Grain worker processes)."""

    def __init__(self, examples: Sequence[RawExample]):
        self._examples = list(examples)

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index: int) -> RawExample:
        return self._examples[index]


def caption_for(class_name: str) -> str:
    """"a photo of a dog." / "a photo of an airplane." (underscores read as spaces)."""
    name = class_name.replace("_", " ")
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return CAPTION_TEMPLATE.format(f"{article} {name}")


def _class_of(path: str) -> str:
    """The class of `.../<class>/<file>`: its parent folder's name ("thing" for a file at the top)."""
    parts = [p for p in pathlib.PurePosixPath(path).parts[:-1] if p not in (".", "")]
    return parts[-1] if parts else "thing"


def _balanced(by_class: dict[str, list[tuple[str, bytes]]], num_images: int) -> list[tuple[str, str, bytes]]:
    """Up to `num_images` (class, key, bytes), taken round-robin over the classes (sorted) so all appear."""
    names = sorted(by_class)
    picked: list[tuple[str, str, bytes]] = []
    for position in range(max((len(v) for v in by_class.values()), default=0)):
        for name in names:
            if position < len(by_class[name]) and len(picked) < num_images:
                key, data = by_class[name][position]
                picked.append((name, key, data))
    return picked


def _read_tar(path: pathlib.Path, num_images: int) -> dict[str, list[tuple[str, bytes]]]:
    """Up to `num_images` JPEGs per class from a tar(.gz), read in one streaming pass."""
    by_class: dict[str, list[tuple[str, bytes]]] = {}
    with tarfile.open(path, "r|*") as archive:
        for member in archive:
            if not member.isfile() or not member.name.lower().endswith(JPEG_SUFFIXES):
                continue
            name = _class_of(member.name)
            bucket = by_class.setdefault(name, [])
            if len(bucket) < num_images:
                handle = archive.extractfile(member)
                if handle is not None:
                    bucket.append((member.name, handle.read()))
    return by_class


def _read_folder(path: pathlib.Path, num_images: int) -> dict[str, list[tuple[str, bytes]]]:
    """Up to `num_images` JPEGs per class from `path/<class>/...` (or a flat folder: one class)."""
    from jclip.data.sources import folder

    try:
        source = folder.folder_from_class_dirs(str(path), extensions=JPEG_SUFFIXES)
        names = source.class_names() or []
        by_class: dict[str, list[tuple[str, bytes]]] = {}
        for index in range(len(source)):
            example = source[index]
            bucket = by_class.setdefault(names[example["label"]], [])
            if len(bucket) < num_images and example["image"] is not None:
                bucket.append((example["key"], example["image"]))
        return by_class
    except ValueError:  # no class folders: the JPEGs directly in `path`
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in JPEG_SUFFIXES)[:num_images]
        return {"thing": [(p.name, p.read_bytes()) for p in files]} if files else {}


def synthetic_jpegs(num_images: int, size: int = 32, seed: int = 0) -> JpegSet:
    """Generated JPEGs (a class colour with a gradient and noise, quality 90) when no real ones are at hand."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.6, 1.0, size, dtype=np.float32)[None, :, None]
    examples = []
    for index in range(num_images):
        label = index % len(SYNTHETIC_CLASSES)
        colour = rng.uniform(40, 255, size=3).astype(np.float32)
        pixels = colour * ramp + rng.normal(0, 20, size=(size, size, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(buffer, "JPEG", quality=90)
        name = SYNTHETIC_CLASSES[label]
        examples.append({"image": buffer.getvalue(), "caption": caption_for(name), "label": label,
                         "key": f"synthetic/{name}/{index:05d}.jpg"})
    return JpegSet(examples, f"generator ({size}x{size}, quality 90)", True, list(SYNTHETIC_CLASSES))


def load_jpegs(path: str | os.PathLike | None, num_images: int, *, synthetic_size: int = 32) -> tuple[JpegSet, str | None]:
    """`num_images` JPEGs with class captions in memory, and a note when it had to fall back to synthetic ones.

    `path` is a tar(.gz) or folder of `<class>/<file>.jpg`; None means the default CIFAR-10 tarball.
    Classes are taken round-robin, so a class-sorted archive still gives every class.
    """
    target = pathlib.Path(path) if path is not None else DEFAULT_JPEGS
    if not target.exists():
        note = f"no JPEGs at {target}: using SYNTHETIC JPEGs instead (rates are not those of real photos)"
        return synthetic_jpegs(num_images, synthetic_size), note
    by_class = _read_folder(target, num_images) if target.is_dir() else _read_tar(target, num_images)
    picked = _balanced(by_class, num_images)
    if not picked:
        note = f"no JPEG files in {target}: using SYNTHETIC JPEGs instead"
        return synthetic_jpegs(num_images, synthetic_size), note
    names = sorted(by_class)
    examples = [{"image": data, "caption": caption_for(name),
                 "label": names.index(name), "key": key} for name, key, data in picked]
    note = None if len(picked) == num_images else f"{target} holds only {len(picked)} JPEGs (asked for {num_images})"
    return JpegSet(examples, str(target), False, names), note


# ---------------------------------------------------------------------------------------------------------
# Photos at img2dataset and COCO sizes


@dataclasses.dataclass
class Photos:
    """RGB photos as arrays, by caption name, and where they came from."""

    images: dict[str, np.ndarray]
    origin: str
    synthetic: bool


def parse_size(text: str) -> tuple[int, int] | int:
    """`"512"` -> 512 (shorter side), `"640x480"` -> (640, 480) (width, height)."""
    text = str(text).strip().lower()
    width, sep, height = text.partition("x")
    try:
        size = (int(width), int(height)) if sep else int(width)
    except ValueError:
        raise ValueError(f"a size is N (shorter side) or WxH, got {text!r}") from None
    if min(size if isinstance(size, tuple) else (size,)) <= 0:
        raise ValueError(f"a size must be positive, got {text!r}")
    return size


def size_label(size: tuple[int, int] | int) -> str:
    return f"{size[0]}x{size[1]}" if isinstance(size, tuple) else str(size)


def skimage_photos() -> Photos | None:
    """The colour photos that scikit-image ships in its wheel, or None when it is not installed."""
    try:
        from skimage import data as skimage_data
    except ImportError:
        return None
    images = {}
    for function, name in SKIMAGE_PHOTOS.items():
        image = getattr(skimage_data, function)()
        images[name] = np.asarray(image[0] if function == "stereo_motorcycle" else image)  # (left, right, disparity)
    return Photos(images, "scikit-image's bundled sample photos", False)


def synthetic_photos(count: int = 7, size: tuple[int, int] = (1000, 750), seed: int = 0) -> Photos:
    """Generated stand-ins for photos: smooth colour fields, random ellipses with soft edges and fine noise
    texture (what JPEG and resizing find in photos), labelled synthetic."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    images = {}
    for index in range(count):
        base = np.stack([128 + 100 * np.sin(rng.uniform(2, 9) * x + rng.uniform(1, 6) * y + rng.uniform(0, 6))
                         for _ in range(3)], axis=-1)
        image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(40):
            left, top = rng.uniform(0, width), rng.uniform(0, height)
            extent = rng.uniform(10, width / 4)
            draw.ellipse((left, top, left + extent, top + extent * rng.uniform(0.3, 2)),
                         fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        image = image.filter(ImageFilter.GaussianBlur(1.0))
        pixels = np.asarray(image, np.float32) + rng.normal(0, 6, size=(height, width, 3))
        images[f"scene {index}"] = np.clip(pixels, 0, 255).astype(np.uint8)
    return Photos(images, f"SYNTHETIC photo-like images (generated here, {width}x{height})", True)


def load_photos() -> tuple[Photos, str | None]:
    """scikit-image's photos, or synthetic ones with a note saying so."""
    photos = skimage_photos()
    if photos is not None:
        return photos, None
    note = "scikit-image is not installed: SYNTHETIC photo-like images instead (pip install scikit-image)"
    return synthetic_photos(), note


def resize_to(image: np.ndarray, size: tuple[int, int] | int) -> tuple[np.ndarray, float]:
    """`image` resized (Lanczos) to shorter side `size`, or to cover `(width, height)` then centre-cropped to
    it; also the scale factor (> 1: the photo was upscaled to reach the size)."""
    from PIL import Image

    pil = Image.fromarray(image)
    width, height = pil.size
    target_w, target_h = size if isinstance(size, tuple) else (size, size)
    factor = max(target_w / width, target_h / height) if isinstance(size, tuple) else size / min(width, height)
    new_w, new_h = max(target_w, round(width * factor)), max(target_h, round(height * factor))
    pil = pil.resize((new_w, new_h), Image.LANCZOS)
    if isinstance(size, tuple):
        left, top = (new_w - target_w) // 2, (new_h - target_h) // 2
        pil = pil.crop((left, top, left + target_w, top + target_h))
    return np.asarray(pil), factor


def photo_jpegs(photos: Photos, size: tuple[int, int] | int, num_images: int) -> tuple[JpegSet, list[str]]:
    """`num_images` JPEGs (quality 90) of the photos at `size`, cycling through them; and the names of those
    that had to be upscaled."""
    from PIL import Image

    encoded, upscaled = [], []
    for name, image in photos.images.items():
        pixels, factor = resize_to(image, size)
        if factor > 1:
            upscaled.append(name)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=PHOTO_QUALITY)
        encoded.append((name, buffer.getvalue()))
    names = [name for name, _ in encoded]
    examples = []
    for index in range(num_images):
        name, data = encoded[index % len(encoded)]
        examples.append({"image": data, "caption": caption_for(name), "label": names.index(name),
                         "key": f"{name}/{size_label(size)}/{index:05d}.jpg"})
    origin = f"{photos.origin}, JPEG quality {PHOTO_QUALITY} at {size_label(size)}"
    return JpegSet(examples, origin, photos.synthetic, names), upscaled


# ---------------------------------------------------------------------------------------------------------
# Measurements


def measure_preprocess(examples: Sequence[RawExample], preprocess: Callable[..., Any], *, seed: int = 0,
                       warmup: int = 16) -> dict[str, float]:
    """Per-example preprocessing in this thread: images per CPU-second (per core) and per wall second.

    CPU time (`time.thread_time`) makes the per-core rate independent of other processes on the machine;
    the wall rate shows what was actually had. Each example gets its own seeded rng, as in Grain.
    """
    from jclip.data import robust

    for index in range(min(warmup, len(examples))):  # tokenizer tables, PIL plugins
        preprocess(examples[index], np.random.default_rng(index))
    skipped = 0
    wall, cpu = time.perf_counter(), time.thread_time()
    for index, example in enumerate(examples):
        if isinstance(preprocess(example, np.random.default_rng((seed, index))), robust.Skipped):
            skipped += 1
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    count = len(examples)
    return {"images": count, "skipped": skipped, "wall_seconds": wall, "cpu_seconds": cpu,
            "images_per_cpu_second": count / max(cpu, 1e-9), "images_per_wall_second": count / max(wall, 1e-9)}


def measure_batches(iterator: Iterator[dict[str, np.ndarray]], num_batches: int, *, warmup: int = 2) -> dict[str, float]:
    """Delivery of a batch iterator alone, in examples/s, after `warmup` batches (thread/worker start-up)."""
    started = time.perf_counter()
    for _ in range(warmup):
        next(iterator)
    first = time.perf_counter() - started
    examples = 0
    started = time.perf_counter()
    for _ in range(num_batches):
        examples += len(next(iterator)["images"])
    seconds = time.perf_counter() - started
    return {"batches": num_batches, "examples": examples, "seconds": seconds, "warmup_seconds": first,
            "examples_per_second": examples / max(seconds, 1e-9)}


def measure_jpeg_pipeline(jpegs: JpegSet, data_config, model_config, *, num_batches: int,
                          batch_size: int | None = None, seed: int = 0) -> dict[str, float]:
    """The full Grain training pipeline over the in-memory JPEGs with the config's threads/workers."""
    from jclip.data import pipeline
    from jclip.data.configured import ConfiguredData

    data = ConfiguredData(data_config, model_config)
    batch = min(int(batch_size or data_config.batch_size), len(jpegs.examples))
    dataset = pipeline.training_dataset(
        [(InMemorySource(jpegs.examples), 1.0, seed)], data.train_preprocess(), global_batch_size=batch,
        shard=pipeline.HostShard(0, 1), num_workers=data.num_workers(pipeline.HostShard(0, 1)),
        num_threads=int(data_config.num_threads), prefetch_buffer_size=int(data_config.prefetch),
        max_consecutive_bad=int(data_config.max_consecutive_bad),
    )
    iterator = iter(dataset)
    try:
        result = measure_batches(iterator, num_batches)
    finally:
        if hasattr(iterator, "close"):  # stops Grain worker processes
            iterator.close()
    result["batch_size"] = batch
    return result


def image_path(data) -> Callable[[RawExample, Any], Any]:
    """`decode_image|crop_image` of `data`'s op context (its image size, crop and `jpeg_draft`): raw example
    -> example with the cropped PIL image, or a `Skipped` marker."""
    from jclip.data import ops, robust

    chain = ops.make_ops("decode_image|crop_image", data.op_context)

    def run(example: RawExample, rng: Any) -> Any:
        current = dict(example)
        try:
            for op in chain:
                current = op(current, rng)
        except robust.BadExample as bad:
            return robust.Skipped(bad.reason, None, bad.detail)
        return current

    return run


def cropped_pixels(examples: Sequence[RawExample], data) -> list[np.ndarray]:
    """The uint8 crops (before normalising) of `examples` through `data`'s decode and centre crop (no rng)."""
    path = image_path(data)
    return [np.asarray(path(example, None)["image"]) for example in examples]


def pixel_difference(reference: Sequence[np.ndarray], other: Sequence[np.ndarray]) -> dict[str, float]:
    """Mean and max absolute difference (0-255 units) over all pixels and channels, and the share of values
    more than 10 apart."""
    diffs = np.concatenate([np.abs(a.astype(np.int16) - b.astype(np.int16)).ravel() for a, b in zip(reference, other)])
    return {"mean_abs": float(diffs.mean()), "max_abs": int(diffs.max()), "share_over_10": float(np.mean(diffs > 10))}


def pixel_sizes(examples: Sequence[RawExample]) -> list[str]:
    """The distinct width x height of the examples' images (headers only), in order."""
    from PIL import Image

    sizes = ["{}x{}".format(*Image.open(io.BytesIO(example["image"])).size) for example in examples]
    return list(dict.fromkeys(sizes))


def sizes_benchmark(config, photos: Photos, sizes: Sequence[tuple[int, int] | int], *, num_images: int,
                    num_batches: int, seed: int = 0) -> dict[str, Any]:
    """Part 3: per size, exact vs draft decode + resize/crop and whole preprocessing per core, the draft's pixel
    difference (centre crop), and the Grain pipeline (draft, the config's threads/workers)."""
    from jclip.data import pipeline
    from jclip.data.configured import ConfiguredData

    modes = {}
    for draft in (False, True):
        data_config = config.data.copy_and_resolve_references()
        data_config.jpeg_draft = draft
        modes["draft" if draft else "exact"] = (data_config, ConfiguredData(data_config, config.model))
    rows = []
    for size in sizes:
        jpegs, upscaled = photo_jpegs(photos, size, num_images)
        distinct = jpegs.examples[:len(photos.images)]
        row: dict[str, Any] = {"size": size_label(size), "input_sizes": pixel_sizes(distinct), "upscaled": upscaled}
        for mode, (_, data) in modes.items():
            row[f"{mode}_decode_crop"] = measure_preprocess(jpegs.examples, image_path(data), seed=seed)
            row[f"{mode}_preprocess"] = measure_preprocess(jpegs.examples, data.train_preprocess(), seed=seed)
        row["pixel_difference"] = pixel_difference(cropped_pixels(distinct, modes["exact"][1]),
                                                   cropped_pixels(distinct, modes["draft"][1]))
        data_config, data = modes["draft"]
        row["pipeline"] = measure_jpeg_pipeline(jpegs, data_config, config.model, num_batches=num_batches, seed=seed)
        rows.append(row)
    data_config, data = modes["draft"]
    return {"source": photos.origin, "synthetic": photos.synthetic, "photos": list(photos.images),
            "num_images": num_images, "image_size": data.image_size,
            "random_crop_scale": None if data_config.random_crop_scale is None else list(data_config.random_crop_scale),
            "num_threads": int(data_config.num_threads), "num_workers_setting": str(data_config.num_workers),
            "num_workers": data.num_workers(pipeline.HostShard(0, 1)), "rows": rows}


def random_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the config's shapes and dtypes (normalised-looking images, token ids ending in the EOT id)."""
    rng = np.random.default_rng(seed)
    batch = int(config.data.batch_size)
    size = int(config.model.vision.image_size)
    length = int(config.model.text.context_length)
    vocab = int(config.model.text.vocab_size)
    token_ids = rng.integers(1, vocab - 1, size=(batch, length)).astype(np.int32)
    token_ids[:, -1] = vocab - 1  # the end-of-text token is the largest id (EOT pooling)
    return {"images": rng.normal(size=(batch, size, size, 3)).astype(np.float32), "token_ids": token_ids}


@dataclasses.dataclass
class CompiledStep:
    """The config's jitted train step on the local devices, its state, and how long compiling took."""

    step: Callable
    state: Any
    mesh: Any
    compile_seconds: float

    def run(self, host_batch: dict[str, np.ndarray]) -> Any:
        """One step on a host batch (assembled into global arrays as in the train loop); returns metrics."""
        from jclip import parallel

        self.state, metrics = self.step(self.state, parallel.host_batch_to_global(host_batch, self.mesh))
        return metrics


def compile_step(config) -> CompiledStep:
    """TrainSetup + compile_train_step for `config` on all local devices, compiled on a random batch."""
    import jax

    from jclip import parallel
    from jclip.build import TrainSetup
    from jclip.config_validation import validate_config
    from jclip.step import compile_train_step

    mesh = parallel.make_mesh(dict(config.mesh))
    validate_config(config, mesh)
    setup = TrainSetup.create(config, mesh)
    started = time.perf_counter()
    batch = parallel.host_batch_to_global(random_batch(config), mesh)
    compiled = CompiledStep(compile_train_step(setup, batch), setup.init_state(), mesh, 0.0)
    jax.block_until_ready(compiled.run(random_batch(config)))
    compiled.compile_seconds = time.perf_counter() - started
    return compiled


def measure_step(compiled: CompiledStep, config, steps: int, *, warmup: int = 2) -> dict[str, float]:
    """The step's consumption alone in examples/s: `steps` steps on a fixed random batch, blocked at the end.

    Steps are dispatched back to back as in the train loop (no per-step block), so this is the throughput.
    """
    import jax

    host_batch = random_batch(config, seed=1)
    for _ in range(warmup):
        metrics = compiled.run(host_batch)
    jax.block_until_ready(metrics)
    started = time.perf_counter()
    for _ in range(steps):
        metrics = compiled.run(host_batch)
    jax.block_until_ready((metrics, compiled.state))
    seconds = time.perf_counter() - started
    examples = steps * len(host_batch["images"])
    return {"steps": steps, "examples": examples, "seconds": seconds, "seconds_per_step": seconds / steps,
            "examples_per_second": examples / max(seconds, 1e-9)}


def measure_together(compiled: CompiledStep, iterator: Iterator[dict[str, np.ndarray]], steps: int,
                     *, warmup: int = 1) -> dict[str, float]:
    """Pull a batch, run a step (skip counters and example keys popped as in `jclip.train.run`), `steps` times:
    examples/s."""
    import jax

    from jclip.data import robust

    counter = robust.SkipCounter()

    def next_batch():
        batch = counter.update(next(iterator))
        robust.pop_example_keys(batch)
        return batch

    for _ in range(warmup):  # a real batch once, so a dtype difference would recompile here, not in the timing
        jax.block_until_ready(compiled.run(next_batch()))
    examples = 0
    started = time.perf_counter()
    for _ in range(steps):
        host_batch = next_batch()
        examples += len(host_batch["images"])
        metrics = compiled.run(host_batch)
    jax.block_until_ready((metrics, compiled.state))
    seconds = time.perf_counter() - started
    return {"steps": steps, "examples": examples, "seconds": seconds, "seconds_per_step": seconds / steps,
            "examples_per_second": examples / max(seconds, 1e-9)}


def source_examples(data, split: str, limit: int) -> list[RawExample] | None:
    """Up to `limit` raw examples of the config's own source (evenly spaced), or None for streams/mixtures."""
    from jclip.data.configured import RANDOM_ACCESS_KINDS, SourceSpec

    if data.config.get("mixture") or SourceSpec.parse(data.config.source).kind not in RANDOM_ACCESS_KINDS:
        return None
    source = data.source(split)
    indices = np.linspace(0, len(source) - 1, num=min(limit, len(source))).astype(int)
    return [source[int(i)] for i in indices]


def cpu_info() -> dict[str, int | None]:
    """CPUs of the machine and those this process may run on."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"cpu_count": os.cpu_count(), "usable_cpus": usable}


def ratio(pipeline_rate: float, step_rate: float) -> float:
    """Pipeline delivery / step consumption: > 1 means the step never waits for data."""
    return pipeline_rate / step_rate


# ---------------------------------------------------------------------------------------------------------
# The two parts, as dictionaries of numbers


def jpeg_benchmark(config, jpegs: JpegSet, *, random_crop_scale: Sequence[float] | None, num_batches: int,
                   seed: int = 0) -> dict[str, Any]:
    """Part 1: per-core preprocessing and Grain pipeline rates on in-memory JPEGs at the config's image size."""
    from jclip.data import pipeline
    from jclip.data.configured import ConfiguredData

    data_config = config.data.copy_and_resolve_references()
    if random_crop_scale is not None:
        data_config.random_crop_scale = tuple(float(s) for s in random_crop_scale) or None
    data = ConfiguredData(data_config, config.model)
    per_core = measure_preprocess(jpegs.examples, data.train_preprocess(), seed=seed)
    grain_rate = measure_jpeg_pipeline(jpegs, data_config, config.model, num_batches=num_batches, seed=seed)
    return {
        "source": jpegs.origin, "synthetic": jpegs.synthetic, "num_images": len(jpegs.examples),
        "input_size": jpegs.pixel_size(), "image_size": data.image_size, "context_length": data.context_length,
        "random_crop_scale": None if data_config.random_crop_scale is None else list(data_config.random_crop_scale),
        "num_threads": int(data_config.num_threads), "num_workers": data.num_workers(pipeline.HostShard(0, 1)),
        "preprocess": per_core, "pipeline": grain_rate,
    }


def config_benchmark(config, *, steps: int, num_batches: int, source_images: int) -> dict[str, Any]:
    """Part 2: step consumption vs. delivery of the config's own pipeline, alone and together."""
    import jax

    from jclip.data import pipeline
    from jclip.data.configured import ConfiguredData

    data = ConfiguredData(config.data, config.model)
    started = time.perf_counter()
    iterator = iter(data.training_dataset(seed=int(config.seed), shard=pipeline.HostShard.current()))
    delivery = measure_batches(iterator, num_batches)
    delivery["open_seconds"] = time.perf_counter() - started - delivery["seconds"] - delivery["warmup_seconds"]
    raw = source_examples(data, str(config.data.train_split), source_images) if source_images > 0 else None
    per_core = measure_preprocess(raw, data.train_preprocess()) if raw else None

    compiled = compile_step(config)
    step = measure_step(compiled, config, steps)
    together = measure_together(compiled, iterator, steps)
    devices = jax.local_devices()
    result = {
        "source": str(config.data.source), "batch_size": int(config.data.batch_size),
        "image_size": int(config.model.vision.image_size), "context_length": int(config.model.text.context_length),
        "num_threads": int(config.data.num_threads), "num_workers": data.num_workers(pipeline.HostShard.current()),
        "devices": f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform})",
        "compile_seconds": compiled.compile_seconds,
        "step": step, "pipeline": delivery, "together": together, "source_preprocess": per_core,
        "ratio": ratio(delivery["examples_per_second"], step["examples_per_second"]),
    }
    if per_core:
        result["cores_to_feed_step"] = step["examples_per_second"] / per_core["images_per_cpu_second"]
    return result


# ---------------------------------------------------------------------------------------------------------
# Report


def _rows(title: str, rows: Sequence[tuple[str, str]]) -> list[str]:
    width = max(len(label) for label, _ in rows)
    return [title] + [f"  {label:<{width}}  {value}" for label, value in rows]


def format_report(results: dict[str, Any]) -> str:
    """The human-readable table of `results` (what `run_benchmark` returns)."""
    cpus = results["cpus"]
    lines = [f"jclip input-pipeline benchmark  (CPUs: os.cpu_count()={cpus['cpu_count']}, "
             f"usable sched_getaffinity={cpus['usable_cpus']})"]
    lines += [f"NOTE: {note}" for note in results.get("notes", [])]
    if "jpegs" in results:
        j = results["jpegs"]
        pre, pipe = j["preprocess"], j["pipeline"]
        crop = "none (resize + centre crop)" if j["random_crop_scale"] is None else f"random-resized, scale {j['random_crop_scale']}"
        lines += [""] + _rows(
            "[1] decode + augment + tokenise on " + ("SYNTHETIC JPEGs" if j["synthetic"] else "real JPEGs"), [
                ("images", f"{j['num_images']} x {j['input_size']} px from {j['source']} (in memory)"),
                ("output", f"{j['image_size']}x{j['image_size']} px, {j['context_length']} tokens, crop {crop}"),
                ("preprocess, 1 thread", f"{pre['images_per_cpu_second']:9.0f} images/s per CPU core   "
                                         f"({pre['images_per_wall_second']:.0f} per wall second; "
                                         f"{pre['skipped']} skipped)"),
                ("Grain pipeline", f"{pipe['examples_per_second']:9.0f} examples/s   (num_threads={j['num_threads']}, "
                                   f"num_workers={j['num_workers']}, batch {pipe['batch_size']}, "
                                   f"{pipe['batches']} batches)"),
            ])
    if "config" in results:
        c = results["config"]
        step, pipe, both = c["step"], c["pipeline"], c["together"]
        rows = [
            ("config", f"{results['config_name']}: batch {c['batch_size']}, image {c['image_size']} px, "
                       f"{c['context_length']} tokens, data {c['source']}"),
            ("devices", f"{c['devices']}; step compiled in {c['compile_seconds']:.1f} s"),
            ("train step alone", f"{step['examples_per_second']:9.0f} examples/s   "
                                 f"({step['seconds_per_step'] * 1e3:.0f} ms/step, {step['steps']} steps)"),
            ("pipeline alone", f"{pipe['examples_per_second']:9.0f} examples/s   (num_threads={c['num_threads']}, "
                               f"num_workers={c['num_workers']}, {pipe['batches']} batches; "
                               f"opened in {pipe['open_seconds']:.1f} s)"),
            ("ratio pipeline/step", f"{c['ratio']:9.2f}        "
                                    + ("(> 1: the step never waits for data)" if c["ratio"] > 1
                                       else "(< 1: the step is starved; add CPU, workers or threads)")),
            ("together (pull, step)", f"{both['examples_per_second']:9.0f} examples/s   "
                                      f"({both['seconds_per_step'] * 1e3:.0f} ms/step, sharing the CPU)"),
        ]
        if c.get("source_preprocess"):
            sp = c["source_preprocess"]
            rows.insert(4, ("source preprocess", f"{sp['images_per_cpu_second']:9.0f} images/s per CPU core   "
                                                 f"({sp['images']} examples of {c['source']})"))
            rows.append(("cores to feed step", f"{c['cores_to_feed_step']:9.2f}        "
                                               "(step rate / per-core preprocessing rate)"))
        lines += [""] + _rows("[2] pipeline vs. train step", rows)
    if "sizes" in results:
        lines += [""] + format_sizes(results["sizes"])
    return "\n".join(lines)


def format_sizes(sizes: dict[str, Any]) -> list[str]:
    """Part 3 as a table: one row per input size, exact vs draft."""
    scale = sizes["random_crop_scale"]
    crop = "resize + centre crop" if scale is None else f"random-resized, scale {scale}"
    kind = "SYNTHETIC photo-like JPEGs" if sizes["synthetic"] else "real photos"
    lines = [f"[3] JPEG decode to {sizes['image_size']} px by input size, exact vs draft (data.jpeg_draft), on {kind}",
             f"  {len(sizes['photos'])} photos from {sizes['source']}: {', '.join(sizes['photos'])}; "
             f"{sizes['num_images']} images per timing; crop {crop}",
             "  input: N = shorter side N, WxH = exactly that; images/s per CPU core (thread CPU time); "
             "pixel difference: draft vs exact, centre crop, uint8 0-255",
             f"  {'input':>8} | {'decode+crop exact':>17} {'draft':>6} {'x':>5} | "
             f"{'preprocess exact':>16} {'draft':>6} | {'diff mean':>9} {'max':>4} | "
             f"{'Grain ex/s':>10}"]
    for row in sizes["rows"]:
        exact, draft = (row[f"{mode}_decode_crop"]["images_per_cpu_second"] for mode in ("exact", "draft"))
        exact_all, draft_all = (row[f"{mode}_preprocess"]["images_per_cpu_second"] for mode in ("exact", "draft"))
        diff = row["pixel_difference"]
        lines.append(
            f"  {row['size']:>8} | {exact:17.0f} {draft:6.0f} {draft / exact:5.2f} | {exact_all:16.0f} {draft_all:6.0f} | "
            f"{diff['mean_abs']:9.2f} {diff['max_abs']:4d} | {row['pipeline']['examples_per_second']:10.0f}")
    upscaled = {row["size"]: row["upscaled"] for row in sizes["rows"] if row["upscaled"]}
    if upscaled:
        lines.append("  upscaled to reach the size (smoother than a real photo of it): "
                     + "; ".join(f"{size}: {', '.join(names)}" for size, names in upscaled.items()))
    lines.append(f"  Grain pipeline: draft, num_threads={sizes['num_threads']}, "
                 f"num_workers={sizes['num_workers']} (setting {sizes['num_workers_setting']}), "
                 f"batch {sizes['rows'][0]['pipeline']['batch_size'] if sizes['rows'] else '-'}")
    return lines


def run_benchmark(config, *, config_name: str = "config", jpegs_path: str | None = None, num_images: int = 2000,
                  random_crop_scale: Sequence[float] | None = None, pipeline_batches: int = 20, steps: int = 10,
                  source_images: int = 500, synthetic_size: int = 32, parts: Sequence[str] = ("jpegs", "config"),
                  sizes: Sequence[tuple[int, int] | int] = (256, 512, (640, 480)), photo_images: int = 70,
                  ) -> dict[str, Any]:
    """The parts in `parts` (jpegs, config, sizes) as one dictionary of numbers, the JSON that `--json` writes."""
    results: dict[str, Any] = {"cpus": cpu_info(), "config_name": config_name, "notes": []}
    if "jpegs" in parts:
        jpegs, note = load_jpegs(jpegs_path, num_images, synthetic_size=synthetic_size)
        if note:
            results["notes"].append(note)
        results["jpegs"] = jpeg_benchmark(config, jpegs, random_crop_scale=random_crop_scale,
                                          num_batches=pipeline_batches)
    if "config" in parts:
        results["config"] = config_benchmark(config, steps=steps, num_batches=pipeline_batches,
                                             source_images=source_images)
    if "sizes" in parts:
        photos, note = load_photos()
        if note:
            results["notes"].append(note)
        results["sizes"] = sizes_benchmark(config, photos, sizes, num_images=photo_images,
                                           num_batches=pipeline_batches)
    return results


def _finite_numbers(value: Any) -> Any:
    """JSON-safe copy (non-finite floats become strings)."""
    if isinstance(value, dict):
        return {k: _finite_numbers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_numbers(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _config_name(flag) -> str:
    """The config file (relative to the repository when inside it) with its overrides, for the report."""
    from ml_collections import config_flags

    name = config_flags.get_config_filename(flag)
    try:
        name = str(pathlib.Path(name).resolve().relative_to(REPO_ROOT))
    except ValueError:
        pass
    overrides = config_flags.get_override_values(flag)
    return name + "".join(f" --config.{key}={value}" for key, value in sorted(overrides.items()))


def main(argv: list[str]) -> None:
    from absl import app, flags

    from jclip.host_memory import keep_freed_memory

    keep_freed_memory()  # as jclip.main does, before the JAX backend starts
    from absl import logging as absl_logging

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    values = flags.FLAGS
    crop = values.random_crop_scale
    if crop is not None and len(crop) not in (0, 2):
        raise app.UsageError("--random_crop_scale takes two numbers, e.g. 0.9,1.0 (or '' for none)")
    unknown = sorted(set(values.parts) - set(PARTS))
    if unknown:
        raise app.UsageError(f"unknown --parts {unknown}; the parts are {', '.join(PARTS)}")
    try:
        sizes = [parse_size(size) for size in values.sizes]
    except ValueError as error:
        raise app.UsageError(f"--sizes: {error}") from None
    results = run_benchmark(
        values.config, config_name=_config_name(values["config"]),
        jpegs_path=values.jpegs, num_images=values.num_images,
        random_crop_scale=None if crop is None else [float(s) for s in crop],
        pipeline_batches=values.pipeline_batches, steps=values.steps, source_images=values.source_images,
        synthetic_size=values.synthetic_size, parts=values.parts, sizes=sizes, photo_images=values.photo_images,
    )
    print(format_report(results), flush=True)
    if values.json:
        path = pathlib.Path(values.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_finite_numbers(results), indent=2))
        print(f"\nwrote {path}")


def _define_flags() -> None:
    """Flags exist only when run as a program, so importing this module (tests) defines none."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", str(pathlib.Path(configs.__file__).parent / "clip.py"),
                                    "Config file, e.g. configs/clip.py:model=B/32; --config.x=y overrides.",
                                    lock_config=True)
    flags.DEFINE_string("jpegs", None, f"tar(.gz) or folder of <class>/<file>.jpg (default {DEFAULT_JPEGS}).")
    flags.DEFINE_integer("num_images", 2000, "JPEGs read into memory for part 1.")
    flags.DEFINE_list("random_crop_scale", None, "Part 1: random-resized crop area range, e.g. 0.9,1.0; "
                      "default the config's data.random_crop_scale; '' for none.")
    flags.DEFINE_integer("pipeline_batches", 20, "Batches timed per pipeline measurement (after 2 warm-up).")
    flags.DEFINE_integer("steps", 10, "Train steps timed (alone, and together with the pipeline).")
    flags.DEFINE_integer("source_images", 500, "Examples of the config's source for its per-core rate (0: skip).")
    flags.DEFINE_integer("synthetic_size", 32, "Side of the generated JPEGs when no real ones are found.")
    flags.DEFINE_list("parts", ["jpegs", "config"], f"Which parts to run: {', '.join(PARTS)}.")
    flags.DEFINE_list("sizes", ["256", "512", "640x480"], "Part sizes: photo sizes, N (shorter side) or WxH.")
    flags.DEFINE_integer("photo_images", 70, "Part sizes: JPEGs timed per size and mode (the photos, cycled).")
    flags.DEFINE_string("json", None, "Also write the numbers to this JSON file.")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
