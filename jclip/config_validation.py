"""Checks a config before anything is built or compiled, so a bad value stops the run with a clear message."""

from __future__ import annotations

import ml_collections
from jax.sharding import Mesh

from jclip import parallel
from jclip.errors import ConfigError
from jclip.paths import as_path

COMPUTE_DTYPES = ("float32", "bfloat16")
CHECKPOINT_FAILURE_POLICIES = ("stop", "continue")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_config(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> None:
    """Raises ConfigError naming the first invalid field; `mesh` adds the divisibility checks."""
    from jclip import evals, losses, models
    from jclip.data import configured, pipeline

    _require(int(config.total_steps) > 0, f"total_steps must be positive, got {config.total_steps}")
    for name in ("log_every", "checkpoint_every", "keep_checkpoints"):
        _require(int(config[name]) > 0, f"{name} must be positive, got {config[name]}")
    _require(config.get("checkpoint_failure", "stop") in CHECKPOINT_FAILURE_POLICIES,
             f"checkpoint_failure must be one of {CHECKPOINT_FAILURE_POLICIES}, got {config.get('checkpoint_failure')!r}")

    _check_nonfinite(config)
    from jclip.profiling import parse_profile_steps

    parse_profile_steps(config.get("profile_steps"), int(config.total_steps))

    model = config.model
    _require(int(model.embed_dim) > 0, f"model.embed_dim must be positive, got {model.embed_dim}")
    for modality in models.towers.MODALITIES:
        try:
            models.towers.check_tower(model, modality)
        except (ValueError, OSError) as error:  # OSError: a pretrained tower's file or wheel is missing
            raise ConfigError(str(error)) from error
    from jclip.models.clip_model import check_embedding

    try:
        check_embedding(model.get("embedding") or "projection", model.get("prototype_heads"))
    except ValueError as error:
        raise ConfigError(str(error)) from error
    _require(model.dtype in COMPUTE_DTYPES, f"model.dtype must be one of {COMPUTE_DTYPES}, got {model.dtype!r}")
    if model.get("scan_layers"):
        named = {str(rule[0]) for rule in (config.get("sharding_rules") or parallel.DEFAULT_RULES)}
        _require("layers" in named, "model.scan_layers stacks the blocks on a logical axis `layers`, which "
                                    "sharding_rules do not name; add ['layers', None] (replicated)")

    data = config.data
    try:
        configured.validate_data_config(data)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    _check_tokenizer(model)
    _require(0 <= float(data.max_skip_rate) <= 1, f"data.max_skip_rate must be in [0, 1], got {data.max_skip_rate}")
    batch = int(data.batch_size)
    _require(batch > 0, f"data.batch_size must be positive, got {batch}")
    try:
        pipeline.resolve_num_workers(data.num_workers, cores=1)  # n >= 0, or -1 / "auto"
    except ValueError as error:
        raise ConfigError(str(error)) from error
    if data.random_crop_scale is not None:
        low, high = data.random_crop_scale
        _require(0 < low <= high <= 1, f"data.random_crop_scale must satisfy 0 < low <= high <= 1, got {data.random_crop_scale}")

    opt = config.optim
    _require(float(opt.learning_rate) > 0, f"optim.learning_rate must be positive, got {opt.learning_rate}")
    _require(int(opt.warmup_steps) >= 0, f"optim.warmup_steps must be >= 0, got {opt.warmup_steps}")
    _require(float(opt.weight_decay) >= 0, f"optim.weight_decay must be >= 0, got {opt.weight_decay}")
    _require(0 <= float(opt.b1) < 1 and 0 <= float(opt.b2) < 1, f"optim.b1/b2 must be in [0, 1), got {opt.b1}, {opt.b2}")
    _require(float(opt.grad_clip_norm) >= 0, f"optim.grad_clip_norm must be >= 0 (0 disables), got {opt.grad_clip_norm}")
    accum = int(opt.accum_steps)
    _require(accum >= 1, f"optim.accum_steps must be >= 1, got {accum}")
    _require(batch % accum == 0, f"data.batch_size ({batch}) must be divisible by optim.accum_steps ({accum})")
    from jclip import param_rules

    param_rules.compile_rules(config)  # a bad regex, action or lock; unmatched paths are checked at set-up

    try:
        losses.validate_terms_config(config.losses)
    except ValueError as error:
        raise ConfigError(f"losses: {error}") from error
    _check_contract(config)
    for name, entry in config.evals.items():
        try:
            evals.validate_evaluator_config(name, entry)
        except ValueError as error:
            raise ConfigError(str(error) if str(error).startswith("evals.") else f"evals.{name}: {error}") from error
        _require(int(entry.get("every", 0) or 0) >= 0, f"evals.{name}.every must be >= 0 (0 = only at the end), got {entry.every}")

    if mesh is not None:
        import jax

        shards = parallel.batch_shards(mesh)
        _require(
            (batch // accum) % shards == 0,
            f"the micro-batch ({batch} / accum_steps {accum} = {batch // accum}) must be divisible by the "
            f"{shards} batch shards of mesh {dict(mesh.shape)}",
        )
        _require(batch % jax.process_count() == 0, f"data.batch_size ({batch}) must be divisible by {jax.process_count()} processes")
        for name, entry in config.evals.items():
            if "batch_size" in entry:
                _require(
                    int(entry.batch_size) % shards == 0,
                    f"evals.{name}.batch_size ({entry.batch_size}) must be divisible by the {shards} batch shards",
                )


def check_inputs(config: ml_collections.ConfigDict, *, fresh: bool = True) -> None:
    """The files and folders the config reads exist: the training and evaluation data sources, a compositional
    benchmark's files, `init_from` (when `fresh`: a resumed run never reads it) and `teacher.checkpoint`.

    Raises ConfigError naming the key and the path, so that a typo stops the run in one line before it saves its
    config or anything is compiled; what the files hold is checked when they are opened. Paths may be URLs (gs://).
    """
    data = config.data
    mixture = data.get("mixture") or {}
    sources = ([(f"data.mixture.{name}.source", entry["source"]) for name, entry in mixture.items()]
               or [("data.source", data.source)])
    for name, entry in config.evals.items():
        if _reads_benchmark_files(entry):
            for option in ("path", "image_root"):
                path = entry.get(option)
                _require(not path or as_path(path).exists(),
                         f"config.evals.{name}.{option}={path!r} does not exist; correct the path")
        elif entry.get("source"):
            sources.append((f"evals.{name}.source", entry.source))
    for key, spec in sources:
        problem = _source_problem(str(spec), data)
        _require(problem is None, f"config.{key}={str(spec)!r}: {problem}")
    if fresh and config.get("init_from"):
        _check_run("init_from", str(config.init_from), None, exports=True)
    teacher = config.get("teacher") or {}
    if teacher.get("checkpoint"):
        _check_run("teacher.checkpoint", str(teacher["checkpoint"]), teacher.get("step"), exports=False)


def _reads_benchmark_files(entry: ml_collections.ConfigDict) -> bool:
    """A compositional evaluator of a file format (`path`, `image_root`) instead of a data source."""
    return str(entry.get("format") or "embedded") != "embedded"


def _source_problem(spec: str, data: ml_collections.ConfigDict) -> str | None:
    """What is missing of the files a source spec names (None: nothing, or a source that builds itself)."""
    kind, _, argument = spec.partition(":")
    if kind == "wds":
        from jclip.data.sources import webdataset

        present: list[str] = []
        try:
            present, missing = webdataset.find_shards(argument)
            if not present or (missing and not data.get("allow_missing_shards")):
                webdataset.check_missing_shards(argument, present, missing, allow_missing=False)
        except (FileNotFoundError, ValueError) as error:  # missing shards or list file; a bad brace range
            rest = (" (or set config.data.allow_missing_shards=True to train on the shards that exist)"
                    if present else "")
            return f"{error}; correct the path{rest}"
    elif kind == "tfds":
        from jclip.data.sources import tfds_source

        data_dir = data.get("data_dir")
        if data_dir and not as_path(data_dir).is_dir():
            return (f"the TFDS data dir config.data.data_dir={data_dir!r} does not exist; set it to the folder that "
                    "holds the prepared dataset (the --data_dir of `tfds build`)")
        try:
            tfds_source.check_prepared(argument, data_dir, data.get("manual_dir"))
        except (FileNotFoundError, ValueError) as error:
            return " ".join(str(error).split())
    elif kind == "arrayrecord":
        from jclip.data.sources.webdataset import DATASET_INFO_FILE

        if not (as_path(argument) / DATASET_INFO_FILE).is_file():
            return (f"{argument}/{DATASET_INFO_FILE} does not exist: correct the path, or convert tar shards there "
                    "with python -m jclip.data.sources.convert_webdataset")
    elif kind in ("folder", "docci") and not as_path(argument).is_file():
        return f"the file {argument} does not exist; correct the path"
    elif kind == "classfolders" and not as_path(argument).is_dir():
        return f"the folder {argument} does not exist; correct the path"
    return None


def _check_run(key: str, path: str, step: int | None, *, exports: bool) -> None:
    """`path` holds a jclip run's checkpoints (or, with `exports`, a params export): ConfigError naming `key`."""
    from jclip import checkpoint

    wanted = ("a finished jclip run (its workdir, checkpoints/ folder or a step folder)"
              + (" or a params export (python -m jclip.convert params|import)" if exports else ""))
    if exports and checkpoint.is_params_export(path):
        return
    _require(as_path(path).exists(), f"config.{key}={path!r} does not exist; set it to {wanted}")
    try:
        checkpoint.resolve_checkpoint(path, step)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"config.{key}={path!r}: {error}; set it to {wanted}") from error


def _check_nonfinite(config: ml_collections.ConfigDict) -> None:
    from jclip.nonfinite import POLICIES

    nonfinite = config.get("nonfinite")
    _require(nonfinite is not None, f"config.nonfinite is missing; add {{'policy': 'halt', 'max_skips': 10, 'window': 1000}}")
    _require(nonfinite.get("policy") in POLICIES,
             f"nonfinite.policy must be one of {POLICIES}, got {nonfinite.get('policy')!r}")
    for name, low in (("max_skips", 0), ("window", 1)):
        value = nonfinite.get(name)
        _require(isinstance(value, int) and not isinstance(value, bool) and value >= low,
                 f"nonfinite.{name} must be an integer >= {low}, got {value!r}")


def _check_tokenizer(model: ml_collections.ConfigDict) -> None:
    """The text tower's tokenizer builds, and its ids fit the tower's vocabulary."""
    from jclip import models
    from jclip.data.tokenizer import make_tokenizer

    spec = models.tokenizer_spec(model)
    try:
        tokenizer = make_tokenizer(spec, int(model.text.context_length))
    except (ValueError, OSError, RuntimeError) as error:
        raise ConfigError(f"model.text.tokenizer {spec!r}: {error}") from error
    vocab_size = model.text.get("vocab_size")
    _require(
        vocab_size is None or tokenizer.vocab_size <= int(vocab_size),
        f"model.text.tokenizer {spec!r} has {tokenizer.vocab_size} ids but model.text.vocab_size is {vocab_size}",
    )


def batch_fields(config: ml_collections.ConfigDict) -> dict[str, str]:
    """Every field of a training batch, mapped to the preprocessing op that writes it (nothing is read)."""
    from jclip.data import configured

    try:
        return configured.ConfiguredData(config.data, config.model).batch_fields()
    except ValueError as error:
        raise ConfigError(f"data.preprocess: {error}") from error


def _check_contract(config: ml_collections.ConfigDict) -> None:
    """Every field a loss term or a tower reads is written by the pipeline or produced by the model (or
    the teacher), and every field the pipeline writes is read: checked before anything is compiled."""
    from jclip.data import configured
    from jclip import losses, models
    from jclip.build import TEACHER_OUTPUTS
    from jclip.data.robust import TRUNCATED_FIELD

    fields = batch_fields(config)
    written = ", ".join(f"{name} ({op})" for name, op in fields.items())
    has_teacher = bool((config.get("teacher") or {}).get("checkpoint"))
    outputs = models.model_output_names(config.model, fields) | (set(TEACHER_OUTPUTS) if has_teacher else set())
    read = set(models.input_fields(config.model)) | {TRUNCATED_FIELD}  # the loop's skip counter reads it
    for field, modality in models.input_fields(config.model).items():
        kind = models.tower_for(config.model, modality).kind
        _require(field in fields, f"model.{modality} (kind {kind!r}) reads the batch field {field!r}, which no "
                                  f"preprocessing op writes; the pipeline writes: {written}")
    try:
        reads = losses.term_reads(config.losses)
    except ValueError as error:
        raise ConfigError(f"losses: {error}") from error
    for term, declared in reads.items():
        for field in declared.batch:
            _require(field in fields, f"losses: term {term!r} reads the batch field {field!r}, which no preprocessing op "
                                      f"writes{configured.field_hint(field)}; the pipeline writes: {written}")
        for output in declared.outputs:
            hint = ("only a frozen teacher provides: set teacher.checkpoint (a finished jclip run)"
                    if output in TEACHER_OUTPUTS else models.missing_output_hint(output)
                    + configured.field_hint(models.extra_caption_field(output) or ""))
            _require(output in outputs, f"losses: term {term!r} reads the model output {output!r}, which {hint}")
        read.update(declared.batch)
        read.update(models.extra_fields_read([o for o in declared.outputs if o not in TEACHER_OUTPUTS]))
    unread = sorted(set(fields) - read)
    _require(not unread, f"the preprocessing writes {unread} ({', '.join(sorted({fields[f] for f in unread}))}), which "
                         "no loss term or tower reads: remove the op, or configure the term that reads it")

