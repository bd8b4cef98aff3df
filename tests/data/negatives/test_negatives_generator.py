"""Tests of the public interface (jclip.data.negatives) with the built-in lexicon backend.

Expectations are written by hand from the captions; invariants (never the caption, no duplicates, deterministic,
batch-independent) are checked on the embedded dataset's captions. The spaCy/WordNet backend has its own file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jclip.data.negatives import KINDS, CaptionNegatives, coverage, make_generator
from jclip.data.negatives.text import normalise
from jclip_testing import negative_pools_of, scene_captions

REPO_ROOT = Path(__file__).resolve().parents[3]

EXAMPLES = (
    "red circle and blue square",
    "a large yellow star, a small green cross on a grey background",
    "picture of a blue diamond above a red triangle",
    "three shapes: white circle, black square and purple star",
    "simple drawing of an orange cross next to a green circle",
)


@pytest.fixture(scope="module")
def full():
    """The lexicon generator with pools large enough to hold every candidate of the examples."""
    return make_generator("lexicon", max_per_kind=1000)


def test_interface():
    assert KINDS == ("swap", "replace", "shuffle")
    generator = make_generator("lexicon")
    assert generator.backend == "lexicon (built-in; no spaCy, no WordNet)"
    [result] = generator.generate(["a red circle"])
    assert isinstance(result, CaptionNegatives) and result.caption == "a red circle" and result.problem is None
    assert set(result.pools) == set(KINDS) and all(isinstance(p, tuple) for p in result.pools.values())
    with pytest.raises(ValueError, match="backend"):
        make_generator("stanza")


@pytest.mark.parametrize("caption", EXAMPLES)
def test_every_kind_on_the_embedded_examples(full, caption):
    pools = negative_pools_of(full, caption)
    assert all(pools[kind] for kind in KINDS), pools


def test_swap_examples(full):
    assert "a blue circle and a red square" in negative_pools_of(full, "a red circle and a blue square")["swap"]
    swaps = negative_pools_of(full, "picture of a blue diamond above a red triangle")["swap"]
    assert "picture of a red triangle above a blue diamond" in swaps  # the relation swap
    assert "picture of a red diamond above a blue triangle" in swaps  # the attribute swap
    swaps = negative_pools_of(full, "a large yellow star, a small green cross on a grey background")["swap"]
    assert "a small yellow star, a large green cross on a grey background" in swaps
    swaps = negative_pools_of(full, "simple drawing of an orange cross next to a green circle")["swap"]
    assert "simple drawing of a green cross next to an orange circle" in swaps  # articles follow the colours


def test_replace_examples(full):
    replaces = negative_pools_of(full, "picture of a blue diamond above a red triangle")["replace"]
    assert "picture of a blue diamond below a red triangle" in replaces
    assert "picture of a green diamond above a red triangle" in replaces
    assert "picture of a blue diamond above a red circle" in replaces
    assert "picture of a blue diamond over a red triangle" not in replaces  # a synonym of "above"
    replaces = negative_pools_of(full, "Two dogs on a table")["replace"]
    assert "Two cats on a table" in replaces and "Two cat on a table" not in replaces
    assert "Two dogs under a table" in replaces and "Two dogs on a chair" in replaces
    replaces = negative_pools_of(full, "A LARGE CAT")["replace"]
    assert "A SMALL CAT" in replaces and "A LARGE DOG" in replaces and "A BIG CAT" not in replaces


def test_replace_never_proposes_a_synonym(full):
    replaces = negative_pools_of(full, "a cat on a table")["replace"]
    assert "a cat under a table" in replaces and "a dog on a table" in replaces and "a cat on a chair" in replaces
    assert not {"a cat on top of a table", "a cat atop a table", "a cat on a table"} & set(replaces)
    replaces = negative_pools_of(full, "a big cat on a sofa near a grey bike")["replace"]
    for synonym in ("large cat", "huge cat", "on top of a sofa", "on a couch", "beside a", "gray bike", "grey bicycle"):
        assert not any(synonym in r for r in replaces), synonym
    assert "a small cat on a sofa near a grey bike" in replaces


def test_a_negative_is_never_its_caption_and_pools_have_no_duplicates():
    generator = make_generator("lexicon", max_per_kind=1000)
    captions = scene_captions(300) + ["red red red circle circle", "A cat. A cat.", "circle square circle square"]
    for result in generator.generate(captions):
        for kind, pool in result.pools.items():
            keys = [normalise(n) for n in pool]
            assert normalise(result.caption) not in keys, (kind, result.caption)
            assert len(set(keys)) == len(keys), (kind, pool)


def test_pools_are_capped():
    generator = make_generator("lexicon", max_per_kind=3)
    for result in generator.generate(scene_captions(50)):
        assert all(len(pool) <= 3 for pool in result.pools.values())
    [result] = generator.generate(["a large red circle above a small blue square"])
    assert all(len(pool) == 3 for pool in result.pools.values())  # each kind has more than 3 candidates


def test_deterministic_and_independent_of_the_batch():
    captions = scene_captions(40)
    first = make_generator("lexicon", seed=3, max_per_kind=4).generate(captions)
    again = make_generator("lexicon", seed=3, max_per_kind=4).generate(captions)
    assert first == again
    reordered = make_generator("lexicon", seed=3, max_per_kind=4).generate(captions[::-1] + ["a green star"])
    assert reordered[:40][::-1] == first
    alone = make_generator("lexicon", seed=3, max_per_kind=4).generate([captions[7]])
    assert alone[0] == first[7]
    twice = make_generator("lexicon", seed=3, max_per_kind=4).generate([captions[7], captions[2], captions[7]])
    assert twice == [first[7], first[2], first[7]]


def test_different_seeds_differ_somewhere():
    captions = scene_captions(20)
    a = make_generator("lexicon", seed=0, max_per_kind=4).generate(captions)
    b = make_generator("lexicon", seed=1, max_per_kind=4).generate(captions)
    assert a != b


@pytest.mark.parametrize(
    "caption, problem",
    [("", "empty"), ("circle", "one_word"), ("一只红色的圆圈和一个蓝色的正方形", "not_english"),
     (" ".join(["circle"] * 500), "too_long"), ("hello world", "no_candidates")],
)
def test_bad_captions_give_no_negatives_and_say_why(caption, problem):
    [result] = make_generator("lexicon").generate([caption])
    assert result.problem == problem
    assert all(pool == () for pool in result.pools.values())


def test_max_words():
    caption = "a red circle above a blue square"
    [short] = make_generator("lexicon", max_words=5).generate([caption])
    [long] = make_generator("lexicon", max_words=7).generate([caption])
    assert short.problem == "too_long" and long.problem is None


def test_coverage():
    results = [
        CaptionNegatives("a", {"swap": ("x",), "replace": ("y",), "shuffle": ("z",)}),
        CaptionNegatives("b", {"swap": (), "replace": ("y",), "shuffle": ()}),
        CaptionNegatives("c", {"swap": (), "replace": (), "shuffle": ()}, "one_word"),
        CaptionNegatives("d", {"swap": (), "replace": (), "shuffle": ("z",)}),
    ]
    assert coverage(results) == {"swap": 0.25, "replace": 0.5, "shuffle": 0.5, "any": 0.75, "all": 0.25}
    assert coverage([])["any"] == 0.0


def test_lexicon_coverage_on_embedded_captions():
    shares = coverage(make_generator("lexicon").generate(scene_captions(300)))
    assert shares["replace"] == 1.0 and shares["shuffle"] > 0.95 and shares["swap"] > 0.9


def test_fallback_without_spacy_and_nltk():
    """`auto` falls back to the lexicon in a process where spaCy, nltk and lemminflect cannot be imported."""
    script = textwrap.dedent(
        """
        import sys
        for name in ("spacy", "nltk", "lemminflect"):
            sys.modules[name] = None  # any import of it now raises ImportError
        from jclip.data.negatives import make_generator
        generator = make_generator("auto")
        [result] = generator.generate(["a red circle above a blue square"])
        assert "a red circle below a blue square" in result.pools["replace"] or len(result.pools["replace"]) == 16
        print(generator.backend)
        try:
            make_generator("spacy")
        except ImportError as error:
            print("spacy refused:", error)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "lexicon (built-in; no spaCy, no WordNet)"
    assert lines[1].startswith("spacy refused:") and "pip install" in lines[1]
