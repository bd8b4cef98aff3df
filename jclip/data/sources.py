"""The data a config names: sources by spec, weighted mixtures, class names, and the preprocessing.

A source spec is a string `<kind>[:<argument>]`:

| spec | what it reads |
|---|---|
| `embedded` | the procedurally generated `jclip_scenes/<data.embedded_config>` (built locally on first use) |
| `tfds:NAME` | any TFDS dataset prepared as ArrayRecord, e.g. `tfds:coco_captions/2017`, `tfds:cifar10` |
| `wds:SHARDS` | WebDataset tar shards (img2dataset output), e.g. `wds:/data/cc3m/{00000..00331}.tar`; training only |
| `arrayrecord:DIR` | tar shards converted by `python -m jclip.data.convert_webdataset` (random access, exact shuffle) |
| `folder:CAPTIONS_FILE` | images with a JSONL or CSV captions file (paths relative to the file's folder) |
| `classfolders:ROOT` | `ROOT/<class>/<image>` folders (labels, no captions: zero-shot evaluation) |

Every source yields *raw examples* `{"image", "caption", "label"?, "key"}`; preprocessing (decode, crop,
tokenise) comes after, in `jclip.data.robust.SafePreprocessor`, which skips and counts bad examples.
`data.mixture` (name -> {source, weight}) trains on several sources at once, weighted.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import grain
import ml_collections

from jclip.data import pipeline, robust, transforms

SOURCE_KINDS = ("embedded", "tfds", "wds", "arrayrecord", "folder", "classfolders")
RANDOM_ACCESS_KINDS = ("embedded", "tfds", "arrayrecord", "folder", "classfolders")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    kind: str
    argument: str | None

    @classmethod
    def parse(cls, spec: str) -> "SourceSpec":
        kind, _, argument = str(spec).partition(":")
        if kind not in SOURCE_KINDS:
            raise ValueError(f"unknown data source {spec!r}; a source is one of {[k + ':...' for k in SOURCE_KINDS]}")
        if kind != "embedded" and not argument:
            raise ValueError(f"data source {spec!r} needs an argument after '{kind}:'")
        return cls(kind, argument or None)


def validate_data_config(data_config: ml_collections.ConfigDict) -> None:
    """Raises ValueError for an unknown source kind or a bad mixture, before anything is read."""
    SourceSpec.parse(data_config.source)
    mixture = data_config.get("mixture") or {}
    for name, entry in mixture.items():
        if "source" not in entry:
            raise ValueError(f"data.mixture.{name} needs a `source`")
        SourceSpec.parse(entry["source"])
        weight = float(entry.get("weight", 1.0))
        if not weight > 0:
            raise ValueError(f"data.mixture.{name}.weight must be positive, got {weight}")


class ConfiguredData:
    """`config.data` made concrete: raw sources by split, the training stream, class names, preprocessors."""

    def __init__(self, data_config: ml_collections.ConfigDict, model_config: ml_collections.ConfigDict):
        validate_data_config(data_config)
        self.config = data_config
        self.image_size = int(model_config.vision.image_size)
        self.context_length = int(model_config.text.context_length)
        self.label_key = "label"

    # ----- sources ---------------------------------------------------------------------------------

    def _field(self, entry: Any, name: str) -> Any:
        return entry[name] if entry is not None and name in entry else self.config.get(name)

    def _random_access(self, spec: SourceSpec, split: str, entry: Any = None) -> Any:
        from jclip.data import folder, tfds_source, webdataset

        image_field = self._field(entry, "image_field")
        caption_field = self._field(entry, "caption_field")
        label_field = self._field(entry, "label_field")
        if spec.kind == "embedded":
            return tfds_source.TfdsSource(
                f"jclip_scenes/{self.config.embedded_config}", split, data_dir=self.config.data_dir,
                image_field=image_field, caption_field=caption_field, label_field=label_field or "label", download=True,
            )
        if spec.kind == "tfds":
            return tfds_source.TfdsSource(
                spec.argument, split, data_dir=self.config.data_dir, image_field=image_field,
                caption_field=caption_field, label_field=label_field, manual_dir=self.config.get("manual_dir"),
            )
        if spec.kind == "arrayrecord":
            return webdataset.ArrayRecordSource(spec.argument)
        if spec.kind == "folder":
            return folder.FolderSource(spec.argument, caption_field=caption_field or "caption", label_field=label_field)
        if spec.kind == "classfolders":
            return folder.folder_from_class_dirs(spec.argument)
        raise ValueError(
            f"data source {spec.kind}:{spec.argument} is a stream (training only); evaluation and class names "
            f"need a random-access source ({', '.join(RANDOM_ACCESS_KINDS)}); convert tar shards with "
            f"`python -m jclip.data.convert_webdataset`"
        )

    @functools.lru_cache(maxsize=None)
    def source(self, split: str, spec: str | None = None) -> Any:
        """The raw, random-access source of `split` of `spec` (default `data.source`); evaluations read this."""
        return self._random_access(SourceSpec.parse(spec or self.config.source), split)

    def class_names(self, split: str, spec: str | None = None) -> list[str]:
        """Zero-shot class names of a source: its ClassLabel names (or class folders)."""
        source = self.source(split, spec)
        names = source.class_names() if hasattr(source, "class_names") else None
        if names is None:
            raise ValueError(f"data source {spec or self.config.source!r} has no class names (no ClassLabel label field)")
        return list(names)

    def _components(self) -> list[tuple[str, SourceSpec, Any, float]]:
        mixture = self.config.get("mixture") or {}
        if not mixture:
            return [("main", SourceSpec.parse(self.config.source), None, 1.0)]
        return [
            (name, SourceSpec.parse(entry["source"]), entry, float(entry.get("weight", 1.0)))
            for name, entry in mixture.items()
        ]

    def prepare(self, splits: set[tuple[str, str | None]]) -> None:
        """Opens (and for the embedded dataset, builds) everything the run reads, failing early and clearly."""
        for _, spec, entry, _ in self._components():
            if spec.kind == "wds":
                from jclip.data import webdataset

                webdataset.expand_shards(spec.argument, allow_missing=bool(self.config.allow_missing_shards))
            else:
                self._random_access(spec, self._field(entry, "train_split"), entry)
        for split, spec in splits:
            self.source(split, spec)

    def training_dataset(self, *, seed: int, shard: pipeline.HostShard) -> grain.IterDataset:
        """The host's infinite training stream of preprocessed, batched examples (bad ones skipped, counted)."""
        from jclip.data import webdataset

        components = []
        for index, (_, spec, entry, weight) in enumerate(self._components()):
            component_seed = seed + 1000 * index
            if spec.kind == "wds":
                raw = webdataset.webdataset_training_dataset(
                    spec.argument, seed=component_seed, shard=shard,
                    shuffle_buffer=int(self.config.shuffle_buffer),
                    allow_missing=bool(self.config.allow_missing_shards),
                )
            else:
                raw = self._random_access(spec, self._field(entry, "train_split"), entry)
            components.append((raw, weight, component_seed))
        return pipeline.training_dataset(
            components,
            self.train_preprocess(),
            global_batch_size=int(self.config.batch_size),
            shard=shard,
            num_workers=int(self.config.num_workers),
            num_threads=int(self.config.num_threads),
            prefetch_buffer_size=int(self.config.prefetch),
            max_consecutive_bad=int(self.config.max_consecutive_bad),
        )

    # ----- preprocessing ----------------------------------------------------------------------------

    def _preprocessor(self, random_crop_scale, keep=()) -> transforms.ImageTextPreprocessor:
        return transforms.ImageTextPreprocessor(
            image_size=self.image_size,
            context_length=self.context_length,
            image_key="image",
            text_key="caption",
            random_crop_scale=None if random_crop_scale is None else tuple(random_crop_scale),
            keep=tuple(keep),
            tokenizer_spec=str(self.config.tokenizer),
        )

    def train_preprocess(self) -> robust.SafePreprocessor:
        return robust.SafePreprocessor(self._preprocessor(self.config.random_crop_scale))

    def eval_preprocess(self, keep: tuple[str, ...] = ()) -> transforms.ImageTextPreprocessor:
        return self._preprocessor(None, keep)
