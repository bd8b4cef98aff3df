"""The data a config names: sources by spec, weighted mixtures, class names, and the preprocessing.

A source spec is a string `<kind>[:<argument>]`:

| spec | what it reads |
|---|---|
| `embedded` | the procedurally generated `jclip_scenes/<data.embedded_config>` (built locally on first use) |
| `tfds:NAME` | any TFDS dataset prepared as ArrayRecord, e.g. `tfds:coco_captions/2017`, `tfds:cifar10` |
| `wds:SHARDS` | WebDataset tar shards (img2dataset output), e.g. `wds:/data/cc3m/{00000..00331}.tar`; training only |
| `arrayrecord:DIR` | tar shards converted by `python -m jclip.data.sources.convert_webdataset` (random access, exact shuffle) |
| `folder:CAPTIONS_FILE` | images with a JSONL or CSV captions file (paths relative to the file's folder) |
| `classfolders:ROOT` | `ROOT/<class>/<image>` folders (labels, no captions: zero-shot evaluation) |
| `docci:JSONLINES` | DOCCI's `docci_descriptions.jsonlines` (split by its `split` values; images in `images/` beside it) |

Every source (`jclip.data.sources`) yields *raw examples* `{"image", "caption", "label"?, "key"}`; training
preprocessing comes after: `data.preprocess`, a list of named ops (`jclip.data.ops`), which skip and count
bad examples. `data.guidance_features=DIR` is a shorthand that appends `guidance(dir=DIR)` to that list;
`data.hard_negatives=DIR` one that adds FSC-CLIP's hard-negative captions (`with_hard_negatives`);
`data.caption_rule=RULE` one that chooses between alt-text and dense captions (`with_caption_rule`) and
`data.recaptions=DIR` one that joins recaptions by key (`with_recaptions`), both for the improved-captions
method (Stone et al., arXiv 2412.15396). Evaluation preprocessing is fixed (`eval_preprocess`: centre crop;
the evaluators take the first caption). `data.mixture` (name -> {source, weight}) trains on several sources
at once, weighted; an entry may set its own `caption_rule` and `recaptions` (None: none for it), which
gives that component its own op list (every component's must produce the same batch fields).

Splits. TFDS sources (`embedded`, `tfds:`) read the named split with TFDS slicing. `folder:`,
`classfolders:` and `arrayrecord:` are one whole dataset: the split *name* selects nothing, and a slice
(`train[:90%]`, `train[90%:]`, `train[:45000]`) is taken over a fixed seeded permutation of the examples
(`jclip.data.sources.splits`, seed `SPLIT_SEED`), so class-sorted folders give mixed slices and `[:k]`/`[k:]` are
disjoint and cover everything. `docci:` selects the entries of the named split, sliced in file order.

Captions from labels. With `data.caption_templates` set (e.g. `("a photo of a {}.", "a blurry photo of a
{}.")`), every training component's examples get `caption` = the templates filled with the example's class
name (`jclip.data.sources.label_captions`; training samples one per visit); a caption the source already has is
replaced. A mixture entry may set its own `caption_templates` (None: keep its captions). A training source
without class names (no labels, or integer labels without names, or tar shards) fails at `prepare`.
Evaluation sources are never re-captioned.

Per-source fields. `ConfiguredData.source(split, spec, image_field=..., caption_field=..., label_field=...,
extra_fields=(("negative_captions", "negative_captions"),))` overrides `data.<field>` for that source only
(an evaluator reading the embedded dataset's `probe_caption`, say) and, for TFDS sources, adds further fields
to each raw example. `data.extra_fields` (or a mixture entry's) does the same for TFDS training sources:
`(("dense_caption", "dense_caption"),)` gives the embedded dataset's examples their dense caption for
`caption_rule`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import grain
import ml_collections

from jclip import models
from jclip.data import ops, pipeline
from jclip.data.ops import image as image_ops
from jclip.data.sources import label_captions

#: Today's training preprocessing: check and pick a caption (caption checks before the image is decoded),
#: decode, crop (random-resized with `data.random_crop_scale`, else centre), normalise, tokenize.
DEFAULT_PREPROCESS = "choose_caption|decode_image|crop_image|normalise_image|tokenize(field='caption', out='token_ids')"

SOURCE_KINDS = ("embedded", "tfds", "wds", "arrayrecord", "folder", "classfolders", "docci")
RANDOM_ACCESS_KINDS = ("embedded", "tfds", "arrayrecord", "folder", "classfolders", "docci")
#: Kinds without splits of their own: a split's slice is taken over a seeded permutation (jclip.data.sources.splits).
PERMUTED_SLICE_KINDS = ("arrayrecord", "folder", "classfolders")
#: The permutation's seed: fixed, so that a held-out slice does not move with the training seed.
SPLIT_SEED = 0


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
    ops.parse_ops(data_config.get("preprocess") or DEFAULT_PREPROCESS)
    if data_config.get("caption_templates") is not None:
        label_captions.check_templates(data_config.caption_templates)
    if data_config.get("hard_negatives"):
        from jclip.data.negative_pools import NegativePools

        try:
            NegativePools(data_config.hard_negatives)  # a missing or broken folder fails at start-up
        except (FileNotFoundError, ValueError) as error:
            raise ValueError(f"data.hard_negatives: {error}") from None
    _check_caption_settings("data", data_config)
    mixture = data_config.get("mixture") or {}
    for name, entry in mixture.items():
        if "source" not in entry:
            raise ValueError(f"data.mixture.{name} needs a `source`")
        SourceSpec.parse(entry["source"])
        if entry.get("caption_templates") is not None:
            label_captions.check_templates(entry["caption_templates"])
        _check_caption_settings(f"data.mixture.{name}", entry)
        weight = float(entry.get("weight", 1.0))
        if not weight > 0:
            raise ValueError(f"data.mixture.{name}.weight must be positive, got {weight}")


def _check_caption_settings(where: str, settings: Any) -> None:
    """`caption_rule` parses and the `recaptions` folder opens (a missing or broken one fails at start-up)."""
    from jclip.data.ops.captions import parse_caption_rule

    if settings.get("caption_rule"):
        try:
            parse_caption_rule(settings["caption_rule"])
        except ValueError as error:
            raise ValueError(f"{where}.caption_rule: {error}") from None
    if settings.get("recaptions"):
        from jclip.data.recaptions import Recaptions

        try:
            Recaptions(settings["recaptions"])
        except (FileNotFoundError, ValueError) as error:
            raise ValueError(f"{where}.recaptions: {error}") from None


def _extra_fields(value: Any) -> tuple[tuple[str, str], ...]:
    """`data.extra_fields` as (key, feature path) pairs: given as pairs or as a mapping."""
    if not value:
        return ()
    pairs = value.items() if hasattr(value, "items") else value
    return tuple((str(key), str(path)) for key, path in pairs)


class ConfiguredData:
    """`config.data` made concrete: raw sources by split, the training stream, class names, preprocessors."""

    def __init__(self, data_config: ml_collections.ConfigDict, model_config: ml_collections.ConfigDict):
        validate_data_config(data_config)
        self.config = data_config
        self.image_size = int(model_config.vision.image_size)
        self.context_length = int(model_config.text.context_length)
        self.tokenizer_spec = models.tokenizer_spec(model_config)  # the text tower's tokenizer
        self.label_key = "label"
        scale = data_config.get("random_crop_scale")
        self.op_context = ops.OpContext(
            image_size=self.image_size, context_length=self.context_length, tokenizer_spec=self.tokenizer_spec,
            training=True, random_crop_scale=None if scale is None else tuple(scale),
            jpeg_draft=bool(data_config.get("jpeg_draft", True)),
        )
        self.component_ops()  # an unknown op or a bad argument fails here, before anything is read

    # ----- sources ---------------------------------------------------------------------------------

    def _field(self, entry: Any, name: str) -> Any:
        return entry[name] if entry is not None and name in entry else self.config.get(name)

    def _random_access(self, spec: SourceSpec, split: str, entry: Any = None,
                       extra_fields: tuple[tuple[str, str], ...] = ()) -> Any:
        from jclip.data.sources import docci, folder, splits, tfds_source, webdataset

        image_field = self._field(entry, "image_field")
        caption_field = self._field(entry, "caption_field") or None  # "" given explicitly: no caption
        label_field = self._field(entry, "label_field")
        extras = dict(extra_fields)
        if extras and spec.kind not in ("embedded", "tfds"):
            raise ValueError(f"extra_fields {extras} need a TFDS source (embedded, tfds:...); "
                             f"{_spec_text(spec)} has only the raw example's own fields")
        if spec.kind == "embedded":
            return tfds_source.TfdsSource(
                f"jclip_scenes/{self.config.embedded_config}", split, data_dir=self.config.data_dir,
                image_field=image_field, caption_field=caption_field, label_field=label_field or "label", download=True,
                extra_fields=extras,
            )
        if spec.kind == "tfds":
            return tfds_source.TfdsSource(
                spec.argument, split, data_dir=self.config.data_dir, image_field=image_field,
                caption_field=caption_field, label_field=label_field, manual_dir=self.config.get("manual_dir"),
                extra_fields=extras,
            )
        if spec.kind == "docci":
            return docci.DocciSource(spec.argument, split)
        if spec.kind == "arrayrecord":
            source = webdataset.ArrayRecordSource(spec.argument)
        elif spec.kind == "folder":
            source = folder.FolderSource(spec.argument, caption_field=caption_field or "caption", label_field=label_field)
        elif spec.kind == "classfolders":
            source = folder.folder_from_class_dirs(spec.argument)
        else:
            raise ValueError(
                f"data source {spec.kind}:{spec.argument} is a stream (training only); evaluation and class names "
                f"need a random-access source ({', '.join(RANDOM_ACCESS_KINDS)}); convert tar shards with "
                f"`python -m jclip.data.sources.convert_webdataset`"
            )
        return splits.select_split(source, split, seed=SPLIT_SEED)

    @functools.lru_cache(maxsize=None)
    def source(
        self,
        split: str,
        spec: str | None = None,
        *,
        image_field: str | None = None,
        caption_field: str | None = None,
        label_field: str | None = None,
        extra_fields: tuple[tuple[str, str], ...] = (),
    ) -> Any:
        """The raw, random-access source of `split` of `spec` (default `data.source`); evaluations read this.

        A field given here overrides `data.<field>` for this source only; `extra_fields` ((key, feature
        path) pairs, a tuple so that the call is cached) adds fields to a TFDS source's raw examples.
        """
        overrides = {name: value for name, value in (("image_field", image_field), ("caption_field", caption_field),
                                                     ("label_field", label_field)) if value is not None}
        return self._random_access(SourceSpec.parse(spec or self.config.source), split, overrides,
                                   tuple(tuple(pair) for pair in extra_fields))

    def class_names(self, split: str, spec: str | None = None, *, image_field: str | None = None,
                    caption_field: str | None = None, label_field: str | None = None) -> list[str]:
        """Zero-shot class names of a source: its ClassLabel names (or class folders); fields as in `source`."""
        source = self.source(split, spec, image_field=image_field, caption_field=caption_field, label_field=label_field)
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

    def _training_source(self, name: str, spec: SourceSpec, entry: Any, split: str | None = None) -> Any:
        """A random-access training component (of `split`, default its train split), re-captioned from its
        labels when `caption_templates` is set, with `extra_fields` for TFDS sources."""
        raw = self._random_access(spec, split or self._field(entry, "train_split"), entry,
                                  _extra_fields(self._field(entry, "extra_fields")))
        templates = self._field(entry, "caption_templates")
        if templates is None:
            return raw
        names = raw.class_names() if hasattr(raw, "class_names") else None
        if names is None:
            raise ValueError(self._no_labels_message(name, spec))
        return label_captions.CaptionsFromLabels(raw, names, templates)

    def random_access_training_sources(self) -> list[tuple[str, Any]]:
        """(component name, raw training source) of every training component, for a pass over all of them
        (e.g. `python -m jclip.write_guidance`); a tar-shard stream is refused, since it has no random access."""
        components = []
        for name, spec, entry, _ in self._components():
            if spec.kind not in RANDOM_ACCESS_KINDS:
                raise ValueError(
                    f"the training component {name!r} ({_spec_text(spec)}) is a stream without random access: "
                    f"convert it with python -m jclip.data.sources.convert_webdataset"
                )
            components.append((name, self._training_source(name, spec, entry)))
        return components

    def component_names(self) -> list[str]:
        """The training components' names: the mixture's, or `main` for `data.source` alone."""
        return [name for name, *_ in self._components()]

    def training_keys(self, name: str, split: str | None = None) -> Iterator[str]:
        """The example keys of training component `name`, in source order (e.g. for joining recaptions).

        A random-access source reads its examples of `split` (default the component's train split) for
        their `key`; tar shards (whose `split` is fixed) list every shard's keys from the tar headers alone.
        """
        from jclip.data.sources import webdataset

        components = {component: (spec, entry) for component, spec, entry, _ in self._components()}
        if name not in components:
            raise ValueError(f"no training component {name!r}; the components are {list(components)}")
        spec, entry = components[name]
        if spec.kind == "wds":
            for path in webdataset.expand_shards(spec.argument, allow_missing=bool(self.config.allow_missing_shards)):
                yield from webdataset.shard_keys(path)
            return
        raw = self._training_source(name, spec, entry, split)
        for index in range(len(raw)):
            yield str(raw[index]["key"])

    def _check_stream(self, name: str, spec: SourceSpec, entry: Any) -> None:
        if self._field(entry, "caption_templates") is not None:
            raise ValueError(self._no_labels_message(name, spec))

    def _no_labels_message(self, name: str, spec: SourceSpec) -> str:
        where = f"data.mixture.{name}" if self.config.get("mixture") else "data.source"
        return (f"data.caption_templates makes captions from class labels, but the training source "
                f"{_spec_text(spec)!r} ({where}) has no class names: give it a label field with class names "
                f"(data.label_field: a ClassLabel or string labels), use classfolders:, or leave "
                f"caption_templates unset for it")

    def prepare(self, splits: set[tuple[str, str | None]]) -> None:
        """Opens (and for the embedded dataset, builds) everything the run reads, failing early and clearly."""
        for name, spec, entry, _ in self._components():
            if spec.kind == "wds":
                from jclip.data.sources import webdataset

                self._check_stream(name, spec, entry)
                webdataset.expand_shards(spec.argument, allow_missing=bool(self.config.allow_missing_shards))
            else:
                self._training_source(name, spec, entry)
        for component_ops in self.component_ops():
            for op in component_ops:
                if hasattr(op, "prepare"):
                    op.prepare()
        for split, spec in splits:
            self.source(split, spec)

    def training_dataset(self, *, seed: int, shard: pipeline.HostShard) -> grain.IterDataset:
        """The host's infinite training stream of preprocessed, batched examples (bad ones skipped, counted)."""
        from jclip.data.sources import webdataset

        components, preprocessors = [], []
        for index, (name, spec, entry, weight) in enumerate(self._components()):
            component_seed = seed + 1000 * index
            if spec.kind == "wds":
                self._check_stream(name, spec, entry)
                raw = webdataset.webdataset_training_dataset(
                    spec.argument, seed=component_seed, shard=shard,
                    shuffle_buffer=int(self.config.shuffle_buffer),
                    allow_missing=bool(self.config.allow_missing_shards),
                )
            else:
                raw = self._training_source(name, spec, entry)
            components.append((raw, weight, component_seed))
            preprocessors.append(ops.Preprocess(self._ops(self.preprocess_spec(entry))))
        return pipeline.training_dataset(
            components,
            preprocessors,
            global_batch_size=int(self.config.batch_size),
            shard=shard,
            num_workers=self.num_workers(shard),
            num_threads=int(self.config.num_threads),
            prefetch_buffer_size=int(self.config.prefetch),
            max_consecutive_bad=int(self.config.max_consecutive_bad),
        )

    def num_workers(self, shard: pipeline.HostShard) -> int:
        """This host's Grain worker processes: `data.num_workers`, or for auto (-1) its usable cores minus
        `pipeline.AUTO_RESERVED_CORES`, limited only by host memory for the workers' batches
        (`pipeline.memory_worker_limit`) and, for tar shards, by the shards this host reads (each worker needs one).
        """
        setting = self.config.num_workers
        if not pipeline.is_auto(setting):
            return pipeline.resolve_num_workers(setting, cores=pipeline.usable_cores())
        local_batch = pipeline.local_batch_size(int(self.config.batch_size), shard)
        image_bytes = self.image_size * self.image_size * 3 * 4  # float32 `images` dominate a batch
        limits = [pipeline.memory_worker_limit(local_batch * image_bytes, pipeline.host_memory_bytes())]
        limits += [len(shards) // shard.count for shards in self._stream_shards()]
        limits = [limit for limit in limits if limit is not None]
        return pipeline.resolve_num_workers(setting, cores=pipeline.usable_cores(), limit=min(limits, default=None))

    def _stream_shards(self) -> list[list[str]]:
        """The tar shards of each `wds:` training component (what `prepare` checks)."""
        from jclip.data.sources import webdataset

        allow_missing = bool(self.config.allow_missing_shards)
        return [webdataset.expand_shards(spec.argument, allow_missing=allow_missing)
                for _, spec, _, _ in self._components() if spec.kind == "wds"]

    # ----- preprocessing ----------------------------------------------------------------------------

    def preprocess_spec(self, entry: Any = None) -> str:
        """`data.preprocess` (default `DEFAULT_PREPROCESS`), with `data.caption_rule=RULE` inserting the caption
        choice (`with_caption_rule`), `data.recaptions=DIR` the recaption look-up before it (`with_recaptions`),
        `data.hard_negatives=DIR` adding the hard-negative ops (`with_hard_negatives`) and
        `data.guidance_features=DIR` appending `guidance(dir=DIR)`. A mixture `entry`'s own `caption_rule` and
        `recaptions` replace the data-level ones for that component."""
        spec = str(self.config.get("preprocess") or DEFAULT_PREPROCESS)
        rule, recaptions = self._field(entry, "caption_rule"), self._field(entry, "recaptions")
        dense_field = DENSE_FIELD
        if recaptions:
            from jclip.data.recaptions import Recaptions

            dense_field = Recaptions(str(recaptions)).field
        if rule:
            spec = with_caption_rule(spec, str(rule), self.op_context, dense_field=dense_field)
        if recaptions:
            spec = with_recaptions(spec, str(recaptions), self.op_context, field=dense_field)
        if self.config.get("hard_negatives"):
            spec = with_hard_negatives(spec, str(self.config.hard_negatives), self.op_context)
        if self.config.get("guidance_features"):
            spec += f"|guidance(dir={str(self.config.guidance_features)!r})"
        return spec

    @functools.cache
    def _ops(self, spec: str) -> tuple:
        return tuple(ops.make_ops(spec, self.op_context))

    def train_ops(self) -> tuple:
        """The training ops, built (once) for this run's image size, context length and tokenizer (a mixture
        entry with its own caption settings has its own: `component_ops`)."""
        return self._ops(self.preprocess_spec())

    @functools.cache
    def component_ops(self) -> tuple[tuple, ...]:
        """The ops of every training component, in mixture order; ValueError unless they give the same batch fields."""
        built = [(name, self._ops(self.preprocess_spec(entry))) for name, _, entry, _ in self._components()]
        expected = ops.batch_fields(self.train_ops())
        for name, component_ops in built:
            fields = ops.batch_fields(component_ops)
            if sorted(fields) != sorted(expected):
                raise ValueError(f"data.mixture.{name}: its preprocessing writes the batch fields {sorted(fields)}, but "
                                 f"data.preprocess writes {sorted(expected)}; every component's batches must match")
        return tuple(component_ops for _, component_ops in built)

    def batch_fields(self) -> dict[str, str]:
        """Every field of a training batch that the ops write -> the name of the op that writes it (no I/O)."""
        return ops.batch_fields(self.train_ops())

    def train_preprocess(self) -> ops.Preprocess:
        """Training preprocessing: `(example, rng) -> batch fields`, or a `Skipped` marker for a bad example
        (`data.preprocess` with the data-level shorthands; see `component_ops` for a mixture's own)."""
        return ops.Preprocess(self.train_ops())

    def eval_preprocess(self) -> image_ops.ImageTextPreprocessor:
        """The evaluators' fixed preprocessing (centre crop), whatever `data.preprocess` says."""
        return image_ops.ImageTextPreprocessor(
            image_size=self.image_size,
            context_length=self.context_length,
            image_key="image",
            text_key="caption",
            random_crop_scale=None,
            tokenizer_spec=self.tokenizer_spec,
        )


#: Batch fields a `data.*` shorthand provides, and how to get them (for start-up messages).
SHORTHAND_FIELDS = {
    "negative_token_ids": "data.hard_negatives=DIR (candidate pools made by python -m jclip.make_negatives)",
    "negative_mask": "data.hard_negatives=DIR (candidate pools made by python -m jclip.make_negatives)",
    "guidance_image_features": "data.guidance_features=DIR (made by python -m jclip.write_guidance)",
    "guidance_text_features": "data.guidance_features=DIR (made by python -m jclip.write_guidance)",
}


#: The field `caption_rule` reads dense captions from, and `joined_captions` writes recaptions to, by default.
DENSE_FIELD = "dense_caption"


def field_hint(field: str) -> str:
    """'; set <shorthand> to provide it' for a batch field a data shorthand writes, else ''."""
    return f"; set {SHORTHAND_FIELDS[field]} to provide it" if field in SHORTHAND_FIELDS else ""


def with_hard_negatives(spec: str, directory: str, context: ops.OpContext) -> str:
    """`spec` with FSC-CLIP's hard negatives drawn from the pools in `directory`, unless it draws them already.

    `hard_negatives(dir=DIR)` goes right after the last op that writes `caption` (choose_caption) before an op
    consumes it (or first, if none writes it), and `tokenize(field='negative_captions',
    out='negative_token_ids', max_count=<kinds>)` is appended, which writes `negative_token_ids` [K, L] and
    `negative_mask` [K].
    """
    from jclip.data.ops.hard_negatives import DEFAULT_KINDS

    parsed = ops.parse_ops(spec)
    if any(name == "hard_negatives" for name, _ in parsed):
        return spec
    position = 0
    for index, op in enumerate(ops.make_ops(spec, context)):
        if "caption" in getattr(op, "consumes", ()):
            break
        if "caption" in op.writes:
            position = index + 1
    parsed.insert(position, ("hard_negatives", {"dir": directory}))
    parsed.append(("tokenize", {"field": "negative_captions", "out": "negative_token_ids", "max_count": len(DEFAULT_KINDS)}))
    return "|".join(_op_text(name, kwargs) for name, kwargs in parsed)


def _first_op_using(spec: str, fields: tuple[str, ...], context: ops.OpContext) -> int | None:
    """The position of the first op of `spec` that reads or writes one of `fields`, or None."""
    for index, op in enumerate(ops.make_ops(spec, context)):
        if set(fields) & (set(op.reads) | set(op.writes)):
            return index
    return None


def with_caption_rule(spec: str, rule: str, context: ops.OpContext, *, dense_field: str = DENSE_FIELD) -> str:
    """`spec` with `caption_rule(rule=RULE)` (Stone et al.'s choice of alt-text or dense caption) right before the
    first op that reads or writes `caption` (`choose_caption` then sees one caption), or first.

    A `spec` that has its own `caption_rule` is a ValueError: two rules would contradict each other silently.
    """
    parsed = ops.parse_ops(spec)
    if any(name == "caption_rule" for name, _ in parsed):
        raise ValueError(f"data.caption_rule={rule!r} is set, and data.preprocess has its own caption_rule op: keep one")
    kwargs: dict[str, Any] = {"rule": rule}
    if dense_field != DENSE_FIELD:
        kwargs["dense_field"] = dense_field
    position = _first_op_using(spec, ("caption",), context) or 0
    parsed.insert(position, ("caption_rule", kwargs))
    return "|".join(_op_text(name, kwargs) for name, kwargs in parsed)


def with_recaptions(spec: str, directory: str, context: ops.OpContext, *, field: str = DENSE_FIELD) -> str:
    """`spec` with `joined_captions(dir=DIR)` (the examples' recaptions, by key) right before the first op that
    reads `field` (the caption rule).

    ValueError when `spec` joins recaptions already, or when no op reads `field`: joined captions that
    nothing uses would be a silent no-op (set `data.caption_rule`).
    """
    parsed = ops.parse_ops(spec)
    if any(name == "joined_captions" for name, _ in parsed):
        raise ValueError(f"data.recaptions={directory!r} is set, and data.preprocess has its own joined_captions op: "
                         f"keep one")
    position = None
    for index, op in enumerate(ops.make_ops(spec, context)):
        if field in op.reads:
            position = index
            break
    if position is None:
        raise ValueError(f"data.recaptions joins recaptions into {field!r}, but no op of the preprocessing reads it: "
                         f"set data.caption_rule (e.g. 'dense' or 'mixed:0.5'), or add an op that reads {field!r}")
    kwargs: dict[str, Any] = {"dir": directory}
    if field != DENSE_FIELD:
        kwargs["field"] = field
    parsed.insert(position, ("joined_captions", kwargs))
    return "|".join(_op_text(name, kwargs) for name, kwargs in parsed)


def _op_text(name: str, kwargs: dict[str, Any]) -> str:
    """One parsed op written back in the op-list syntax."""
    if not kwargs:
        return name
    return f"{name}({', '.join(f'{key}={value!r}' for key, value in kwargs.items())})"


def _spec_text(spec: SourceSpec) -> str:
    return spec.kind if spec.argument is None else f"{spec.kind}:{spec.argument}"

