"""`split_sentences`: sentence ends at . ! ? and ellipses (with closing quotes and brackets), but not inside
abbreviations, initialisms or decimals; whitespace collapsed; a missing final full stop still ends the text."""

from __future__ import annotations

import pytest

from jclip.data.sentences import split_sentences
from jclip.evals import retrieval


@pytest.mark.parametrize("text, expected", [
    ("A red kite flies high. It has a long tail. The sky is clear and blue.",
     ["A red kite flies high.", "It has a long tail.", "The sky is clear and blue."]),
    ("Two boats rest on a lake! Are their sails white? Yes!? Maybe.",
     ["Two boats rest on a lake!", "Are their sails white?", "Yes!?", "Maybe."]),
    ("a red box. a blue ball.", ["a red box.", "a blue ball."]),  # lower-case captions split too
    ("A cat on a mat. It sleeps", ["A cat on a mat.", "It sleeps"]),  # no final full stop
    ("one sentence without a stop", ["one sentence without a stop"]),
])
def test_plain_sentence_ends(text, expected):
    assert split_sentences(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("Mr. Lee and Dr. Ng stand on St. Mark's square. They wave.",
     ["Mr. Lee and Dr. Ng stand on St. Mark's square.", "They wave."]),
    ("Fruit, e.g. apples, i.e. red ones, lie in a bowl. It is blue.",
     ["Fruit, e.g. apples, i.e. red ones, lie in a bowl.", "It is blue."]),
    ("A U.S. flag flies vs. the wind, approx. 10 m up. It is large.",
     ["A U.S. flag flies vs. the wind, approx. 10 m up.", "It is large."]),
    ("Bus No. 5 waits. The answer was no. It left.", ["Bus No. 5 waits.", "The answer was no.", "It left."]),
    ("A book by J. R. R. Tolkien lies open. Its pages are yellow.",
     ["A book by J. R. R. Tolkien lies open.", "Its pages are yellow."]),
    ("Pens, pencils, etc. lie around. Cups, plates, etc. The table is wood.",
     ["Pens, pencils, etc. lie around.", "Cups, plates, etc.", "The table is wood."]),
])
def test_abbreviations_do_not_end_sentences(text, expected):
    assert split_sentences(text) == expected


def test_decimals_are_not_split():
    assert split_sentences("The board is 3.5 m wide and 0.25 m thick. A 1.75 kg weight sits on it.") == [
        "The board is 3.5 m wide and 0.25 m thick.", "A 1.75 kg weight sits on it."]


def test_an_ellipsis_ends_a_sentence_only_before_a_capital():
    assert split_sentences("He waited... and waited… Then he left.") == ["He waited... and waited…", "Then he left."]


def test_closing_quotes_and_brackets_stay_with_their_sentence():
    assert split_sentences('A sign says "stop." A car waits. (It is red.) Nobody walks.') == [
        'A sign says "stop."', "A car waits.", "(It is red.)", "Nobody walks."]
    assert split_sentences("It reads 'open!' \"Come in.\" The door is ajar.") == [
        "It reads 'open!'", '"Come in."', "The door is ajar."]


def test_whitespace_newlines_and_paragraph_breaks():
    text = "  Too   many\nspaces  here.   And a\tline\n\nA paragraph without a stop\n\n\nLast one.  \n"
    assert split_sentences(text) == ["Too many spaces here.", "And a line", "A paragraph without a stop", "Last one."]
    assert split_sentences("") == [] and split_sentences(" \n\t ") == []


def test_retrieval_splits_with_the_same_rules_and_keeps_a_text_without_sentences_whole():
    assert retrieval.split_sentences("Dr. Ng holds a 2.5 kg fish. It shines.") == ["Dr. Ng holds a 2.5 kg fish.", "It shines."]
    assert retrieval.split_sentences("   ") == ["   "]
