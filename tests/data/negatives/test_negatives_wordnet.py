"""Tests of jclip.data.negatives.wordnet: the offline set-up from Debian's files and the no-synonym rule.

They need Debian's `wordnet-base` and `wordnet-sense-index` (in /usr/share/wordnet) and, for the reader, nltk;
each test skips, saying which, where they are absent.
"""

from __future__ import annotations

import gzip
import itertools
from pathlib import Path

import pytest

from jclip.data.negatives import lexicon
from jclip.data.negatives import wordnet as wordnet_module

needs_files = pytest.mark.skipif(
    not wordnet_module.available(),
    reason=f"WordNet's files are not in {wordnet_module.DEBIAN_WORDNET} ({wordnet_module.INSTALL_HINT})",
)


def test_lexnames_has_the_45_lexicographer_files():
    lines = wordnet_module.lexnames_text().splitlines()
    assert len(lines) == 45
    assert lines[0] == "00\tadj.all\t3" and lines[3] == "03\tnoun.Tops\t1" and lines[25] == "25\tnoun.shape\t1"
    assert lines[29] == "29\tverb.body\t2" and lines[43] == "43\tverb.weather\t2" and lines[44] == "44\tadj.ppl\t3"


def test_lexnames_agrees_with_the_manual_page():
    page = Path("/usr/share/man/man5/lexnames.5WN.gz")
    if not page.is_file():
        pytest.skip(f"{page} is absent (install wordnet-base with its manual pages)")
    rows = [line.split("\t")[:2] for line in gzip.open(page, "rt").read().splitlines() if line[:2].isdigit()]
    expected = [(number, name.strip()) for number, name in rows]
    assert [tuple(line.split("\t")[:2]) for line in wordnet_module.lexnames_text().splitlines()] == expected


@needs_files
def test_prepare_copies_files_never_links(tmp_path):
    root = wordnet_module.prepare(cache=tmp_path / "nltk_data")
    folder = root / "corpora" / "wordnet"
    for name in ("index.noun", "data.noun", "index.sense", "cntlist.rev", "lexnames"):
        path = folder / name
        assert path.is_file() and not path.is_symlink() and path.stat().st_nlink == 1, name
    assert (folder / "data.noun").stat().st_size == (wordnet_module.DEBIAN_WORDNET / "data.noun").stat().st_size
    before = (folder / "data.noun").stat().st_mtime_ns
    wordnet_module.prepare(cache=tmp_path / "nltk_data")  # a second call copies nothing
    assert (folder / "data.noun").stat().st_mtime_ns == before


def test_prepare_without_the_files_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install"):
        wordnet_module.prepare(source=tmp_path / "nowhere", cache=tmp_path / "cache")


@pytest.fixture(scope="module")
def alternatives():
    pytest.importorskip("nltk", reason="nltk is not installed (pip install 'jclip[negatives]')")
    if not wordnet_module.available():
        pytest.skip(f"WordNet's files are not in {wordnet_module.DEBIAN_WORDNET} ({wordnet_module.INSTALL_HINT})")
    return wordnet_module.WordNetAlternatives(wordnet_module.load())


def test_reader_is_wordnet_3_0(alternatives):
    assert alternatives.wn.get_version() == "3.0"
    assert len(list(alternatives.wn.all_synsets("n"))) == 82115


@pytest.mark.parametrize(
    "lemma, pos",
    [("cat", "NOUN"), ("table", "NOUN"), ("car", "NOUN"), ("man", "NOUN"), ("picture", "NOUN"), ("small", "ADJ"),
     ("red", "ADJ"), ("old", "ADJ"), ("ride", "VERB"), ("sit", "VERB"), ("hold", "VERB"), ("big", "ADJ")],
)
def test_alternatives_never_share_a_synset(alternatives, lemma, pos):
    wn = alternatives.wn
    found = alternatives.alternatives(lemma, pos)
    assert found, (lemma, pos)
    originals = set(wn.synsets(lemma))
    for word in found:
        assert not set(wn.synsets(word)) & originals, (lemma, word)


def test_antonyms_come_first(alternatives):
    assert alternatives.alternatives("small", "ADJ")[0] == "large"
    assert alternatives.alternatives("old", "ADJ")[:2] == ("young", "new")
    assert "sit" in alternatives.alternatives("stand", "VERB")[:3]


def test_colours_reach_other_colours(alternatives):
    assert {"blue", "green", "yellow"} <= set(alternatives.alternatives("red", "ADJ"))


def test_first_sense_before_rare_senses(alternatives):
    cats = alternatives.alternatives("cat", "NOUN")
    assert cats[0] == "dog"  # a cousin through carnivores, before "guy"'s siblings


def test_no_lexicon_replacement_is_a_wordnet_synonym(alternatives):
    """The lexicon's groups were built by hand; WordNet checks that no two groups of a class share a synset."""
    wn = alternatives.wn
    for word_class in lexicon.CLASSES:
        for a, b in itertools.combinations(word_class.groups, 2):
            for x, y in itertools.product(a.words + a.also, b.words + b.also):
                shared = set(wn.synsets(x.replace(" ", "_"))) & set(wn.synsets(y.replace(" ", "_")))
                assert not shared, (word_class.name, x, y, shared)
