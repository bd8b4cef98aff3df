"""The `hard_negatives` op: one stored candidate per kind, drawn uniformly with the example's RNG ('' for a
kind without candidates), fresh per seed, exactly repeated after a pipeline resume; unknown captions stop."""

from __future__ import annotations

import collections
import dataclasses
import pickle

import numpy as np
import pytest

from jclip.data import negative_pools, ops, pipeline

CONTEXT = ops.OpContext(image_size=16, context_length=16)


@dataclasses.dataclass(frozen=True)
class Result:
    caption: str
    pools: dict
    problem: str | None = None


POOLS = {
    "a red cube left of a blue ball": {"swap": ("a blue cube left of a red ball", "a red ball left of a blue cube"),
                                       "replace": ("a red cube right of a blue ball", "a green cube left of a blue ball",
                                                   "a red cube above a blue ball"),
                                       "shuffle": ("left of a red cube a blue ball",)},
    "two dogs": {"swap": (), "replace": ("two cats",), "shuffle": ()},
    "nothing to do": {"swap": (), "replace": (), "shuffle": ()},
}


@pytest.fixture
def pools_dir(tmp_path):
    results = [Result(caption, pools) for caption, pools in POOLS.items()]
    return str(negative_pools.write_pools(tmp_path / "pools", results, backend="fake", seed=0))


def draw(op, caption, seed):
    return op({"caption": caption}, np.random.default_rng(seed))["negative_captions"]


def test_draws_one_candidate_of_each_kind_from_the_captions_own_pools(pools_dir):
    op = ops.make_op("hard_negatives", CONTEXT, dir=pools_dir)
    assert op.reads == ("caption",) and op.writes == ("negative_captions",)
    caption = "a red cube left of a blue ball"
    for seed in range(50):
        negatives = draw(op, caption, seed)
        assert len(negatives) == 3
        for kind, negative in zip(("swap", "replace", "shuffle"), negatives):
            assert negative in POOLS[caption][kind]
    assert draw(op, "two dogs", 0) == ["", "two cats", ""]
    assert draw(op, "nothing to do", 0) == ["", "", ""]
    out = op({"caption": caption, "key": "k"}, np.random.default_rng(0))
    assert out["caption"] == caption and out["key"] == "k", "the caption stays for tokenize"


def test_same_seed_same_negatives_and_over_seeds_every_candidate_uniformly(pools_dir):
    op = ops.make_op("hard_negatives", CONTEXT, dir=pools_dir, kinds=("replace", "swap"))
    caption = "a red cube left of a blue ball"
    assert draw(op, caption, 3) == draw(op, caption, 3)
    counts = collections.Counter(tuple(draw(op, caption, seed)) for seed in range(3000))
    assert len(counts) == 6, "every (replace, swap) pair appears"
    replace = collections.Counter(pair[0] for pair in counts.elements())
    assert set(replace) == set(POOLS[caption]["replace"])
    for candidate, count in replace.items():
        assert abs(count / 3000 - 1 / 3) < 0.04, (candidate, count)
    swap = collections.Counter(pair[1] for pair in counts.elements())
    assert all(abs(count / 3000 - 1 / 2) < 0.04 for count in swap.values())


def test_an_unknown_caption_stops_with_the_caption_and_the_command(pools_dir):
    op = ops.make_op("hard_negatives", CONTEXT, dir=pools_dir)
    with pytest.raises(negative_pools.MissingNegativesError,
                       match=r"caption 'a purple cone' is not in the negative pools .*python -m jclip.make_negatives"):
        draw(op, "a purple cone", 0)


def test_the_op_needs_one_chosen_caption_and_the_kinds_it_draws(pools_dir, tmp_path):
    op = ops.make_op("hard_negatives", CONTEXT, dir=pools_dir)
    with pytest.raises(ValueError, match="put it after choose_caption"):
        op({"caption": ["two dogs", "nothing to do"]}, np.random.default_rng(0))
    op = ops.make_op("hard_negatives", CONTEXT, dir=pools_dir, kinds=("swap", "negate"))
    with pytest.raises(ValueError, match=r"have no kind\(s\) \['negate'\]"):
        op.prepare()
    op = ops.make_op("hard_negatives", CONTEXT, dir=str(tmp_path / "absent"))  # opened lazily...
    with pytest.raises(FileNotFoundError, match="make it with python -m jclip.make_negatives"):
        op.prepare()  # ...and at start-up


def test_the_op_pickles_without_its_open_pools(pools_dir):
    op = ops.make_op("hard_negatives", CONTEXT, dir=pools_dir)
    op.prepare()
    clone = pickle.loads(pickle.dumps(op))
    assert clone._pools is None
    assert draw(clone, "two dogs", 1) == draw(op, "two dogs", 1)


class CaptionSource:
    """Example i has the captions of POOLS in turn, two of them per example (choose_caption picks one)."""

    captions = list(POOLS)

    def __len__(self):
        return 12

    def __getitem__(self, index):
        return {"caption": [self.captions[index % 3], self.captions[(index + 1) % 3]], "value": np.int64(index)}


def negatives_dataset(pools_dir):
    preprocess = ops.Preprocess(ops.make_ops(
        f"choose_caption|hard_negatives(dir={pools_dir!r})|keep(fields=('value',))|"
        "tokenize(field='caption', out='token_ids', count_truncated=False)|"
        "tokenize(field='negative_captions', out='negative_token_ids', max_count=3)", CONTEXT))
    assert set(preprocess.fields) == {"value", "token_ids", "negative_token_ids", "negative_mask"}
    return pipeline.training_dataset([(CaptionSource(), 1.0, 5)], preprocess, global_batch_size=4,
                                     shard=pipeline.HostShard(0, 1), num_threads=1)


def test_the_pipeline_resumes_to_the_same_negatives(pools_dir):
    iterator = iter(negatives_dataset(pools_dir))
    for _ in range(4):  # past the first epoch of 12
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(5)]
    resumed = iter(negatives_dataset(pools_dir))
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for field in ("value", "token_ids", "negative_token_ids", "negative_mask"):
            np.testing.assert_array_equal(got[field], want[field])
    masks = np.concatenate([batch["negative_mask"] for batch in expected])
    assert masks.any() and not masks.all(), "empty kinds are masked out, others kept"


def test_negatives_are_fresh_across_epochs(pools_dir):
    iterator = iter(negatives_dataset(pools_dir))
    seen = collections.defaultdict(set)  # (example, caption tokens) -> negatives drawn over epochs
    for _ in range(30):  # 10 epochs of 12 examples
        batch = next(iterator)
        for row in range(4):
            key = (int(batch["value"][row]), batch["token_ids"][row].tobytes())
            seen[key].add(batch["negative_token_ids"][row].tobytes())
    rich = [negatives for (value, _), negatives in seen.items() if len(negatives) > 1]
    assert rich, "the same example and caption gets different negatives in different epochs"


# ----- the config shorthand data.hard_negatives=DIR -------------------------------------------------------

from configs import clip  # noqa: E402
from jclip.config_validation import validate_config  # noqa: E402
from jclip.data import configured  # noqa: E402
from jclip.errors import ConfigError  # noqa: E402
from jclip.losses import Reads, register_term  # noqa: E402


@register_term("test_reads_hard_negatives", reads=Reads(batch=("negative_token_ids", "negative_mask")))
def reads_hard_negatives(outputs, batch, ctx):
    """A stand-in for FSC-CLIP's terms: it only declares that it reads the negatives."""
    return 0.0, {}


def test_the_shorthand_inserts_the_op_after_choose_caption_and_tokenizes_the_negatives(pools_dir):
    config = clip.get_config()
    config.data.hard_negatives = pools_dir
    data = configured.ConfiguredData(config.data, config.model)
    assert data.preprocess_spec() == (
        f"choose_caption|hard_negatives(dir={pools_dir!r})|decode_image|crop_image|normalise_image|"
        "tokenize(field='caption', out='token_ids')|"
        "tokenize(field='negative_captions', out='negative_token_ids', max_count=3)")
    fields = data.batch_fields()
    assert fields["negative_token_ids"] == fields["negative_mask"] == "tokenize"
    assert "negative_captions" not in fields and "caption" not in fields


def test_the_shorthand_keeps_a_preprocess_that_draws_negatives_itself(pools_dir):
    config = clip.get_config()
    config.data.hard_negatives = pools_dir
    own = (f"choose_caption|hard_negatives(dir={pools_dir!r}, kinds=('swap',))|decode_image|crop_image|"
           "normalise_image|tokenize|tokenize(field='negative_captions', out='negative_token_ids', max_count=1)")
    config.data.preprocess = own
    assert configured.ConfiguredData(config.data, config.model).preprocess_spec() == own
    config.data.preprocess = "decode_image|crop_image(scale=(0.9, 1.0))|normalise_image|tokenize"  # no choose_caption
    assert configured.ConfiguredData(config.data, config.model).preprocess_spec() == (
        f"hard_negatives(dir={pools_dir!r})|decode_image|crop_image(scale=(0.9, 1.0))|normalise_image|tokenize|"
        "tokenize(field='negative_captions', out='negative_token_ids', max_count=3)")


def test_a_missing_pools_folder_is_a_start_up_error(tmp_path):
    config = clip.get_config()
    config.data.hard_negatives = str(tmp_path / "absent")
    config.losses = {"clip": {"weight": 1.0}, "test_reads_hard_negatives": {"weight": 1.0}}
    with pytest.raises(ConfigError, match=r"data.hard_negatives: negative pools: no folder .*absent; make it with "
                                          r"python -m jclip.make_negatives"):
        validate_config(config)


def test_the_negatives_must_be_read_by_a_term(pools_dir):
    config = clip.get_config()
    config.data.hard_negatives = pools_dir
    with pytest.raises(ConfigError, match=r"the preprocessing writes \['negative_mask', 'negative_token_ids'\] "
                                          r"\(tokenize\), which no loss term or tower reads"):
        validate_config(config)
    config.losses = {"clip": {"weight": 1.0}, "test_reads_hard_negatives": {"weight": 1.0}}
    validate_config(config)


def test_training_batches_carry_each_captions_own_negatives(tmp_path, scenes_data_dir):
    config = clip.get_config()
    config.data.embedded_config, config.data.data_dir = "small", str(scenes_data_dir)
    config.data.batch_size, config.data.num_threads = 8, 1
    config.model.text.context_length = 32
    raw = configured.ConfiguredData(config.data, config.model).source("train")
    captions = {raw[i]["caption"] for i in range(len(raw))}
    # Pools that name their caption: "<caption> swapped" (one candidate), a replace only for every other
    # caption, no shuffle at all.
    results = [Result(c, {"swap": (f"{c} swapped",), "replace": (f"{c} replaced",) if n % 2 else (), "shuffle": ()})
               for n, c in enumerate(sorted(captions))]
    config.data.hard_negatives = str(negative_pools.write_pools(tmp_path / "pools", results, backend="fake", seed=0))
    config.losses = {"clip": {"weight": 1.0}, "test_reads_hard_negatives": {"weight": 1.0}}
    validate_config(config)
    data = configured.ConfiguredData(config.data, config.model)
    data.prepare(set())
    tokenizer = data.train_ops()[-1].tokenizer
    replaced = {c for n, c in enumerate(sorted(captions)) if n % 2}
    iterator = iter(data.training_dataset(seed=0, shard=pipeline.HostShard(0, 1)))
    for _ in range(2):
        batch = next(iterator)
        assert batch["negative_token_ids"].shape == (8, 3, 32) and batch["negative_mask"].shape == (8, 3)
        for row in range(8):
            (caption,) = [c for c in captions if np.array_equal(tokenizer(c), batch["token_ids"][row])]
            expected = [f"{caption} swapped"] + ([f"{caption} replaced"] if caption in replaced else [])
            assert batch["negative_mask"][row].tolist() == [True] * len(expected) + [False] * (3 - len(expected))
            for k, text in enumerate(expected):
                np.testing.assert_array_equal(batch["negative_token_ids"][row, k], tokenizer(text))
            assert not batch["negative_token_ids"][row, len(expected):].any()
