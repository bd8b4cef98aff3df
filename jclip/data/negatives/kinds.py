"""The three hard-negative kinds of FSC-CLIP (Oh et al., EMNLP 2024), after NegCLIP and SugarCrepe.

- swap: exchange two differing spans of one type (two noun chunks, two adjectives, two colours, ...), except
  two items of one list ("a red circle and a blue square"), whose exchange is a paraphrase, not a negative.
- replace: put one of a slot's alternatives in its place (another colour, a sibling noun, "below" for "above").
- shuffle: cut the tokens into consecutive pairs and shuffle the pairs (NegCLIP's bigram shuffle).

Each returns every candidate it can make, in a fixed order, possibly with duplicates or the caption itself;
the generator removes those and subsamples.
"""

from __future__ import annotations

import itertools

import numpy as np

from jclip.data.negatives.text import Parsed, Token, fix_articles, normalise, render

_FINAL_PUNCTUATION = (".", "!", "?")
#: Words that join the items of a list, whose order carries no meaning (with the articles that open an item).
LIST_SEPARATORS = frozenset({",", ";", "and", "or", "&", "+", "a", "an", "the"})


def _with_space(segment: list[Token], space: str) -> list[Token]:
    """A segment moved elsewhere takes the whitespace that followed the segment it replaces."""
    last = segment[-1]
    return segment[:-1] + [Token(last.text, space, last.pos)]


def _sentence_case(first: Token) -> bool:
    """Whether a first token is capitalised only because it starts the caption."""
    return first.text[:1].isupper() and not (len(first.text) > 1 and first.text.isupper()) and first.pos != "PROPN"


def _recase(segment: list[Token], upper: bool) -> list[Token]:
    head = segment[0].text
    head = head[:1].upper() + head[1:] if upper else head[:1].lower() + head[1:]
    return [Token(head, segment[0].space, segment[0].pos)] + segment[1:]


def swap_pair(tokens: tuple[Token, ...], a: tuple[int, int], b: tuple[int, int]) -> str:
    """The caption with spans a and b (a before b, not overlapping) exchanged."""
    seg_a, seg_b = list(tokens[a[0] : a[1]]), list(tokens[b[0] : b[1]])
    if a[0] == 0 and _sentence_case(tokens[0]):
        seg_a, seg_b = _recase(seg_a, upper=False), _recase(seg_b, upper=True)
    new = (
        list(tokens[: a[0]])
        + _with_space(seg_b, tokens[a[1] - 1].space)
        + list(tokens[a[1] : b[0]])
        + _with_space(seg_a, tokens[b[1] - 1].space)
        + list(tokens[b[1] :])
    )
    second = a[0] + len(seg_b) + (b[0] - a[1])  # where seg_a lands in `new`
    return render(fix_articles(new, (a[0] - 1, second - 1)))


def same_list(tokens: tuple[Token, ...], spans: list[tuple[int, int]], a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether spans a and b (a before b) are items of one list: only list separators and other spans of their
    type lie between them ("a red circle, a green star and a blue square")."""
    ends = {start: end for start, end in spans}
    position = a[1]
    while position < b[0]:
        if ends.get(position, b[0] + 1) <= b[0]:
            position = ends[position]
        elif tokens[position].text.lower() in LIST_SEPARATORS:
            position += 1
        else:
            return False
    return True


def swap(parsed: Parsed) -> list[str]:
    """Every swap of two differing, non-overlapping spans of one type that are not items of one list (swapping
    those, as in "a blue square and a red circle", would give a paraphrase of the caption)."""
    out = []
    for spans in parsed.swap_spans.values():
        spans = sorted(set(spans))
        for a, b in itertools.combinations(spans, 2):
            if a[1] > b[0] or same_list(parsed.tokens, spans, a, b):
                continue
            if normalise(render(parsed.tokens[a[0] : a[1]])) == normalise(render(parsed.tokens[b[0] : b[1]])):
                continue
            out.append(swap_pair(parsed.tokens, a, b))
    return out


def replace(parsed: Parsed) -> list[str]:
    """Every caption with one slot replaced by one of its alternatives."""
    out = []
    tokens = parsed.tokens
    for slot in parsed.slots:
        for alternative in slot.alternatives:
            new = [*tokens[: slot.start], Token(alternative, tokens[slot.end - 1].space), *tokens[slot.end :]]
            out.append(render(fix_articles(new, (slot.start - 1,))))
    return out


def _pairs(tokens: tuple[Token, ...]) -> list[str]:
    pairs = []
    for i in range(0, len(tokens), 2):
        pair = tokens[i : i + 2]
        pairs.append(pair[0].text + (pair[0].space[:1] + pair[1].text if len(pair) == 2 else ""))
    return pairs


def shuffle(tokens: tuple[Token, ...], rng: np.random.Generator, count: int, tries: int = 10) -> list[str]:
    """Up to `count` distinct bigram shuffles that differ from the caption; stops after `tries` draws in a row
    that bring nothing new (FSC-CLIP tries 10 times to differ from the caption).

    A final ".", "!" or "?" is held out and put back at a random place between the pairs, as in FSC-CLIP.
    """
    caption = normalise(render(tokens))
    final = None
    if tokens and tokens[-1].text in _FINAL_PUNCTUATION:
        tokens, final = tokens[:-1], tokens[-1].text
    pairs = _pairs(tokens)
    out: dict[str, str] = {}
    misses = 0
    while len(out) < count and misses < tries:
        items = [pairs[i] for i in rng.permutation(len(pairs))]
        if final is not None:
            items.insert(int(rng.integers(len(items) + 1)), final)
        text = " ".join(items)
        key = normalise(text)
        if key != caption and key not in out:
            out[key] = text
            misses = 0
        else:
            misses += 1
    return list(out.values())
