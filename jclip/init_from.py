"""`config.init_from`: a new run's parameters taken from earlier weights, for fine-tuning.

The source is a params export (`python -m jclip.convert params` or `... import`, e.g. OpenAI's or OpenCLIP's
weights) or a jclip training checkpoint (a workdir, its checkpoints/ folder or a step folder). Only the
parameters are taken: the optimizer state, step and data position start fresh. The source's architecture
must equal `config.model`'s (shapes and activation), and every source parameter must find its place; the
run's parameters the source lacks (a SigLIP logit bias, nCLIP prototype heads) keep their initialisation,
and the run says which. Only on a fresh start: resuming a run always reads its own checkpoint.

LoRA (`model.lora`, jclip.models.lora) is no architecture difference: a plain source fills a LoRA model's base
weights and its adapters keep their initialisation (B = 0, so the run starts from the source's function). A
source trained with other LoRA settings than the run's (or with LoRA, into a model without) has its adapters
merged into its kernels first; a source with the run's own settings gives its adapters too.

Stacked and per-layer blocks (`model.scan_layers`, jclip.models.stacking) are no difference either: the source's
blocks are put into the run's layout.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
from flax.traverse_util import flatten_dict, unflatten_dict

from jclip import checkpoint
from jclip.errors import ConfigError
from jclip.restore import restore_export, restore_run
from jclip.models.clip_model import architecture_differences
from jclip.models import stacking
from jclip.models.lora import lora_settings, merge_lora


def initial_params(config: ml_collections.ConfigDict, setup: Any, params: Any) -> tuple[Any, list[str]]:
    """`params` (the run's fresh initialisation) with every parameter `config.init_from` holds replaced by
    its value; also the names of the parameters kept at initialisation."""
    path = str(config.init_from)
    try:
        if checkpoint.is_params_export(path):
            model_config, loaded = restore_export(path, setup)
        else:
            _, loaded, saved = restore_run(path, None, config, setup.mesh)
            model_config = saved.model
    except (ConfigError, FileNotFoundError, ValueError) as error:
        raise ConfigError(f"init_from: {error}") from error
    differences = architecture_differences(model_config, config.model)
    if differences:
        raise ConfigError(f"init_from: {path} has another architecture than config.model (source vs config): "
                          + "; ".join(differences))
    loaded = unflatten_dict(stacking.unstack(flatten_dict(loaded)))  # per layer, as merge_lora reads it
    source_lora = lora_settings(model_config)
    if source_lora is not None and source_lora != lora_settings(config.model):
        loaded, model_config = merge_lora(loaded, model_config)
    fresh = flatten_dict(params)
    source = stacking.to_layout(flatten_dict(loaded), fresh)
    unplaced = sorted("/".join(map(str, p)) for p in set(source) - set(fresh))
    if unplaced:
        raise ConfigError(f"init_from: the model has no place for these parameters of {path}: {unplaced}")
    kept = sorted("/".join(map(str, p)) for p in set(fresh) - set(source))
    for key, value in source.items():
        if value.shape != fresh[key].shape or value.dtype != fresh[key].dtype:
            raise ConfigError(f"init_from: {'/'.join(map(str, key))} is {value.dtype}{list(value.shape)} in {path}, "
                              f"{fresh[key].dtype}{list(fresh[key].shape)} in the model")
        sharding = getattr(fresh[key], "sharding", None)
        if sharding is not None and getattr(value, "sharding", sharding) != sharding:  # a merged kernel
            source[key] = jax.device_put(value, sharding)
    return unflatten_dict({**fresh, **source}), kept
