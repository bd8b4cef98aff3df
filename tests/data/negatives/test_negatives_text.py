"""Tests of jclip.data.negatives.text: tokens, comparison form, case, articles, bad captions, per-caption RNG."""

from __future__ import annotations

import pytest

from jclip.data.negatives.text import (
    Token,
    caption_problem,
    caption_rng,
    fix_articles,
    match_case,
    normalise,
    render,
    tokenize,
)


def test_tokenize_keeps_whitespace_and_splits_punctuation():
    tokens = tokenize("three shapes: white  circle, next-to it's")
    assert [t.text for t in tokens] == ["three", "shapes", ":", "white", "circle", ",", "next-to", "it's"]
    assert tokens[1].space == "" and tokens[3].space == "  "
    assert render(tokens) == "three shapes: white  circle, next-to it's"


def test_normalise_ignores_case_and_spacing():
    assert normalise("A  Red circle , blue") == normalise("a red circle, blue") == "a red circle , blue"
    assert normalise("a red circle") != normalise("a circle red")


@pytest.mark.parametrize(
    "template, word, expected",
    [("dog", "cat", "cat"), ("Dog", "cat", "Cat"), ("DOGS", "cats", "CATS"), ("Above", "to the left of", "To the left of")],
)
def test_match_case(template, word, expected):
    assert match_case(template, word) == expected


def test_fix_articles_agrees_with_next_word():
    tokens = [Token("An"), Token("green"), Token("cross"), Token("and"), Token("a"), Token("orange"), Token("star", "")]
    assert render(fix_articles(tokens, range(len(tokens)))) == "A green cross and an orange star"
    assert render(fix_articles(tokens, [0])) == "A green cross and a orange star"  # only where asked
    tokens = [Token("an"), Token("unicorn"), Token("a"), Token("hour", "")]
    assert render(fix_articles(tokens, [-1, 0, 2, 3, 9])) == "a unicorn an hour"


@pytest.mark.parametrize(
    "caption, problem",
    [
        ("", "empty"),
        ("   \n", "empty"),
        ("dog", "one_word"),
        ("  Dog.  ", "one_word"),
        ("一只猫在桌子上", "not_english"),
        ("一只猫 在 桌子上 cat", "not_english"),
        ("Собака на столе", "not_english"),
        ("12 34", "not_english"),
        (" ".join(["word"] * 500), "too_long"),
        ("a red circle", None),
        ("café au lait on a table", None),
    ],
)
def test_caption_problem(caption, problem):
    assert caption_problem(caption, max_words=100) == problem


def test_caption_rng_depends_on_seed_caption_and_kind_only():
    draw = lambda *key: caption_rng(*key).integers(1 << 30, size=4).tolist()  # noqa: E731
    assert draw(0, "a cat", "swap") == draw(0, "a cat", "swap")
    assert draw(0, "a cat", "swap") != draw(1, "a cat", "swap")
    assert draw(0, "a cat", "swap") != draw(0, "a dog", "swap")
    assert draw(0, "a cat", "swap") != draw(0, "a cat", "replace")
