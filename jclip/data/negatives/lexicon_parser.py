"""The fallback parser: regex tokens plus the built-in lexicon, pure Python, nothing to download.

Swap spans are lexicon words of one class (two colours, two sizes, two singular nouns, two relations, ...) and
"phrases" (lexicon adjectives followed by a lexicon noun, "blue square" <-> "red circle", which turns "a blue
diamond above a red triangle" into its relation swap). Replace slots are every lexicon match.
"""

from __future__ import annotations

from jclip.data.negatives import lexicon
from jclip.data.negatives.text import Parsed, Slot, Token, tokenize


def phrase_spans(matches: list[lexicon.Match]) -> list[tuple[int, int]]:
    """Spans of lexicon adjectives directly followed by a lexicon noun ("large blue square")."""
    spans = []
    run_start = None
    previous_end = None
    for match in matches:
        kinds = {entry.word_class.kind for entry in match.entries}
        contiguous = previous_end == match.start
        if "noun" in kinds and run_start is not None and contiguous:
            spans.append((run_start, match.end))
            run_start = None
        elif "adj" in kinds:
            run_start = run_start if (run_start is not None and contiguous) else match.start
        else:
            run_start = None
        previous_end = match.end
    return spans


def parse_tokens(tokens: tuple[Token, ...], matches: list[lexicon.Match]) -> tuple[dict, tuple[Slot, ...]]:
    """Swap spans by type and replace slots from the lexicon matches of a token sequence."""
    words = [t.text for t in tokens]
    spans: dict[str, list[tuple[int, int]]] = {}
    slots = []
    for match in matches:
        for swap_type in match.swap_types():
            spans.setdefault(swap_type, []).append((match.start, match.end))
        alternatives = lexicon.alternatives(match, words)
        if alternatives:
            slots.append(Slot(match.start, match.end, alternatives))
    phrases = phrase_spans(matches)
    if phrases:
        spans["phrase"] = phrases
    return {k: tuple(v) for k, v in spans.items()}, tuple(slots)


class LexiconParser:
    """Parses captions with the regex tokenizer and the built-in lexicon; needs neither spaCy nor WordNet."""

    name = "lexicon (built-in; no spaCy, no WordNet)"

    def parse(self, captions: list[str]) -> list[Parsed]:
        parsed = []
        for caption in captions:
            tokens = tokenize(caption)
            spans, slots = parse_tokens(tokens, lexicon.find([t.text for t in tokens]))
            parsed.append(Parsed(tokens, spans, slots))
        return parsed
