"""The built-in lexicon: classes of interchangeable words, for negatives without spaCy or WordNet.

A class (colours, sizes, spatial relations, shapes, animals, ...) holds groups of words. Words in one group mean
about the same ("grey"/"gray", "below"/"under"); different groups of a class exclude each other ("red" vs "blue",
"above" vs "below"). A replacement takes a word from another group of the same class, so it is never a synonym
by construction; a swap exchanges two words of the same class. This follows the replace/swap negatives of
FSC-CLIP (Oh et al., EMNLP 2024), NegCLIP (Yuksekgonul et al., 2023) and SugarCrepe (Hsieh et al., 2023),
restricted to a closed vocabulary: colours, sizes, numbers and spatial prepositions cover most attribute and
relation words of short captions, and the noun classes let "replace" change objects too.

`also` words are recognised (so they are replaced, and never proposed as a replacement for their own group)
but never proposed themselves, e.g. "on the left of" is recognised, "to the left of" is what others become.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from jclip.data.negatives.text import match_case


@dataclasses.dataclass(frozen=True)
class Group:
    """Words of one meaning: `words` are proposed as replacements, `also` only recognised."""

    words: tuple[str, ...]
    also: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class WordClass:
    """Interchangeable groups of one kind of word ("adj", "noun", "number", "relation")."""

    name: str
    kind: str
    groups: tuple[Group, ...]


def _singles(name: str, kind: str, *words: str | tuple[str, ...]) -> WordClass:
    groups = tuple(Group(w if isinstance(w, tuple) else (w,)) for w in words)
    return WordClass(name, kind, groups)


CLASSES: tuple[WordClass, ...] = (
    _singles("colour", "adj", "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black",
             "white", ("grey", "gray")),
    WordClass("size", "adj", (Group(("small", "tiny"), also=("little",)), Group(("large", "big"), also=("huge",)))),
    _singles("height", "adj", "tall", "short"),
    _singles("length", "adj", "long", "short"),
    _singles("age", "adj", "young", "old"),
    _singles("state", "adj", "open", "closed"),
    _singles("fullness", "adj", "empty", "full"),
    _singles("wetness", "adj", "wet", "dry"),
    _singles("temperature", "adj", "hot", "cold"),
    _singles("cleanliness", "adj", "clean", "dirty"),
    _singles("thickness", "adj", "thick", "thin"),
    _singles("width", "adj", "wide", "narrow"),
    _singles("speed", "adj", "fast", "slow"),
    _singles("mood", "adj", "happy", "sad"),
    # "one" is left out: changing it to "two" would need the noun after it in the plural.
    _singles("number", "number", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"),
    WordClass("relation", "relation", (
        Group(("on",), also=("on top of", "atop")),
        Group(("above",), also=("over",)),
        Group(("below", "under"), also=("beneath", "underneath")),
        Group(("to the left of",), also=("left of", "on the left of")),
        Group(("to the right of",), also=("right of", "on the right of")),
        Group(("next to",), also=("beside", "near")),
        Group(("behind",)),
        Group(("in front of",)),
        Group(("inside",), also=("in", "within")),
        Group(("outside",), also=("outside of",)),
    )),
    _singles("shape", "noun", "circle", "square", "triangle", "star", "cross", "rectangle", "hexagon", "pentagon",
             "heart", "arrow", "crescent", ("diamond", "rhombus"), ("oval", "ellipse")),
    _singles("animal", "noun", "dog", "cat", "horse", "cow", "sheep", "bird", "elephant", "giraffe", "zebra",
             "bear", "duck", "rabbit"),
    _singles("vehicle", "noun", "car", "bus", ("truck", "lorry"), "train", "bicycle",
             ("motorcycle", "motorbike"), "boat", ("airplane", "aeroplane", "plane")),
    _singles("furniture", "noun", "table", "chair", "bed", ("sofa", "couch"), "desk", "bench", "shelf"),
    _singles("food", "noun", "apple", "banana", "pizza", "cake", "sandwich", "bread", "carrot", "broccoli",
             ("donut", "doughnut")),
    _singles("person", "noun", "man", "woman", "boy", "girl"),
)

_IRREGULAR_PLURALS = {"man": "men", "woman": "women", "sheep": "sheep", "shelf": "shelves", "person": "people"}


def plural(noun: str) -> str:
    """The English plural of a lexicon noun (lower case)."""
    if noun in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


@dataclasses.dataclass(frozen=True)
class Entry:
    """A surface form's place in the lexicon; `number` is "sg"/"pl" for nouns, "" otherwise."""

    word_class: WordClass
    group: int
    number: str


def _build_index() -> dict[tuple[str, ...], tuple[Entry, ...]]:
    index: dict[tuple[str, ...], list[Entry]] = {}
    for word_class in CLASSES:
        for g, group in enumerate(word_class.groups):
            for word in group.words + group.also:
                forms = [(word, "sg"), (plural(word), "pl")] if word_class.kind == "noun" else [(word, "")]
                for form, number in forms:
                    index.setdefault(tuple(form.split()), []).append(Entry(word_class, g, number))
    return {key: tuple(entries) for key, entries in index.items()}


_INDEX = _build_index()
_LONGEST = max(len(key) for key in _INDEX)


@dataclasses.dataclass(frozen=True)
class Match:
    """Words [start, end) of a caption found in the lexicon."""

    start: int
    end: int
    entries: tuple[Entry, ...]

    def swap_types(self) -> tuple[str, ...]:
        """The swap types this match takes part in: its class, and nouns by grammatical number."""
        types = []
        for entry in self.entries:
            if entry.word_class.kind == "noun":
                types.append(f"noun_{entry.number}")
            else:
                types.append(entry.word_class.name)
        return tuple(dict.fromkeys(types))


def find(words: Sequence[str]) -> list[Match]:
    """Lexicon words and phrases in `words` (any case), longest first, left to right, not overlapping."""
    lower = [w.lower() for w in words]
    matches = []
    i = 0
    while i < len(lower):
        for length in range(min(_LONGEST, len(lower) - i), 0, -1):
            entries = _INDEX.get(tuple(lower[i : i + length]))
            if entries:
                matches.append(Match(i, i + length, entries))
                i += length
                break
        else:
            i += 1
    return matches


def alternatives(match: Match, original: Sequence[str]) -> tuple[str, ...]:
    """Replacements for a match: words of the other groups of its classes, in its number and case.

    A word in several classes ("short": height and length) gets the union; a word of the same group as any of
    the match's entries is excluded, so "short" never becomes something meaning "short".
    """
    excluded = {(entry.word_class.name, entry.group) for entry in match.entries}
    template = original[match.start]
    found: list[str] = []
    for entry in match.entries:
        for g, group in enumerate(entry.word_class.groups):
            if (entry.word_class.name, g) in excluded:
                continue
            for word in group.words:
                text = plural(word) if entry.number == "pl" else word
                found.append(match_case(template, text))
    own = {" ".join(original[match.start : match.end]).lower()}
    return tuple(w for w in dict.fromkeys(found) if w.lower() not in own)
