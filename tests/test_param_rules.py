"""Parameter rules: the first full match wins, every parameter must match, the tower locks freeze the
expected paths (hand-written sets for the micro model), the split into trainable and frozen parts."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jclip_testing import micro_config

# The micro model's parameter paths, written out by hand (test_the_hand_written_paths_are_the_models checks).
BLOCK = (
    "attn/in_bias", "attn/in_kernel", "attn/out_bias", "attn/out_kernel",
    "ln_1/bias", "ln_1/scale", "ln_2/bias", "ln_2/scale",
    "mlp/c_fc/bias", "mlp/c_fc/kernel", "mlp/c_proj/bias", "mlp/c_proj/kernel",
)
BLOCK_NORMS = ("ln_1/bias", "ln_1/scale", "ln_2/bias", "ln_2/scale")
VISUAL_PRE = ("class_embedding", "patch_embedding", "positional_embedding", "ln_pre/bias", "ln_pre/scale")
VISUAL_POST = ("ln_post/bias", "ln_post/scale", "projection")
TEXT_PRE = ("token_embedding", "positional_embedding")
TEXT_POST = ("ln_final/bias", "ln_final/scale", "projection")
VISION_LAYERS, TEXT_LAYERS = 3, 2


def blocks(tower: str, indices, names=BLOCK) -> set[str]:
    return {f"{tower}/transformer/blocks/{i}/{name}" for i in indices for name in names}


def prefixed(tower: str, names) -> set[str]:
    return {f"{tower}/{name}" for name in names}


VISUAL = prefixed("visual", VISUAL_PRE + VISUAL_POST) | blocks("visual", range(VISION_LAYERS))
TEXT = prefixed("text", TEXT_PRE + TEXT_POST) | blocks("text", range(TEXT_LAYERS))
ALL = VISUAL | TEXT | {"logit_scale"}


def config_with(rules=None, **locks):
    config = micro_config(**{"model.vision.layers": VISION_LAYERS, "model.text.layers": TEXT_LAYERS})
    if rules is not None:
        config.optim.param_rules = rules
    for tower, entry in locks.items():
        config.optim.tower_locks[tower].update(enabled=True, **entry)
    return config


def actions_by_path(config) -> dict[str, object]:
    from jclip import optim, param_rules
    from jclip.build import ModelFunctions

    abstract = jax.eval_shape(ModelFunctions.create(config.model, 0).init_params)
    actions = param_rules.leaf_actions(config, abstract)
    return {optim.path_name(path): action for path, action in jax.tree_util.tree_flatten_with_path(actions)[0]}


def frozen_paths(config) -> set[str]:
    return {path for path, action in actions_by_path(config).items() if action == "frozen"}


def test_the_hand_written_paths_are_the_models():
    assert set(actions_by_path(config_with())) == ALL
    assert set(actions_by_path(config_with()).values()) == {"trainable"}  # the default table


def test_the_first_full_match_wins():
    rules = [
        ["visual/proj", "frozen"],  # a prefix of visual/projection, not a full match: skipped
        ["blocks", "frozen"],  # matches inside paths, never a whole path: skipped
        ["visual/projection", 0.5],
        ["visual/.*", "frozen"],  # also matches visual/projection, but comes later
        ["text/transformer/blocks/1/.*", 2],
        [".*", "trainable"],
        ["logit_scale", "frozen"],  # after the catch-all: never reached
    ]
    actions = actions_by_path(config_with(rules))
    want = {path: "trainable" for path in ALL}
    want.update({path: "frozen" for path in VISUAL})
    want["visual/projection"] = 0.5
    want.update({path: 2.0 for path in blocks("text", [1])})
    assert actions == want


def test_an_unmatched_parameter_is_a_config_error_naming_it():
    from jclip.errors import ConfigError

    with pytest.raises(ConfigError, match="no rule matches logit_scale;.*'text/.\\*'"):
        actions_by_path(config_with([["visual/.*", "trainable"], ["text/.*", "frozen"]]))
    with pytest.raises(ConfigError, match="no rule matches text/ln_final/bias, text/ln_final/scale, "):
        actions_by_path(config_with([["visual/.*|logit_scale", "trainable"]]))


@pytest.mark.parametrize(
    "rules, locks, message",
    [
        ([["visual/(", "frozen"]], {}, r"optim.param_rules\[0\]: bad regex"),
        ([[".*", "train"]], {}, r"param_rules\[0\]: the action must be"),
        ([[".*", 0.0]], {}, "positive learning-rate multiplier"),
        ([[".*", True]], {}, "the action must be"),
        ([[".*", float("nan")]], {}, "the action must be"),
        ([".*"], {}, r"param_rules\[0\]: a rule is a \(regex, action\) pair"),
        ([[".*", "trainable", 1.0]], {}, "a rule is a"),
        ([[".*", "trainable"]], {"vision": {"unlocked_layers": 4}}, r"tower_locks.vision.unlocked_layers .*\[0, "),
        ([[".*", "trainable"]], {"text": {"unlocked": 1}}, "tower_locks.text: unknown key"),
        ([[".*", "frozen"]], {}, "freeze every parameter"),
    ],
)
def test_bad_rules_are_config_errors(rules, locks, message):
    from jclip import param_rules
    from jclip.build import ModelFunctions
    from jclip.errors import ConfigError

    config = config_with(rules, **locks)
    abstract = jax.eval_shape(ModelFunctions.create(config.model, 0).init_params)
    with pytest.raises(ConfigError, match=message):
        param_rules.Partition.create(config, abstract)


def test_an_unknown_tower_is_a_config_error():
    from jclip import param_rules
    from jclip.errors import ConfigError

    config = config_with()
    config.optim.tower_locks.audio = {"enabled": True}
    with pytest.raises(ConfigError, match="unknown tower"):
        param_rules.compile_rules(config)


def test_locking_a_whole_tower():
    assert frozen_paths(config_with(vision={})) == VISUAL
    assert frozen_paths(config_with(text={})) == TEXT
    assert frozen_paths(config_with(vision={}, text={})) == VISUAL | TEXT


def test_locking_all_but_the_top_blocks():
    # vision: 3 layers, top 1 unlocked; what follows the blocks (ln_post, projection) stays trainable
    assert frozen_paths(config_with(vision={"unlocked_layers": 1})) == prefixed("visual", VISUAL_PRE) | blocks(
        "visual", [0, 1]
    )
    assert frozen_paths(config_with(vision={"unlocked_layers": 2})) == prefixed("visual", VISUAL_PRE) | blocks(
        "visual", [0]
    )
    # every block unlocked: only the parts before the blocks stay locked
    assert frozen_paths(config_with(text={"unlocked_layers": 2})) == prefixed("text", TEXT_PRE)


def test_the_locked_parts_norms_can_stay_trainable():
    keep_norms = {"freeze_layer_norm": False}
    # text, 2 layers, top 1 unlocked: block 0 is locked except its LayerNorms
    assert frozen_paths(config_with(text={"unlocked_layers": 1, **keep_norms})) == prefixed("text", TEXT_PRE) | blocks(
        "text", [0], [name for name in BLOCK if name not in BLOCK_NORMS]
    )
    # a whole locked tower: every LayerNorm in it (ln_pre, the blocks', ln_post) stays trainable
    assert frozen_paths(config_with(vision=keep_norms)) == VISUAL - {
        "visual/ln_pre/bias", "visual/ln_pre/scale", "visual/ln_post/bias", "visual/ln_post/scale",
    } - blocks("visual", range(VISION_LAYERS), BLOCK_NORMS)


def stacked(tower: str, names=BLOCK) -> set[str]:
    """A scanned tower's block parameters (`model.scan_layers`): one per weight, every layer in it."""
    return {f"{tower}/transformer/blocks/{name}" for name in names}


def test_locks_of_scanned_towers_lock_all_or_none_of_the_stacked_blocks():
    from jclip import param_rules
    from jclip.errors import ConfigError

    def scanned(**locks):
        config = config_with(**locks)
        config.model.scan_layers = True
        return config

    assert frozen_paths(scanned(vision={})) == prefixed("visual", VISUAL_PRE + VISUAL_POST) | stacked("visual")
    # every block unlocked: only the parts before the blocks stay locked, as per layer
    assert frozen_paths(scanned(text={"unlocked_layers": TEXT_LAYERS})) == prefixed("text", TEXT_PRE)
    keep_norms = {"freeze_layer_norm": False}
    assert frozen_paths(scanned(vision=keep_norms)) == prefixed("visual", VISUAL_PRE[:3]) | {"visual/projection"} | \
        stacked("visual", [name for name in BLOCK if name not in BLOCK_NORMS])
    with pytest.raises(ConfigError, match=r"tower_locks.vision.unlocked_layers=1 .* model.scan_layers"):
        param_rules.compile_rules(scanned(vision={"unlocked_layers": 1}))


def test_what_a_lock_leaves_out_falls_through_to_the_table():
    rules = [["visual/.*", 0.1], ["text/ln_.*", 3.0], [".*", "trainable"]]
    actions = actions_by_path(config_with(rules, vision={"unlocked_layers": 1}, text={}))
    want = {path: "frozen" for path in TEXT | prefixed("visual", VISUAL_PRE) | blocks("visual", [0, 1])}
    want.update({path: 0.1 for path in prefixed("visual", VISUAL_POST) | blocks("visual", [2])})
    want["logit_scale"] = "trainable"
    assert actions == want


def test_split_and_merge():
    from jclip import optim, param_rules
    from jclip.build import ModelFunctions

    config = config_with([["logit_scale", "frozen"], ["visual/projection", 0.5], [".*", "trainable"]], text={})
    params = ModelFunctions.create(config.model, 0).init_params()
    partition = param_rules.Partition.create(config, params)
    trainable, frozen = partition.split(params)

    def paths(tree):
        return {optim.path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}

    assert paths(trainable) == VISUAL
    assert paths(frozen) == TEXT | {"logit_scale"}
    merged = partition.merge(trainable, frozen)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    for got, want in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
        assert got is want
    multipliers = partition.lr_multipliers()
    assert paths(multipliers) == VISUAL
    flat = {optim.path_name(p): m for p, m in jax.tree_util.tree_flatten_with_path(multipliers)[0]}
    assert flat == {path: (0.5 if path == "visual/projection" else 1.0) for path in VISUAL}
    sizes = {optim.path_name(p): int(np.prod(x.shape)) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert partition.counts(params) == (sum(sizes[p] for p in VISUAL), sum(sizes.values()))


def test_all_trainable_split_is_the_params_tree_itself():
    from jclip import param_rules
    from jclip.build import ModelFunctions

    config = config_with()
    params = ModelFunctions.create(config.model, 0).init_params()
    partition = param_rules.Partition.create(config, params)
    trainable, frozen = partition.split(params)
    assert trainable is params and frozen == {}
    assert partition.lr_multipliers() is None


def test_a_config_without_rules_or_locks_trains_everything():
    config = config_with()
    del config.optim["param_rules"]
    del config.optim["tower_locks"]
    assert set(actions_by_path(config).values()) == {"trainable"}


def test_the_lora_only_table_trains_the_adapters_alone():
    """`param_rules.lora_only_rules()` (FSC-CLIP's LoRA fine-tuning): the adapters train, everything else,
    the logit scale included, stays frozen; the counts are the adapters' sizes worked out by hand."""
    from jclip import param_rules
    from jclip.build import ModelFunctions
    from jclip.errors import ConfigError

    assert param_rules.lora_only_rules() == [[".*lora_.*", "trainable"], [".*", "frozen"]]
    config = config_with(param_rules.lora_only_rules())
    config.model.lora = {"rank": 2, "alpha": 1.0, "targets": ("attention", "mlp")}
    actions = actions_by_path(config)
    adapters = ("attn/in_lora_a", "attn/in_lora_b", "attn/out_lora_a", "attn/out_lora_b",
                "mlp/c_fc/lora_a", "mlp/c_fc/lora_b", "mlp/c_proj/lora_a", "mlp/c_proj/lora_b")
    want = blocks("visual", range(VISION_LAYERS), adapters) | blocks("text", range(TEXT_LAYERS), adapters)
    assert {path for path, action in actions.items() if action == "trainable"} == want
    assert {path for path, action in actions.items() if action == "frozen"} == ALL
    abstract = jax.eval_shape(ModelFunctions.create(config.model, 0).init_params)
    trainable, total = param_rules.Partition.create(config, abstract).counts(abstract)
    # rank 2, both towers 16 wide: in (16 + 48)·2, out (16 + 16)·2, c_fc (16 + 64)·2, c_proj (64 + 16)·2 per block
    per_block = 2 * (64 + 32 + 80 + 80)
    assert trainable == (VISION_LAYERS + TEXT_LAYERS) * per_block == 2560
    config.model.lora.rank = 0
    abstract = jax.eval_shape(ModelFunctions.create(config.model, 0).init_params)
    assert total - trainable == sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(abstract))
    with pytest.raises(ConfigError, match="nothing would train .*need model.lora.rank > 0"):
        param_rules.Partition.create(config, abstract)
