"""Pretrained tower weights (`model.<tower>.weights`): read at start-up, placed into a fresh run's parameters.

A tower kind with a `load_weights` reader (jclip.models.towers.Tower; today the text towers `bert`, `gemma3`
and `llama`) takes a file path or a known name (jclip.models.pretrained_files) in its `weights` key. The file
is read when a run starts fresh, before the data pipeline is built, so a missing, truncated or foreign file
stops the run at once with a message naming it. Placing the tensors checks each shape against the model:
a file of another architecture (another width, depth or vocabulary) is an error naming the tensor. The run
then prints what it loaded, which model parameters kept their initialisation (a new projection head), and
which tensors of the file it did not use (BERT's pooler). Resuming reads the run's own checkpoint instead;
`init_from`, applied after this, overrides both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jclip import models
from jclip.errors import ConfigError
from jclip.models.towers import PretrainedWeights


def load_pretrained(model_config: ml_collections.ConfigDict) -> dict[str, PretrainedWeights]:
    """The weights each tower's `weights` key names, read into the tower's layout (by tower modality)."""
    loaded = {}
    for modality in models.towers.MODALITIES:
        tower = models.tower_for(model_config, modality)
        if tower.load_weights is None:
            continue
        settings = tower.settings(model_config[modality])
        if not settings.get("weights"):
            continue
        try:
            loaded[modality] = tower.load_weights(settings)
        except (OSError, ValueError, KeyError) as error:
            raise ConfigError(f"model.{modality}.weights {settings['weights']!r}: {error}") from error
    return loaded


def place_pretrained(loaded: Mapping[str, PretrainedWeights], params: Any) -> tuple[Any, list[str]]:
    """`params` with every loaded tensor in its place (cast to the parameter's dtype, on its sharding), and the
    report lines: what was loaded, what kept its initialisation, what the file had that was not used."""
    keys = flatten_dict(params)
    flat = {"/".join(map(str, key)): value for key, value in keys.items()}
    report = []
    for modality, weights in loaded.items():
        prefix = models.TOWER_ATTRIBUTES[modality] + "/"
        tower_paths = sorted(path for path in flat if path.startswith(prefix))
        for name, value in weights.params.items():
            path = prefix + name
            if path not in flat:
                raise ConfigError(f"model.{modality}.weights {weights.source}: the model has no parameter {path} "
                                  "(is the file of another architecture than the config?)")
            target = flat[path]
            if tuple(value.shape) != tuple(target.shape):
                raise ConfigError(f"model.{modality}.weights {weights.source}: {name} has shape {list(value.shape)} "
                                  f"in the file, {list(target.shape)} in the model (is the file of another "
                                  "architecture than the config?)")
            array = np.asarray(value, dtype=target.dtype)
            sharding = getattr(target, "sharding", None)
            flat[path] = jax.device_put(array, sharding) if sharding is not None else array
        kept = [path[len(prefix):] for path in tower_paths if path[len(prefix):] not in weights.params]
        report.append(f"model.{modality}: loaded {len(weights.params)} tensors from {weights.source}")
        report.append(f"model.{modality}: kept at initialisation: {', '.join(kept) if kept else 'nothing'}")
        report.append(f"model.{modality}: in the file but not used: "
                      f"{', '.join(weights.unused) if weights.unused else 'nothing'}")
    return unflatten_dict({key: flat["/".join(map(str, key))] for key in keys}), report
