"""Tests of jclip.data.negatives.kinds on hand-built parses: swap, replace and bigram shuffle."""

from __future__ import annotations

import collections

import numpy as np

from jclip.data.negatives import kinds
from jclip.data.negatives.text import Parsed, Slot, normalise, tokenize


def _parsed(text: str, spans=None, slots=()) -> Parsed:
    return Parsed(tokenize(text), spans or {}, tuple(slots))


def test_swap_exchanges_spans_of_one_type_only():
    # tokens: 0 a, 1 red, 2 circle, 3 and, 4 a, 5 blue, 6 square
    parsed = _parsed("a red circle and a blue square", {"colour": ((1, 2), (5, 6)), "noun": ((2, 3), (6, 7)), "x": ((3, 4),)})
    assert sorted(kinds.swap(parsed)) == ["a blue circle and a red square", "a red square and a blue circle"]


def test_swap_skips_equal_and_overlapping_spans_and_fixes_articles():
    parsed = _parsed("an orange cross and a red cross", {"noun": ((2, 3), (6, 7)), "adj": ((1, 2), (5, 6)), "np": ((1, 3), (2, 3))})
    assert kinds.swap(parsed) == ["a red cross and an orange cross"]


def test_swap_of_multi_token_spans_keeps_spacing_and_sentence_case():
    parsed = _parsed("Large blue star above small red cross.", {"np": ((0, 3), (4, 7))})
    assert kinds.swap(parsed) == ["Small red cross above large blue star."]


def test_swap_leaves_the_items_of_a_list_in_place():
    """Exchanging two items of one list gives a paraphrase, never a negative; their parts still swap."""
    # tokens: 0 a, 1 red, 2 circle, 3 ",", 4 a, 5 green, 6 star, 7 and, 8 a, 9 blue, 10 square, 11 on, 12 grey, 13 sand
    parsed = _parsed("a red circle, a green star and a blue square on grey sand",
                     {"np": ((0, 3), (4, 7), (8, 11), (12, 14)), "colour": ((1, 2), (5, 6), (9, 10))})
    swaps = kinds.swap(parsed)
    assert "a green star, a red circle and a blue square on grey sand" not in swaps
    assert "a blue square, a green star and a red circle on grey sand" not in swaps  # first and last items
    assert "a red circle, a green star and grey sand on a blue square" in swaps  # across "on": a relation
    assert "a green circle, a red star and a blue square on grey sand" in swaps  # colours bound to other shapes
    assert len(swaps) == 3 + 3  # np: each item with the "on" object; colour: every pair


def test_replace_puts_each_alternative_in_place():
    parsed = _parsed("a cat above an owl", slots=[Slot(2, 3, ("below", "to the left of")), Slot(1, 2, ("elephant",))])
    assert kinds.replace(parsed) == ["a cat below an owl", "a cat to the left of an owl", "an elephant above an owl"]


def _bigrams(text: str) -> collections.Counter:
    return collections.Counter(normalise(text).split())


def test_shuffle_moves_whole_pairs_and_differs_from_caption():
    caption = "a small dog sits on a red sofa today"
    tokens = tokenize(caption)
    out = kinds.shuffle(tokens, np.random.default_rng(0), count=8)
    assert len(out) == 8 and len(set(out)) == 8
    pairs = {"a small", "dog sits", "on a", "red sofa", "today"}
    for text in out:
        assert normalise(text) != normalise(caption)
        assert _bigrams(text) == _bigrams(caption)  # a reordering of the same words
        # Rebuild the text from the pairs: each pair stays together, in its own order.
        rest = text
        while rest:
            head = next((p for p in pairs if rest.startswith(p)), None)
            assert head is not None, f"{text!r} broke a pair"
            rest = rest[len(head) :].lstrip()

def test_shuffle_holds_out_final_punctuation_and_puts_it_back_once():
    tokens = tokenize("A cat sits on the mat.")
    for text in kinds.shuffle(tokens, np.random.default_rng(1), count=10):
        assert text.count(".") == 1 and "." in text.split()  # one full stop, standing alone


def test_shuffle_gives_nothing_when_no_reordering_differs():
    assert kinds.shuffle(tokenize("hello world"), np.random.default_rng(0), count=4) == []
    # Two pairs: one distinct reordering exists, so only that one comes back.
    assert kinds.shuffle(tokenize("red circle blue square"), np.random.default_rng(0), count=4) == ["blue square red circle"]
