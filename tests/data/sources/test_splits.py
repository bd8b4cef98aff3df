"""Tests of jclip.data.sources.splits: TFDS-style slices over a seeded permutation, bounds, views, errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from jclip.data.sources import splits


class Numbers:
    """A tiny random-access source whose example i is {"value": i}, with class names."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        return {"value": index, "label": index % 2}

    def class_names(self) -> list[str]:
        return ["even", "odd"]


def values(source) -> list[int]:
    return [source[i]["value"] for i in range(len(source))]


@pytest.mark.parametrize("split, expected", [
    ("train[:90%]", (0, 9)), ("train[90%:]", (9, 10)), ("train[:4]", (0, 4)), ("train[4:]", (4, 10)),
    ("validation[10%:30%]", (1, 3)), ("train[-2:]", (8, 10)), ("train[:-10%]", (0, 9)), ("train[3:3]", (3, 3)),
    ("train[:200]", (0, 10)), ("train[7:2]", (7, 7)), ("train", (0, 10)), ("train[:]", (0, 10)),
])
def test_bounds_over_ten_examples(split, expected):
    assert splits.SplitSpec.parse(split).bounds(10) == expected


def test_percent_bounds_round_to_the_nearest_index():
    # 33% of 10 is 3.3 -> 3; 67% of 10 is 6.7 -> 7; 25% of 6 is 1.5 -> 2 (round half to even), 75% of 6 is 4.5 -> 4.
    assert splits.SplitSpec.parse("x[33%:67%]").bounds(10) == (3, 7)
    assert splits.SplitSpec.parse("x[25%:75%]").bounds(6) == (2, 4)


def test_slices_of_a_cut_are_disjoint_and_cover_everything():
    source = Numbers(101)
    head = splits.select_split(source, "train[:90%]")
    tail = splits.select_split(source, "train[90%:]")
    assert len(head) == 91 and len(tail) == 10  # round(90.9) = 91
    assert set(values(head)).isdisjoint(values(tail))
    assert sorted(values(head) + values(tail)) == list(range(101))


def test_the_order_is_the_seeded_permutation_and_not_the_stored_order():
    source = Numbers(20)
    view = splits.select_split(source, "train[:5]", seed=3)
    assert values(view) == list(np.random.default_rng(3).permutation(20)[:5])
    assert values(view) != list(range(5))
    assert values(splits.select_split(source, "train[:5]", seed=4)) != values(view)
    assert values(splits.select_split(source, "train[5:8]", shuffle=False)) == [5, 6, 7]


def test_class_sorted_sources_give_mixed_slices():
    """1000 examples stored class by class (labels 0..9, 100 each): a 10% tail has most classes."""
    class Sorted(Numbers):
        def __getitem__(self, index):
            return {"value": index, "label": index // 100}

    tail = splits.select_split(Sorted(1000), "train[90%:]")
    labels = [tail[i]["label"] for i in range(len(tail))]
    assert len(set(labels)) == 10 and max(np.bincount(labels)) < 25


def test_the_view_behaves_like_a_source():
    source = Numbers(10)
    assert splits.select_split(source, "train") is source
    assert splits.select_split(source, "validation") is source
    view = splits.select_split(source, "train[2:6]", shuffle=False)
    assert view[0] == {"value": 2, "label": 0} and view[-1] == {"value": 5, "label": 1}
    assert view.class_names() == ["even", "odd"]
    assert view.__getitems__([1, 3]) == [{"value": 3, "label": 1}, {"value": 5, "label": 1}]
    with pytest.raises(IndexError):
        view[4]
    clone = pickle.loads(pickle.dumps(view))
    assert values(clone) == [2, 3, 4, 5] and clone.class_names() == ["even", "odd"]
    assert "train[2:6]" in repr(view) and "4 of 10" in repr(view)


@pytest.mark.parametrize("split", ["train[5]", "train[:5", "train[a:b]", "train[:50%]+test", "train[1.5%:]",
                                   "train[:101%]", "", "train[::2]"])
def test_bad_splits_name_the_split_and_the_accepted_forms(split):
    with pytest.raises(ValueError) as error:
        splits.select_split(Numbers(10), split)
    assert repr(split) in str(error.value) and "train[:90%]" in str(error.value)


def test_an_empty_slice_is_an_error():
    with pytest.raises(ValueError, match="selects no examples"):
        splits.select_split(Numbers(10), "train[5:5]")
