"""Tests of the built-in lexicon and the fallback parser (jclip.data.negatives.lexicon, lexicon_parser)."""

from __future__ import annotations

import itertools

import pytest

from jclip.data.negatives import lexicon
from jclip.data.negatives.lexicon_parser import LexiconParser, phrase_spans


def _alternatives(text: str) -> dict[str, tuple[str, ...]]:
    words = text.split()
    return {" ".join(words[m.start : m.end]): lexicon.alternatives(m, words) for m in lexicon.find(words)}


def test_find_prefers_the_longest_phrase():
    words = "a star to the left of a cross in front of an oval".split()
    found = [" ".join(words[m.start : m.end]) for m in lexicon.find(words)]
    assert found == ["star", "to the left of", "cross", "in front of", "oval"]


def test_relations_become_other_relations_never_their_synonyms():
    alternatives = _alternatives("star above circle")["above"]
    assert "below" in alternatives and "to the left of" in alternatives
    assert not {"above", "over"} & set(alternatives)
    under = _alternatives("cat under table")["under"]
    assert not {"below", "under", "beneath", "underneath"} & set(under) and "above" in under
    assert lexicon.find(["of"]) == [] and lexicon.find(["for"]) == []


def test_sizes_and_colours_never_become_synonyms():
    assert set(_alternatives("small dog")["small"]) == {"large", "big"}
    assert set(_alternatives("big dog")["big"]) == {"small", "tiny"}
    assert "gray" not in _alternatives("grey dog")["grey"] and "grey" not in _alternatives("gray dog")["gray"]
    assert "blue" in _alternatives("grey dog")["grey"]


def test_a_word_in_two_classes_gets_both_antonyms():
    assert set(_alternatives("short dog")["short"]) == {"tall", "long"}


def test_nouns_keep_number_and_case():
    alternatives = _alternatives("Two Dogs")
    assert "Cats" in alternatives["Dogs"] and "Cat" not in alternatives["Dogs"]
    assert "Men" in _alternatives("two Women")["Women"]
    assert "CROSSES" in _alternatives("TWO STARS")["STARS"]
    assert "Three" in alternatives["Two"] and "One" not in alternatives["Two"]


@pytest.mark.parametrize(
    "noun, expected",
    [("cross", "crosses"), ("bus", "buses"), ("man", "men"), ("shelf", "shelves"), ("circle", "circles")],
)
def test_plural(noun, expected):
    assert lexicon.plural(noun) == expected


def test_no_surface_form_is_in_two_groups_of_one_class():
    for word_class in lexicon.CLASSES:
        for (i, a), (j, b) in itertools.combinations(enumerate(word_class.groups), 2):
            assert not set(a.words + a.also) & set(b.words + b.also), (word_class.name, a, b)


def test_phrase_spans_are_adjectives_then_a_noun():
    words = "a large blue square above red circle and green".split()
    spans = phrase_spans(lexicon.find(words))
    assert [" ".join(words[s:e]) for s, e in spans] == ["large blue square", "red circle"]


def test_lexicon_parser_swap_types():
    [parsed] = LexiconParser().parse(["Two dogs and three cats near a red car, a blue bus"])
    words = [t.text for t in parsed.tokens]
    by_type = {k: [" ".join(words[s:e]) for s, e in v] for k, v in parsed.swap_spans.items()}
    assert by_type["number"] == ["Two", "three"]
    assert by_type["noun_pl"] == ["dogs", "cats"]
    assert by_type["noun_sg"] == ["car", "bus"]
    assert by_type["colour"] == ["red", "blue"]
    assert by_type["phrase"] == ["red car", "blue bus"]
