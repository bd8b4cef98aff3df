"""Checks a config before anything is built or compiled, so a bad value stops the run with a clear message."""

from __future__ import annotations

import ml_collections
from jax.sharding import Mesh

from jclip import parallel
from jclip.errors import ConfigError

COMPUTE_DTYPES = ("float32", "bfloat16")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_config(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> None:
    """Raises ConfigError naming the first invalid field; `mesh` adds the divisibility checks."""
    from jclip import evals, losses
    from jclip.data import sources

    _require(int(config.total_steps) > 0, f"total_steps must be positive, got {config.total_steps}")
    for name in ("log_every", "checkpoint_every", "keep_checkpoints"):
        _require(int(config[name]) > 0, f"{name} must be positive, got {config[name]}")

    model = config.model
    vision, text = model.vision, model.text
    for path, value in [
        ("model.embed_dim", model.embed_dim),
        ("model.vision.image_size", vision.image_size),
        ("model.vision.patch_size", vision.patch_size),
        ("model.vision.width", vision.width),
        ("model.vision.layers", vision.layers),
        ("model.text.context_length", text.context_length),
        ("model.text.width", text.width),
        ("model.text.layers", text.layers),
        ("model.text.heads", text.heads),
    ]:
        _require(int(value) > 0, f"{path} must be positive, got {value}")
    _require(
        vision.image_size % vision.patch_size == 0,
        f"model.vision.image_size ({vision.image_size}) must be a multiple of patch_size ({vision.patch_size})",
    )
    _require(text.width % text.heads == 0, f"model.text.width ({text.width}) must be divisible by heads ({text.heads})")
    from jclip.models.clip_model import check_embedding

    try:
        check_embedding(model.get("embedding") or "projection", model.get("prototype_heads"))
    except ValueError as error:
        raise ConfigError(str(error)) from error
    _require(model.dtype in COMPUTE_DTYPES, f"model.dtype must be one of {COMPUTE_DTYPES}, got {model.dtype!r}")

    data = config.data
    try:
        sources.validate_data_config(data)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    from jclip.data.tokenizer import make_tokenizer

    try:
        tokenizer = make_tokenizer(str(data.tokenizer), int(text.context_length))
    except (ValueError, OSError, RuntimeError) as error:
        raise ConfigError(f"data.tokenizer {data.tokenizer!r}: {error}") from error
    _require(
        tokenizer.vocab_size <= int(text.vocab_size),
        f"data.tokenizer {data.tokenizer!r} has {tokenizer.vocab_size} ids but model.text.vocab_size is {text.vocab_size}",
    )
    _require(0 <= float(data.max_skip_rate) <= 1, f"data.max_skip_rate must be in [0, 1], got {data.max_skip_rate}")
    batch = int(data.batch_size)
    _require(batch > 0, f"data.batch_size must be positive, got {batch}")
    _require(int(data.num_workers) >= 0, f"data.num_workers must be >= 0, got {data.num_workers}")
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
    wants_teacher = [name for name, entry in config.losses.items() if dict(entry).get("guidance") == "outputs"]
    has_teacher = bool((config.get("teacher") or {}).get("checkpoint"))
    _require(
        not wants_teacher or has_teacher,
        f"losses.{', '.join(wants_teacher)}: guidance='outputs' reads a teacher's embeddings; set teacher.checkpoint",
    )
    wants_batch_guidance = [name for name, entry in config.losses.items() if dict(entry).get("guidance") == "batch"]
    has_features = bool(data.get("guidance_features"))
    _require(
        not wants_batch_guidance or has_features,
        f"losses.{', '.join(wants_batch_guidance)}: guidance='batch' reads precomputed features; set "
        "data.guidance_features (a folder written by python -m jclip.write_guidance)",
    )
    _require(
        not has_features or bool(wants_batch_guidance),
        f"data.guidance_features is set ({data.get('guidance_features')}) but no loss term reads it "
        "(SoftCLIP's guidance='batch' does): unset it, or set the term's guidance",
    )
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
