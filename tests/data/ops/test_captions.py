"""Caption ops of the improved-captions method: `caption_rule` (short or dense caption by rule, per example
and per epoch; a missing dense caption is a counted skip, never a fall-back) and `sample_sentences` (a random
subset of a caption's sentences in their order); both deterministic per rng seed and exact after a resume."""

from __future__ import annotations

import collections
import itertools

import numpy as np
import pytest

from jclip.data import ops, pipeline, robust
from jclip.data.robust import BadExample

CONTEXT = ops.OpContext(image_size=16, context_length=16)
SHORT, DENSE = "a cube", "A red cube sits on a table. The table is wooden. A lamp glows behind it."


def rule_op(rule, **kwargs):
    return ops.make_op("caption_rule", CONTEXT, rule=rule, **kwargs)


def chosen(op, example, seed=None, epoch=None):
    example = {**example, **({} if epoch is None else {pipeline.EPOCH_FIELD: epoch})}
    return op(example, None if seed is None else np.random.default_rng(seed))["caption"]


EXAMPLE = {"caption": SHORT, "dense_caption": DENSE, "key": "k"}


# ----- caption_rule -------------------------------------------------------------------------------------------

def test_dense_and_short_always_take_their_field_in_training_and_evaluation():
    dense, short = rule_op("dense"), rule_op("short")
    assert dense.reads == ("caption", "dense_caption") and dense.writes == ("caption",)
    assert dense.consumes == ("dense_caption",), "the dense caption is not batched"
    for seed in (None, 0, 1, 2):
        assert chosen(dense, EXAMPLE, seed) == DENSE
        assert chosen(short, EXAMPLE, seed) == SHORT
    assert chosen(short, {"caption": SHORT}, 0) == SHORT, "short needs no dense caption"


def test_mixed_takes_the_dense_caption_with_probability_p_per_example_seed():
    op = rule_op("mixed:0.3")
    picks = [chosen(op, EXAMPLE, seed) for seed in range(4000)]
    assert set(picks) == {SHORT, DENSE}
    assert abs(picks.count(DENSE) / 4000 - 0.3) < 0.03
    assert [chosen(op, EXAMPLE, seed) for seed in range(50)] == picks[:50], "same seed, same choice"
    assert chosen(op, EXAMPLE) == DENSE, "evaluation takes the dense caption"
    assert {chosen(rule_op("mixed:0"), EXAMPLE, s) for s in range(20)} == {SHORT}
    assert {chosen(rule_op("mixed:1"), EXAMPLE, s) for s in range(20)} == {DENSE}


def test_alternate_takes_dense_in_even_epochs_and_short_in_odd_ones():
    op = rule_op("alternate")
    assert [chosen(op, EXAMPLE, 0, epoch) for epoch in range(5)] == [DENSE, SHORT, DENSE, SHORT, DENSE]
    assert chosen(op, EXAMPLE) == DENSE, "evaluation takes the dense caption"
    with pytest.raises(ValueError, match="needs the example's epoch"):
        chosen(op, EXAMPLE, 0)


def test_several_captions_in_a_field_are_picked_like_choose_caption():
    op = rule_op("dense")
    example = {"caption": SHORT, "dense_caption": ["first dense.", "second dense.", "   "]}
    assert {chosen(op, example, seed) for seed in range(40)} == {"first dense.", "second dense."}
    assert chosen(op, example) == "first dense."
    assert chosen(rule_op("short"), {"caption": [b"one", "two"]}) == "one"


@pytest.mark.parametrize("dense", [None, "", "   \n", [], ["", "  "]])
def test_a_missing_dense_caption_is_a_counted_skip_never_the_short_one(dense):
    example = {"caption": SHORT, "dense_caption": dense}
    for rule in ("dense", "mixed:1", "alternate"):
        with pytest.raises(BadExample) as raised:
            chosen(rule_op(rule), example, 0, epoch=0)
        assert raised.value.reason == "missing_dense_caption"
    with pytest.raises(BadExample, match="missing_dense_caption"):
        chosen(rule_op("dense"), {"caption": SHORT})  # evaluation too
    assert chosen(rule_op("alternate"), example, 0, epoch=1) == SHORT
    skipped = ops.Preprocess([rule_op("dense")])(example, np.random.default_rng(0))
    assert skipped == robust.Skipped("missing_dense_caption", None, skipped.detail)


def test_a_bad_chosen_caption_keeps_its_own_reason():
    with pytest.raises(BadExample, match="undecodable_caption"):
        chosen(rule_op("dense"), {"caption": SHORT, "dense_caption": b"\xff\xfe bad"}, 0)
    with pytest.raises(BadExample, match="missing_caption"):
        chosen(rule_op("short"), {"dense_caption": DENSE}, 0)


def test_fields_are_configurable_and_bad_rules_are_refused():
    op = rule_op("dense", short_field="alt", dense_field="long", out="text")
    out = op({"alt": "x", "long": "y"}, None)
    assert out["text"] == "y" and op.consumes == ("alt", "long")
    for rule in ("mixed", "mixed:1.5", "mixed:x", "sometimes", "dense:0.5"):
        with pytest.raises(ValueError, match="caption rule"):
            rule_op(rule)
    with pytest.raises(ValueError, match="must differ"):
        rule_op("dense", dense_field="caption")


class Captioned:
    """20 examples whose dense caption names their index."""

    def __len__(self):
        return 20

    def __getitem__(self, index):
        return {"caption": f"short {index}", "dense_caption": f"dense {index}", "key": str(index)}


def rule_stream(rule, seed=4, shard=pipeline.HostShard(0, 1)):
    op = rule_op(rule)

    def preprocess(example, rng):
        text = op(example, rng)["caption"]
        return {"index": np.int32(text.split()[1]), "dense": np.bool_(text.startswith("dense"))}

    return pipeline.training_dataset([(Captioned(), 1.0, seed)], preprocess, global_batch_size=5, shard=shard,
                                     num_threads=1)


def test_alternate_through_the_pipeline_switches_each_epoch_and_resumes_exactly():
    iterator = iter(rule_stream("alternate"))
    batches = [next(iterator) for _ in range(8)]  # 2 epochs of 20 examples
    dense = np.concatenate([b["dense"] for b in batches])
    assert dense[:20].all() and not dense[20:].any()
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(6)]  # epochs 2 (dense) and the start of 3 (short)
    resumed = iter(rule_stream("alternate"))
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["index"], want["index"])
        np.testing.assert_array_equal(got["dense"], want["dense"])
    assert np.concatenate([b["dense"] for b in expected]).tolist() == [True] * 20 + [False] * 10


def test_mixed_through_the_pipeline_same_seed_same_choices_and_resume():
    first, second, other = (iter(rule_stream("mixed:0.5", seed)) for seed in (4, 4, 5))
    a = np.concatenate([next(first)["dense"] for _ in range(8)])
    b = np.concatenate([next(second)["dense"] for _ in range(8)])
    c = np.concatenate([next(other)["dense"] for _ in range(8)])
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and 0.25 < a.mean() < 0.75
    state = first.get_state()
    expected = [next(first) for _ in range(4)]
    resumed = iter(rule_stream("mixed:0.5", 4))
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["index"], want["index"])
        np.testing.assert_array_equal(got["dense"], want["dense"])


# ----- sample_sentences ---------------------------------------------------------------------------------------

SENTENCES = ["A red cube sits on a table.", "The table is 1.5 m long.", "Dr. Ng stands beside it.",
             "A lamp glows!", "Is it night?"]
TEXT = "  " + "   ".join(SENTENCES) + " \n"


def sample(text=TEXT, seed=0, **kwargs):
    op = ops.make_op("sample_sentences", CONTEXT, **kwargs)
    return op({"caption": text}, None if seed is None else np.random.default_rng(seed))["caption"]


def as_indices(output):
    """The indices of SENTENCES an output is made of (checking it is exactly those, joined by one space)."""
    for size in range(len(SENTENCES), 0, -1):
        for subset in itertools.combinations(range(len(SENTENCES)), size):
            if " ".join(SENTENCES[i] for i in subset) == output:
                return subset
    raise AssertionError(f"not an ordered subset of the sentences: {output!r}")


def test_uniform_sizes_cover_the_range_every_sentence_appears_and_order_is_kept():
    draws = [as_indices(sample(seed=seed)) for seed in range(3000)]
    sizes = collections.Counter(len(d) for d in draws)
    assert set(sizes) == {1, 2, 3, 4, 5}
    assert all(abs(count / 3000 - 1 / 5) < 0.035 for count in sizes.values()), sizes
    appearances = collections.Counter(i for d in draws for i in d)
    assert set(appearances) == set(range(5))
    # P(sentence kept) = E[k] / n = 3 / 5 for k uniform on 1..5.
    assert all(abs(count / 3000 - 0.6) < 0.04 for count in appearances.values()), appearances
    assert len(set(draws)) == 31, "every non-empty subset appears"


def test_uniform_with_bounds():
    draws = [as_indices(sample(seed=seed, min_sentences=2, max_sentences=3)) for seed in range(500)]
    assert {len(d) for d in draws} == {2, 3}
    assert {len(as_indices(sample(seed=s, min_sentences=9))) for s in range(20)} == {5}, "at most all of them"


def test_same_seed_same_subset():
    assert [sample(seed=s) for s in range(30)] == [sample(seed=s) for s in range(30)]
    assert len({sample(seed=s) for s in range(30)}) > 5


def test_bernoulli_keeps_each_sentence_with_p_and_tops_up_to_min_sentences():
    draws = [as_indices(sample(seed=s, distribution="bernoulli:0.5")) for s in range(4000)]
    assert min(len(d) for d in draws) == 1
    # Kept by its own draw (1/2), or added when all five were dropped (1/32) as the one of five chosen.
    expected = 0.5 + (1 / 32) * (1 / 5)
    appearances = collections.Counter(i for d in draws for i in d)
    assert all(abs(count / 4000 - expected) < 0.03 for count in appearances.values()), appearances
    few = [as_indices(sample(seed=s, distribution="bernoulli:0.1", min_sentences=2, max_sentences=3)) for s in range(300)]
    assert {len(d) for d in few} == {2, 3}
    many = [as_indices(sample(seed=s, distribution="bernoulli:1.0", max_sentences=2)) for s in range(300)]
    assert {len(d) for d in many} == {2} and len(set(many)) == 10, "dropped uniformly down to max_sentences"


def test_all_and_evaluation_keep_the_caption_whole():
    assert sample(distribution="all") == TEXT
    assert sample(seed=None) == TEXT
    op = ops.make_op("sample_sentences", CONTEXT, out="short_text")
    out = op({"caption": TEXT}, np.random.default_rng(0))
    assert out["caption"] == TEXT and as_indices(out["short_text"]) and op.writes == ("short_text",)


def test_edge_cases():
    assert {sample("Only one sentence here.", seed=s) for s in range(10)} == {"Only one sentence here."}
    assert {sample("no final stop  ", seed=s) for s in range(10)} == {"no final stop"}
    outputs = {sample("Mr. Lee buys 2.5 kg of rice. It is approx. 3 p.m. now", seed=s) for s in range(40)}
    assert outputs == {"Mr. Lee buys 2.5 kg of rice.", "It is approx. 3 p.m. now",
                       "Mr. Lee buys 2.5 kg of rice. It is approx. 3 p.m. now"}
    for blank in ("", "  \n ", None):
        with pytest.raises(BadExample):
            sample(blank)
    with pytest.raises(ValueError, match="after choose_caption"):
        sample(["A list.", "Of captions."])


@pytest.mark.parametrize("kwargs", [{"distribution": "poisson"}, {"distribution": "bernoulli:0"},
                                    {"distribution": "bernoulli"}, {"distribution": "uniform:3"},
                                    {"min_sentences": 0}, {"min_sentences": 3, "max_sentences": 2}])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError, match="sample_sentences"):
        ops.make_op("sample_sentences", CONTEXT, **kwargs)


class Paragraphs:
    """24 captions of 2..5 numbered sentences."""

    def __len__(self):
        return 24

    def __getitem__(self, index):
        count = 2 + index % 4
        return {"caption": " ".join(f"Item {index} sentence {j}." for j in range(count)), "key": str(index)}


def sentence_stream(seed=11):
    op = ops.make_op("sample_sentences", CONTEXT)

    def preprocess(example, rng):
        text = op(example, rng)["caption"]
        kept = np.zeros(5, bool)
        kept[[int(part.split()[3].rstrip(".")) for part in text.split(". ") if part]] = True
        return {"index": np.int32(example["key"]), "kept": kept}

    return pipeline.training_dataset([(Paragraphs(), 1.0, seed)], preprocess, global_batch_size=6,
                                     shard=pipeline.HostShard(0, 1), num_threads=1)


def test_through_the_pipeline_same_seed_same_batches_and_a_resume_continues_identically():
    first, second = iter(sentence_stream()), iter(sentence_stream())
    for _ in range(6):
        a, b = next(first), next(second)
        np.testing.assert_array_equal(a["index"], b["index"])
        np.testing.assert_array_equal(a["kept"], b["kept"])
    state = first.get_state()
    expected = [next(first) for _ in range(8)]  # into the next epoch: new subsets for the same captions
    resumed = iter(sentence_stream())
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["index"], want["index"])
        np.testing.assert_array_equal(got["kept"], want["kept"])
    assert all(batch["kept"].any(axis=1).all() for batch in expected), "at least one sentence per example"
