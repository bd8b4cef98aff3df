"""Tests of jclip.data.sources.label_captions: templated captions per class, replacement, validation, pickling."""

from __future__ import annotations

import pickle

import pytest

from jclip.data.sources.label_captions import CaptionsFromLabels


class Labelled:
    """Three examples with labels 2, 0, 1, the first with a caption of its own."""

    def __init__(self, names=("apple", "maple_tree", "sea_lion")):
        self.names = names

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> dict:
        return {"image": b"img%d" % index, "caption": "own" if index == 0 else None,
                "label": [2, 0, 1][index], "key": f"k{index}"}

    def class_names(self):
        return None if self.names is None else list(self.names)


TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.")


def test_captions_are_the_filled_templates_of_the_class():
    source = CaptionsFromLabels(Labelled(), None, TEMPLATES)
    assert len(source) == 3 and source.class_names() == ["apple", "maple_tree", "sea_lion"]
    assert source[0] == {"image": b"img0", "caption": ["a photo of a sea lion.", "a blurry photo of a sea lion."],
                         "label": 2, "key": "k0"}
    assert source[1]["caption"] == ["a photo of a apple.", "a blurry photo of a apple."]
    assert source[2]["caption"] == ["a photo of a maple tree.", "a blurry photo of a maple tree."]
    clone = pickle.loads(pickle.dumps(source))
    assert clone[2] == source[2] and clone.class_names() == source.class_names()


def test_given_class_names_win_and_a_source_without_names_is_an_error():
    source = CaptionsFromLabels(Labelled(names=None), ["x", "y", "z"], ["{}"])
    assert [source[i]["caption"] for i in range(3)] == [["z"], ["x"], ["y"]]
    with pytest.raises(ValueError, match="need class names"):
        CaptionsFromLabels(Labelled(names=None), None, TEMPLATES)


@pytest.mark.parametrize("templates", [("a photo",), ("{} and {}",), ("a {0}",), ("a {name}",), ("a {:>5}",),
                                       ("a {",), "a photo of a {}.", (), (3,)])
def test_templates_need_exactly_one_empty_field(templates):
    with pytest.raises(ValueError, match="template"):
        CaptionsFromLabels(Labelled(), None, templates)


def test_escaped_braces_stay_literal():
    source = CaptionsFromLabels(Labelled(), None, ["{{{}}}"])
    assert source[1]["caption"] == ["{apple}"]


def test_a_label_outside_the_class_names_is_an_error():
    source = CaptionsFromLabels(Labelled(), ["only", "two"], TEMPLATES)
    with pytest.raises(IndexError, match="label 2"):
        source[0]
