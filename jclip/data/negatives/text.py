"""Captions as tokens: the parsed form every negative kind works on, and the text helpers they share.

Both backends (spaCy, or the built-in regex + lexicon) turn a caption into a `Parsed`: its tokens with their
trailing whitespace, the spans that may be swapped (by type), and the slots that may be replaced (with their
ready-made, inflected and cased alternatives). The kinds in `kinds.py` only rebuild text from these.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Sequence

import numpy as np

#: A word (letters/digits, inner hyphens and apostrophes) or a single other non-space character.
_TOKEN_RE = re.compile(r"\w+(?:[-']\w+)*|[^\w\s]")
_WORD_RE = re.compile(r"\w+")


@dataclasses.dataclass(frozen=True)
class Token:
    """One token: its text, the whitespace after it, and its universal POS tag ("" when not tagged)."""

    text: str
    space: str = " "
    pos: str = ""


@dataclasses.dataclass(frozen=True)
class Slot:
    """Tokens [start, end) that "replace" may exchange for any of `alternatives` (final text, cased)."""

    start: int
    end: int
    alternatives: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Parsed:
    """A caption ready for the negative kinds: tokens, swappable spans by type, replaceable slots."""

    tokens: tuple[Token, ...]
    swap_spans: dict[str, tuple[tuple[int, int], ...]]
    slots: tuple[Slot, ...]


def tokenize(text: str) -> tuple[Token, ...]:
    """Regex tokens with the whitespace that follows each (the lexicon backend's tokenizer)."""
    matches = list(_TOKEN_RE.finditer(text))
    tokens = []
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        tokens.append(Token(match.group(), text[match.end() : end]))
    return tuple(tokens)


def normalise(text: str) -> str:
    """The comparison form: lower case, tokens joined by one space ("A  b ,c" == "a b, c")."""
    return " ".join(_TOKEN_RE.findall(text.lower()))


def render(tokens: tuple[Token, ...] | list[Token]) -> str:
    """Tokens back to text, without leading or trailing whitespace."""
    return "".join(t.text + t.space for t in tokens).strip()


def match_case(template: str, word: str) -> str:
    """`word` in the case pattern of `template`: UPPER, Capitalised, or as given."""
    if len(template) > 1 and template.isupper():
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


_AN_EXCEPTIONS = ("uni", "use", "usu", "uti", "eu", "one", "once", "ur")
_SILENT_H = ("hour", "honest", "honour", "honor", "heir")


def _article_for(word: str) -> str:
    lower = word.lower()
    if lower.startswith(_SILENT_H):
        return "an"
    if lower[:1] in "aeiou" and not lower.startswith(_AN_EXCEPTIONS):
        return "an"
    return "a"


def fix_articles(tokens: list[Token], before: Sequence[int]) -> list[Token]:
    """Make "a"/"an" at the given indices agree with the next word, since an edit after them can change it
    ("an orange" -> "a red"); indices out of range or not articles are ignored. Returns a new list."""
    tokens = list(tokens)
    for i in before:
        if 0 <= i < len(tokens) - 1:
            token, nxt = tokens[i], tokens[i + 1].text
            if token.text.lower() in ("a", "an") and token.space and nxt[:1].isalpha():
                tokens[i] = Token(match_case(token.text, _article_for(nxt)), token.space, token.pos)
    return tokens


def caption_problem(caption: str, max_words: int) -> str | None:
    """Why a caption can give no negatives at all, checked before parsing; None when it looks usable.

    "empty"; "not_english" (no letters, or under 80% of its letters ASCII: Chinese, Cyrillic, ...);
    "too_long" (over `max_words` whitespace-separated words); "one_word" (fewer than two words).
    """
    if not caption.strip():
        return "empty"
    letters = [c for c in caption if c.isalpha()]
    if not letters or sum(c.isascii() for c in letters) < 0.8 * len(letters):
        return "not_english"
    if len(caption.split()) > max_words:
        return "too_long"
    if len(_WORD_RE.findall(caption)) < 2:
        return "one_word"
    return None


def caption_rng(seed: int, caption: str, kind: str) -> np.random.Generator:
    """A generator seeded by (seed, caption, kind) alone, so results never depend on the batch around a caption."""
    digest = hashlib.sha256(f"{seed}\x00{kind}\x00{caption}".encode("utf-8")).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))
