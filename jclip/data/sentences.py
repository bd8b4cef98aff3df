"""Splitting a long caption into sentences, for sentence sampling and sentence-wise retrieval.

Stone et al. (arXiv 2412.15396) train on random subsets of a dense caption's sentences
(`jclip.data.ops.captions`, `sample_sentences`), and retrieval can embed a long caption sentence by sentence
(`jclip.evals.retrieval`); both split with `split_sentences`. A sentence ends at `.`, `!`, `?` or an
ellipsis, together with any closing quotes or brackets after it, where whitespace or the end of the text
follows; a blank line also ends one. A full stop does not end a sentence after

- a title or Latin abbreviation (`Mr.`, `Dr.`, `St.`, `e.g.`, `i.e.`, `vs.`, `approx.`, ... `ABBREVIATIONS`),
- an initialism or an initial (`U.S.`, `J. R. R. Tolkien`),
- `No.`, `Fig.` and the like when a number follows (`No. 5`; but "the answer was no." ends one),
- `etc.`, `Inc.`, `a.m.`, ... (`FINAL_ABBREVIATIONS`) unless a capitalised word follows;

an ellipsis ends a sentence only when a capitalised word follows. Decimals (`3.5 m`, `0.25`) never split,
since no whitespace follows their point. Whitespace inside a sentence is collapsed to single spaces, and a
text without a final full stop still gives its last sentence. The rules are heuristics written for English
image descriptions; a sentence that ends in an abbreviation followed by a capitalised name can be joined to
the next one.
"""

from __future__ import annotations

import re

#: Abbreviations after which a full stop never ends a sentence (lower case, without the final full stop).
ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "st", "mt", "sgt", "capt", "lt", "col", "gen", "rev", "hon",
    "vs", "e.g", "i.e", "cf", "ca", "approx", "esp", "incl", "dept",
})
#: Abbreviations that mark a number next: `No. 5`, `Fig. 3`, `pp. 10` (otherwise a plain word may end a sentence).
NUMBER_ABBREVIATIONS = frozenset({"no", "nos", "fig", "figs", "vol", "p", "pp", "ch", "sec", "art"})
#: Abbreviations that often end a sentence: the full stop ends one when a capitalised word follows.
FINAL_ABBREVIATIONS = frozenset({"etc", "inc", "ltd", "co", "corp", "jr", "sr", "a.m", "p.m", "al"})

_OPENING = "\"'“‘«([{"
_CLOSING = "\"'”’»)]}"
# A run of terminators, then closing quotes or brackets, then whitespace or the end of the text.
_CANDIDATE = re.compile(r"(?P<end>[.!?…]+)(?P<close>[" + re.escape(_CLOSING) + r"]*)(?=\s|$)")
_PARAGRAPH = re.compile(r"\n\s*\n")
_INITIALISM = re.compile(r"[A-Za-z](?:\.[A-Za-z])+")  # U.S, e.g, a.m (the word before the final full stop)


def split_sentences(text: str) -> list[str]:
    """The sentences of `text` in order, each stripped with inner whitespace collapsed; [] for blank text."""
    sentences = []
    for paragraph in _PARAGRAPH.split(text):
        start = 0
        for match in _CANDIDATE.finditer(paragraph):
            if _ends_sentence(paragraph, match):
                sentences.append(paragraph[start:match.end()])
                start = match.end()
        sentences.append(paragraph[start:])
    return [cleaned for cleaned in (" ".join(sentence.split()) for sentence in sentences) if cleaned]


def _ends_sentence(text: str, match: re.Match) -> bool:
    """Whether the terminator `match` ends a sentence, judged from the word before it and the text after."""
    following = text[match.end():].lstrip().lstrip(_OPENING)
    if not following:
        return True
    capitalised = following[0].isupper()
    end = match.group("end")
    if "!" in end or "?" in end:
        return True
    if end != ".":  # an ellipsis ('...', '…'): a pause unless a new sentence visibly starts
        return capitalised
    if match.group("close"):  # 'he said "stop." Then': the quote closes the sentence
        return True
    before = text[:match.start()]
    word = "" if not before or before[-1].isspace() else before.split()[-1].lstrip(_OPENING)
    if not word:  # a full stop standing alone
        return True
    lowered = word.lower()
    if lowered in ABBREVIATIONS:
        return False
    if lowered in NUMBER_ABBREVIATIONS:
        return not following[0].isdigit()
    if lowered in FINAL_ABBREVIATIONS:
        return capitalised
    if _INITIALISM.fullmatch(word) or (len(word) == 1 and word.isupper()):
        return False
    return True
