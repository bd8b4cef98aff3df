"""Compositional understanding: does the true caption outscore its hard negatives? (SugarCrepe, ARO, ...)

Formats (`config.evals.<name>.format`), read by `jclip.evals.compositional_data`:

| format | `path` | images |
|---|---|---|
| `sugarcrepe` | folder of `<category>.json` (`{id: {filename, caption, negative_caption}}`) | `image_root` (COCO val2017) |
| `aro_relation` | `visual_genome_relation.json` | `image_root` (ARO's `images/`), cropped to each box |
| `aro_attribution` | `visual_genome_attribution.json` | as above |
| `pairs` | JSONL `{image, positive, negatives, category?, bbox?}` (e.g. COCO/Flickr-Order negatives) | `image_root` |
| `embedded` | none: the embedded dataset's probes (`split`, `source`) | the dataset's images |

An item is correct when its positive caption's similarity to the image is strictly above every
negative's (ties are wrong); accuracy is reported per category, micro (over items) and macro (mean over
categories with at least `min_count` items; ARO's attribution uses 25).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
import numpy as np

from jclip.data.sources import scenes
from jclip.evals import base, common, compositional_data

FORMATS = ("sugarcrepe", "aro_relation", "aro_attribution", "pairs", "embedded")


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """Items over a random-access image source: item i pairs image `image_index[i]` with its captions.

    Only the first `num_images` images of the source are used (and embedded).
    """

    images: Any
    num_images: int
    image_index: np.ndarray
    positives: tuple[str, ...]
    negatives: tuple[tuple[str, ...], ...]
    categories: tuple[str, ...]


def from_items(items: list[compositional_data.CompositionalItem], image_root: str | None) -> Benchmark:
    images = compositional_data.CompositionalImages(items, image_root)
    return Benchmark(
        images=images,
        num_images=len(images),
        image_index=np.asarray(images.item_image_index),
        positives=tuple(item.positive for item in items),
        negatives=tuple(tuple(item.negatives) for item in items),
        categories=tuple(item.category for item in items),
    )


def from_embedded(source: Any, limit: int | None) -> Benchmark:
    """The embedded dataset's probes: each image's true probe against each kind of hard negative."""
    count = len(source) if limit is None else min(limit, len(source))
    image_index, positives, negatives, categories = [], [], [], []
    for index in range(count):
        example = source[index]
        for kind, negative in zip(scenes.NEGATIVE_KINDS, example["negative_captions"]):
            image_index.append(index)
            positives.append(_text(example["caption"]))
            negatives.append((_text(negative),))
            categories.append(kind)
    return Benchmark(source, count, np.asarray(image_index), tuple(positives), tuple(negatives), tuple(categories))


def _text(value: Any) -> str:
    return bytes(value).decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


class CompositionalEvaluator(base.Evaluator):
    """Per-category accuracy of preferring each image's true caption over its hard negatives."""

    OPTIONS = ("format", "path", "image_root", "categories", "min_count", "split", "source")

    def __init__(self, name: str, config: ml_collections.ConfigDict, data: Any):
        super().__init__(name, config)
        self.format = str(config.get("format") or "embedded")
        if self.format not in FORMATS:
            raise ValueError(f"evals.{name}.format must be one of {FORMATS}, got {self.format!r}")
        self.min_count = int(config.get("min_count") or 0)
        if self.format == "embedded":
            source = data.source(
                config.get("split", "validation"), config.get("source"), caption_field="probe_caption",
                extra_fields=(("negative_captions", "negative_captions"),),
            )
            self.benchmark = from_embedded(source, self.limit)
        else:
            if not config.get("path"):
                raise ValueError(f"evals.{name}: format {self.format!r} needs `path` (see jclip/evals/compositional.py)")
            options = {}
            if self.format == "sugarcrepe" and config.get("categories"):
                options["categories"] = tuple(config.categories)
            items = compositional_data.read_compositional(self.format, config.path, **options)
            if self.limit is not None:
                items = items[: self.limit]
            self.benchmark = from_items(items, config.get("image_root"))
        self.preprocess = common.ImagesOnly(data.eval_preprocess())
        texts = sorted(set(self.benchmark.positives) | {n for group in self.benchmark.negatives for n in group})
        self.texts = texts
        self._text_row = {text: row for row, text in enumerate(texts)}
        self._token_ids: np.ndarray | None = None

    def scores(self, params: Any, encoders: common.Encoders) -> tuple[np.ndarray, np.ndarray]:
        """(positive score [items], negative scores [items, max negatives] padded with -inf)."""
        bench = self.benchmark
        images = common.embed_split(
            params, encoders, bench.images, self.preprocess, batch_size=self.batch_size, limit=bench.num_images
        )
        if self._token_ids is None:
            self._token_ids = encoders.tokenizer.batch(self.texts)
        texts = common.embed_token_ids(params, encoders, self._token_ids, batch_size=self.batch_size)
        image_rows = images["image_embeddings"].astype(np.float64)[bench.image_index]
        texts = texts.astype(np.float64)
        positive_rows = np.asarray([self._text_row[t] for t in bench.positives])
        positive_scores = np.einsum("id,id->i", image_rows, texts[positive_rows])
        width = max(len(group) for group in bench.negatives)
        negative_scores = np.full((len(bench.negatives), width), -np.inf)
        for item, group in enumerate(bench.negatives):
            rows = [self._text_row[t] for t in group]
            negative_scores[item, : len(rows)] = texts[rows] @ image_rows[item]
        return positive_scores, negative_scores

    def run(self, params: Any, encoders: common.Encoders) -> dict[str, float]:
        bench = self.benchmark
        positive_scores, negative_scores = self.scores(params, encoders)
        results = compositional_data.compositional_accuracy(
            positive_scores, negative_scores, bench.categories, min_count=self.min_count
        )
        results["num_items"] = float(len(bench.positives))
        return results
