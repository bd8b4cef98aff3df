"""Shared pieces of every jclip config: the defaults, arg-string parsing, and model presets.

Every config file's `get_config(arg)` starts from `base_config()` and changes what its method needs.
Arg strings follow big_vision: `configs/clip.py:model=B/32,steps=20000` (comma-separated key=value;
a bare key means True). Any field can then be overridden with `--config.<path>=<value>`.
"""

from __future__ import annotations

from typing import Any

import ml_collections
from ml_collections import config_dict

from jclip.models import presets

def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses `key=value,key2=value2` into a ConfigDict over `defaults`; unknown keys are an error."""
    parsed = ml_collections.ConfigDict(dict(defaults))
    if not arg:
        return parsed
    for item in arg.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"unknown config arg {key!r} in {arg!r}; known args: {sorted(defaults)}")
        default = defaults[key]
        if not sep:
            parsed[key] = True
        elif isinstance(default, bool):
            parsed[key] = value.strip().lower() in ("1", "true", "yes")
        elif isinstance(default, int):
            parsed[key] = int(value)
        elif isinstance(default, float):
            parsed[key] = float(value)
        else:
            parsed[key] = value.strip()
    return parsed


def split_arg(arg: str | None, **defaults: Any) -> tuple[ml_collections.ConfigDict, str]:
    """A method config's own args (the keys of `defaults`, parsed over them) and the rest of `arg`, for
    `base_config`: `configs/fscclip.py:variant=negclip,steps=300` -> ({variant: negclip, ...}, "steps=300")."""
    own, rest = [], []
    for item in (arg or "").split(","):
        if item.strip():
            (own if item.partition("=")[0].strip() in defaults else rest).append(item)
    return parse_arg(",".join(own), **defaults), ",".join(rest)


def model_config(name: str, dtype: str = "float32") -> ml_collections.ConfigDict:
    """A model preset by name (`tiny`, `B/32`, `B/16`, `L/14`, `g/14`) as a ConfigDict, with compute options."""
    model = ml_collections.ConfigDict(presets.get_preset(name))
    # The text tower owns its tokenizer: OpenAI's BPE, or "sentencepiece:/path/model.model[:lower]".
    model.text.tokenizer = "clip"
    model.dtype = dtype
    model.remat = False
    # Stack each tower's blocks and apply them with jax.lax.scan: one block in the compiled program, so big
    # models compile in seconds rather than minutes (parameters `.../transformer/blocks/<name>` [layers, ...]).
    model.scan_layers = False
    return model


def base_config(arg: str | None = None, *, data: str = "embedded", steps: int = 1200) -> ml_collections.ConfigDict:
    """Defaults that run anywhere: the tiny model on the embedded dataset, one CPU, a few minutes.

    `data` and `steps` are the defaults of the `data=` and `steps=` args (a config for another dataset or a
    fine-tuning recipe passes its own).
    """
    args = parse_arg(arg, model="tiny", steps=steps, batch=128, data=data, dtype="float32")
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.total_steps = args.steps

    config.model = model_config(args.model, args.dtype)
    config.model.init_logit_scale = 2.659260036932778  # ln(1 / 0.07), CLIP's initial temperature.
    config.model.init_logit_bias = config_dict.placeholder(float)  # None: no bias (SigLIP sets -10).
    # LoRA adapters (jclip/models/lora.py; Hu et al. 2021, as FSC-CLIP fine-tunes): rank 0 is off. alpha 1 gives
    # scale 1/rank (FSC-CLIP's); targets from ("attention", "mlp", "patch_embedding"). Train the adapters alone
    # with optim.param_rules = jclip.param_rules.lora_only_rules(). Exports merge them into the weights.
    config.model.lora = ml_collections.ConfigDict({"rank": 0, "alpha": 1.0, "targets": ("attention", "mlp")})

    config.data = ml_collections.ConfigDict()
    # `embedded` (the generated jclip_scenes), `tfds:NAME`, `wds:SHARDS`, `arrayrecord:DIR`,
    # `folder:CAPTIONS_FILE` or `classfolders:ROOT` (see jclip/data/configured.py and the README).
    config.data.source = args.data
    config.data.mixture = ml_collections.ConfigDict()  # name -> {source, weight[, fields]}; overrides `source`.
    config.data.embedded_config = "default"
    config.data.data_dir = config_dict.placeholder(str)  # TFDS data dir; None = ~/tensorflow_datasets.
    config.data.manual_dir = config_dict.placeholder(str)  # TFDS manual-download dir (e.g. imagenet2012).
    config.data.train_split = "train"  # TFDS slicing works: "train[:95%]".
    config.data.image_field = "image"
    config.data.caption_field = "caption"  # `dense_caption` for the embedded dataset's long descriptions.
    config.data.label_field = config_dict.placeholder(str)
    config.data.caption_templates = config_dict.placeholder(tuple)  # ("a photo of a {}.",): captions from labels.
    # Training preprocessing: named ops separated by '|', each optionally with keyword arguments that are
    # Python literals, e.g. tokenize(field='negative_captions', out='negative_token_ids', max_count=4).
    # The batch holds what the ops write. Ops and syntax: jclip/data/ops/__init__.py. Evaluation is fixed.
    config.data.preprocess = (
        "choose_caption|decode_image|crop_image|normalise_image|tokenize(field='caption', out='token_ids')"
    )
    # A folder of precomputed per-example guidance features (keys.npy, image.npy, text.npy) that SoftCLIP's
    # guidance="batch" reads; written by `python -m jclip.write_guidance` (see jclip/data/ops/guidance.py).
    # Shorthand: appends the op guidance(dir=DIR) to data.preprocess.
    config.data.guidance_features = config_dict.placeholder(str)
    # A folder of hard-negative candidate pools (swap, replace, shuffle per caption) that FSC-CLIP's terms
    # train with; written by `python -m jclip.make_negatives` (see jclip/data/negative_pools.py). Shorthand:
    # inserts hard_negatives(dir=DIR) after choose_caption and appends tokenize(field='negative_captions',
    # out='negative_token_ids', max_count=3), which write negative_token_ids [K, L] and negative_mask [K].
    config.data.hard_negatives = config_dict.placeholder(str)
    # Improved captions (Stone et al., arXiv 2412.15396; jclip/data/ops/captions.py). caption_rule chooses each
    # example's text between `caption` (alt-text) and `dense_caption`: "dense", "short", "mixed:p" (dense with
    # probability p) or "alternate" (dense in even epochs); shorthand for the op caption_rule(rule=RULE) before
    # choose_caption. recaptions: a folder of recaptions by example key, made by `python -m jclip.join_captions`;
    # shorthand for joined_captions(dir=DIR) before the caption rule. A mixture entry may set its own of both.
    config.data.caption_rule = config_dict.placeholder(str)
    config.data.recaptions = config_dict.placeholder(str)
    # Further fields of a TFDS training source's raw examples, as (key, feature path) pairs:
    # (("dense_caption", "dense_caption"),) gives the embedded dataset's dense captions to caption_rule.
    config.data.extra_fields = config_dict.placeholder(tuple)
    config.data.shuffle_buffer = 10_000  # tar shards only: examples mixed across shards.
    config.data.allow_missing_shards = False
    config.data.max_skip_rate = 0.1  # stop when more than this fraction of examples read are bad...
    config.data.skip_check_after = 1000  # ...once at least this many examples were read.
    config.data.max_consecutive_bad = 10_000
    config.data.batch_size = args.batch  # global, over all processes and devices.
    config.data.random_crop_scale = config_dict.placeholder(tuple)  # crop_image's scale if unnamed, e.g. (0.9, 1.0).
    # Decode JPEGs at least twice the crop's size DCT-scaled by 1/2, 1/4 or 1/8 (libjpeg draft mode): about twice
    # as fast from 512 px to 224 px. False decodes every pixel (jclip/data/ops/image.py, README "Measured").
    config.data.jpeg_draft = True
    # Grain worker processes per host: 0 = threads in the main process; -1 = auto, the host's usable cores
    # (os.sched_getaffinity) minus 2 for the training loop (jclip/data/pipeline.py: resolve_num_workers).
    config.data.num_workers = 0
    config.data.num_threads = 2
    config.data.prefetch = 4

    config.losses = ml_collections.ConfigDict({"clip": {"weight": 1.0}})

    config.optim = ml_collections.ConfigDict()
    config.optim.learning_rate = 1e-3
    config.optim.min_learning_rate_ratio = 0.0  # cosine decays to learning_rate x this.
    config.optim.warmup_steps = 100
    config.optim.weight_decay = 0.1
    config.optim.b1 = 0.9
    config.optim.b2 = 0.98
    config.optim.eps = 1e-6
    config.optim.grad_clip_norm = 1.0  # 0 disables clipping.
    config.optim.accum_steps = 1  # micro-batches per step; the loss still sees the whole global batch.
    config.optim.max_log_logit_scale = 4.605170185988092  # ln 100: CLIP's clamp of the logit scale.
    # Parameter rules (jclip/param_rules.py): ordered (regex, action) pairs; the first regex that fully matches a
    # parameter's path ('visual/transformer/blocks/3/attn/in_kernel') gives its action: "trainable", "frozen"
    # (no optimizer state, no gradient) or a learning-rate multiplier such as 0.1. Every parameter must match.
    config.optim.param_rules = [[".*", "trainable"]]
    # Tower locks (OpenCLIP's --lock-image / --lock-text): "frozen" rules placed before the table; the top
    # `unlocked_layers` blocks and what follows them stay out of the lock, and so do the locked part's
    # LayerNorms when `freeze_layer_norm` is False.
    config.optim.tower_locks = ml_collections.ConfigDict({
        tower: {"enabled": False, "unlocked_layers": 0, "freeze_layer_norm": True} for tower in ("vision", "text")
    })

    # Start from earlier weights (fine-tuning): a params export (python -m jclip.convert params|import) or a
    # jclip training checkpoint. Only the parameters are taken, and only on a fresh start (see jclip/init_from.py).
    config.init_from = config_dict.placeholder(str)

    # A frozen teacher (a finished jclip run) whose embeddings join the loss inputs (SoftCLIP guidance="outputs").
    config.teacher = ml_collections.ConfigDict(
        {"checkpoint": config_dict.placeholder(str), "step": config_dict.placeholder(int)}
    )

    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    config.sharding_rules = [list(rule) for rule in _default_rules()]

    # Non-finite steps (jclip/nonfinite.py): the step drops every update whose loss, gradient norm or new state
    # holds a NaN or inf. policy "halt": stop at the first one (exit status 5; nothing of it is saved; the message
    # names the step, the loss terms, the gradient norm and the batch's example keys). "skip": go on without that
    # update (metric nonfinite/skipped), and halt once more than max_skips updates were dropped within the last
    # `window` steps.
    config.nonfinite = ml_collections.ConfigDict({"policy": "halt", "max_skips": 10, "window": 1000})

    config.log_every = 25
    # "FIRST,LAST": a jax.profiler trace of those train steps in <workdir>/profile (TensorBoard, Perfetto).
    config.profile_steps = ""
    config.checkpoint_every = 200
    config.keep_checkpoints = 3  # deleted by jclip only after a newer save has been checked (README, Failure handling)
    config.async_checkpointing = True
    # A failed checkpoint save (a full disk, a write error, saved files that do not check out): "stop" ends the
    # run with exit status 4; "continue" warns and trains on, saving again at the next checkpoint step. The last
    # save of a run (the final step, a preemption) stops with status 4 either way.
    config.checkpoint_failure = "stop"

    config.evals = ml_collections.ConfigDict()
    config.evals.retrieval = ml_collections.ConfigDict(
        {"every": 400, "split": "validation", "limit": config_dict.placeholder(int), "batch_size": 256,
         "source": config_dict.placeholder(str)}  # None: data.source (which must then be random access).
    )
    config.evals.zeroshot = ml_collections.ConfigDict(
        {"every": 400, "split": "validation", "limit": config_dict.placeholder(int), "batch_size": 256,
         "templates": "scenes", "source": config_dict.placeholder(str)}
    )
    config.evals.compositional = ml_collections.ConfigDict(
        {"every": 400, "format": "embedded", "split": "validation", "limit": config_dict.placeholder(int),
         "batch_size": 256, "source": config_dict.placeholder(str)}  # the embedded probes' hard negatives
    )
    return config


def _default_rules():
    from jclip.parallel import DEFAULT_RULES

    return [(name, list(target) if isinstance(target, tuple) else target) for name, target in DEFAULT_RULES]
