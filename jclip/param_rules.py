"""Parameter rules: which parameters train, which stay frozen, and per-parameter learning-rate multipliers.

shared/ARCHITECTURE.md, "Parameters follow rules". The table `config.optim.param_rules` is an ordered list of
`(regex, action)` pairs. A parameter's path is its '/'-joined pure-dict keys (`optim.path_name`), e.g.
`visual/transformer/blocks/3/attn/in_kernel` or `logit_scale`. The first regex that matches the WHOLE path
(`re.fullmatch`) gives the parameter's action:

- `"trainable"`: trained at the configured learning rate;
- `"frozen"`: never updated; it has no optimizer state, and the step takes no gradient with respect to it;
- a positive number `m`: trained with its update multiplied by `m`, exactly a learning rate of `m x lr` for
  that parameter (AdamW's decoupled weight decay scales with it, as with optax's own learning rate).

Every parameter must match a rule (a ConfigError names the first unmatched paths). The default table is
`[(".*", "trainable")]`: everything trains, and the step and optimizer state are those of a run without rules.

The tower locks of `config.optim.tower_locks.<tower>` (`vision`: paths under `visual/`, `text`: under `text/`),
after OpenCLIP's --lock-image / --lock-text, compile to "frozen" rules placed BEFORE the table:

- `enabled`: lock the tower;
- `unlocked_layers = k`: leave its top k blocks (`<tower>/<blocks>/<i>/` with i >= layers - k) and the parts
  after the last block out of the lock (each tower declares both, `jclip.models.towers.Tower`: for `vit`
  `transformer/blocks` then `ln_post`, `projection`; for `clip` text `transformer/blocks` then `ln_final`,
  `projection`) when k > 0 (OpenCLIP's --lock-text-unlocked-layers; for the image tower
  OpenCLIP counts groups, where the projection alone is the first group: here k counts blocks for both);
  With `model.scan_layers` the blocks are stacked (one parameter per weight, jclip.models.stacking), so only
  k = 0 or k = layers is possible; another k is a ConfigError at start-up;
- `freeze_layer_norm = False`: leave the LayerNorms of the locked part out of the lock too (OpenCLIP's
  --lock-text-freeze-layer-norm, inverted: True, the default, freezes them with the rest).

What a lock leaves out falls through to the table (so a table rule may give it a multiplier).

LoRA fine-tuning (FSC-CLIP; `model.lora`, jclip.models.lora) trains the adapters alone: the table
`LORA_ONLY` = `[[".*lora_.*", "trainable"], [".*", "frozen"]]` (`lora_only_rules()` gives it as a config
value). As in the official FSC-CLIP code, which trains only parameters named `lora_`, the logit scale stays
frozen too.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

from jclip import models
from jclip.errors import ConfigError
from jclip.optim import path_name

TRAINABLE = "trainable"
FROZEN = "frozen"
Action = str | float
DEFAULT_TABLE = ((".*", TRAINABLE),)
#: Only the LoRA adapters train (their names hold `lora_`); the rest, the logit scale included, stays frozen.
LORA_ONLY = ((".*lora_.*", TRAINABLE), (".*", FROZEN))

# The shorthands' towers: config.model key -> parameter prefix (the tower says where its blocks are).
TOWER_PREFIXES = models.TOWER_ATTRIBUTES
LOCK_KEYS = ("enabled", "unlocked_layers", "freeze_layer_norm")
# A path with a LayerNorm module among its parts (`ln_1/scale`, `ln_post/bias`, `.../LayerNorm/...`).
_NORM_PATH = r"(?:[^/]+/)*(?:ln_[^/]*|[^/]*[Nn]orm[^/]*)/"


@dataclasses.dataclass(frozen=True)
class Rule:
    regex: str
    action: Action
    pattern: re.Pattern

    def __str__(self) -> str:
        return f"({self.regex!r}, {self.action!r})"


def _action(value: Any, where: str) -> Action:
    if isinstance(value, str):
        if value in (TRAINABLE, FROZEN):
            return value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isfinite(value) and value > 0:
            return float(value)
    raise ConfigError(
        f"{where}: the action must be 'trainable', 'frozen' or a positive learning-rate multiplier, got {value!r}"
    )


def _rule(entry: Any, where: str) -> Rule:
    if isinstance(entry, (str, bytes)) or not isinstance(entry, (list, tuple)) or len(entry) != 2:
        raise ConfigError(f"{where}: a rule is a (regex, action) pair, got {entry!r}")
    regex, action = entry
    if not isinstance(regex, str):
        raise ConfigError(f"{where}: the regex must be a string, got {regex!r}")
    try:
        pattern = re.compile(regex)
    except re.error as error:
        raise ConfigError(f"{where}: bad regex {regex!r}: {error}") from error
    return Rule(regex, _action(action, where), pattern)


def lora_only_rules() -> list[list[str]]:
    """`LORA_ONLY` as a fresh `config.optim.param_rules` value: train the LoRA adapters alone."""
    return [list(rule) for rule in LORA_ONLY]


def lock_rules(config: ml_collections.ConfigDict) -> list[tuple[str, str]]:
    """The (regex, "frozen") rules of `config.optim.tower_locks` (placed before the table)."""
    lock = config.optim.get("tower_locks") or {}
    unknown = sorted(set(lock) - set(TOWER_PREFIXES))
    if unknown:
        raise ConfigError(f"optim.tower_locks: unknown tower(s) {unknown}; known: {sorted(TOWER_PREFIXES)}")
    rules = []
    for tower, prefix in TOWER_PREFIXES.items():
        entry = dict(lock.get(tower) or {})
        unknown = sorted(set(entry) - set(LOCK_KEYS))
        if unknown:
            raise ConfigError(f"optim.tower_locks.{tower}: unknown key(s) {unknown}; known: {list(LOCK_KEYS)}")
        if not entry.get("enabled", False):
            continue
        spec = models.tower_for(config.model, tower)
        layers = int(spec.settings(config.model[tower])[spec.layers_key])
        unlocked = entry.get("unlocked_layers", 0)
        if isinstance(unlocked, bool) or not isinstance(unlocked, int) or not 0 <= unlocked <= layers:
            raise ConfigError(
                f"optim.tower_locks.{tower}.unlocked_layers must be an integer in "
                f"[0, model.{tower}.layers = {layers}], got {unlocked!r}"
            )
        left_out = []  # what the lock leaves to the table: a negative lookahead after the tower's prefix
        if unlocked and unlocked < layers and config.model.get("scan_layers"):
            raise ConfigError(
                f"optim.tower_locks.{tower}.unlocked_layers={unlocked} locks some of the tower's blocks but not "
                "others, and with model.scan_layers the blocks are stacked in one parameter per weight; lock the "
                f"whole tower (unlocked_layers=0 or {layers}) or set model.scan_layers=False"
            )
        if unlocked:
            blocks = "|".join(str(index) for index in range(layers - unlocked, layers))
            # per layer `<blocks>/<i>/...`; stacked (all of them unlocked) `<blocks>/<name>...`
            left_out.append(f"{spec.blocks}/" if config.model.get("scan_layers") else f"{spec.blocks}/(?:{blocks})/")
            left_out += [f"{name}(?:/|$)" for name in spec.after_blocks]
        if not entry.get("freeze_layer_norm", True):
            left_out.append(_NORM_PATH)
        lookahead = f"(?!{'|'.join(left_out)})" if left_out else ""
        rules.append((f"{prefix}/{lookahead}.*", FROZEN))
    return rules


def compile_rules(config: ml_collections.ConfigDict) -> tuple[Rule, ...]:
    """The lock shorthands' rules, then the table `config.optim.param_rules` (default: all trainable)."""
    table = config.optim.get("param_rules")
    if table is None:
        table = DEFAULT_TABLE
    if isinstance(table, (str, bytes)) or not isinstance(table, (list, tuple)):
        raise ConfigError(f"optim.param_rules must be a list of (regex, action) pairs, got {table!r}")
    rules = [_rule(entry, f"optim.tower_locks (compiled rule {entry!r})") for entry in lock_rules(config)]
    rules += [_rule(entry, f"optim.param_rules[{index}]") for index, entry in enumerate(table)]
    return tuple(rules)


def leaf_actions(config: ml_collections.ConfigDict, params: Any) -> Any:
    """Each leaf's action (a tree like `params`, a pure dict of arrays or ShapeDtypeStructs): the action of
    the first rule whose regex fully matches its path. ConfigError names the paths no rule matches."""
    rules = compile_rules(config)
    unmatched = []

    def action(path, _):
        name = path_name(path)
        for rule in rules:
            if rule.pattern.fullmatch(name):
                return rule.action
        unmatched.append(name)
        return None

    actions = jax.tree_util.tree_map_with_path(action, params)
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else "")
        table = ", ".join(str(rule) for rule in rules)
        raise ConfigError(
            f"optim.param_rules: no rule matches {shown}; every parameter must fully match a regex of the rules "
            f"(locks first, then the table): [{table}]"
        )
    return actions


def _select(tree: Any, actions: Any, keep) -> Any:
    """The sub-tree of `tree` (nested dicts like `actions`) whose actions pass `keep`; empty dicts pruned."""
    if isinstance(actions, Mapping):
        selected = {key: _select(tree[key], sub_actions, keep) for key, sub_actions in actions.items()}
        return {key: sub for key, sub in selected.items() if sub is not _NOTHING} or _NOTHING
    return tree if keep(actions) else _NOTHING


def _merge(actions: Any, trainable: Any, frozen: Any) -> Any:
    """The whole tree, in the params' key order, from the two parts of `_select`."""
    if isinstance(actions, Mapping):
        return {
            key: _merge(sub_actions, trainable.get(key, _NOTHING), frozen.get(key, _NOTHING))
            for key, sub_actions in actions.items()
        }
    return frozen if actions == FROZEN else trainable


_NOTHING: Any = {}  # a pruned sub-tree; `_select` returns this very object for "nothing here"


@dataclasses.dataclass(frozen=True)
class Partition:
    """The parameters' actions, and the split of a params-shaped tree into its trainable and frozen parts.

    The trainable part keeps the params' nesting and paths (so the decay mask and shardings apply as they
    are); with no frozen parameter it is the params tree itself, and the frozen part is `{}`.
    """

    actions: Any  # a pure dict like the params: "trainable", "frozen" or a float multiplier per leaf

    @classmethod
    def create(cls, config: ml_collections.ConfigDict, params: Any) -> "Partition":
        partition = cls(leaf_actions(config, params))
        if not jax.tree.leaves(partition.trainable(params)):
            hint = ""
            if any("lora" in rule.regex for rule in compile_rules(config)):
                hint = " (rules that train LoRA adapters need model.lora.rank > 0)"
            raise ConfigError(f"optim.param_rules / optim.tower_locks freeze every parameter: nothing would train{hint}")
        return partition

    @property
    def all_trainable(self) -> bool:
        return all(action != FROZEN for action in jax.tree.leaves(self.actions))

    def split(self, tree: Any) -> tuple[Any, Any]:
        """(trainable part, frozen part) of a tree shaped like the params (params, grads, shardings...)."""
        if self.all_trainable:
            return tree, {}
        trainable = _select(tree, self.actions, lambda action: action != FROZEN)
        frozen = _select(tree, self.actions, lambda action: action == FROZEN)
        return ({} if trainable is _NOTHING else trainable), ({} if frozen is _NOTHING else frozen)

    def trainable(self, tree: Any) -> Any:
        return self.split(tree)[0]

    def merge(self, trainable: Any, frozen: Any) -> Any:
        return trainable if self.all_trainable else _merge(self.actions, trainable, frozen)

    def lr_multipliers(self) -> Any | None:
        """The trainable parameters' learning-rate multipliers (a tree like the trainable part), or None
        when every one is 1 (then the optimizer is exactly that of a run without rules)."""
        trainable = self.trainable(self.actions)
        multipliers = jax.tree.map(lambda action: 1.0 if action == TRAINABLE else float(action), trainable)
        return None if all(m == 1.0 for m in jax.tree.leaves(multipliers)) else multipliers

    def counts(self, params: Any) -> tuple[int, int]:
        """(trainable, total) numbers of parameter values."""
        def size(tree):
            return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))

        return size(self.trainable(params)), size(params)
