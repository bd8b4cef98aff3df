"""WordNet 3.0 offline, from Debian's files, for the "replace" negatives of FSC-CLIP (Oh et al., EMNLP 2024).

No pip package brings WordNet's data, and nltk's downloader needs the network. Debian's `wordnet-base` and
`wordnet-sense-index` packages hold the database in /usr/share/wordnet. nltk (>= 3.10) reads it only when:
the files sit in `<root>/corpora/wordnet/` with `<root>` on `nltk.data.path`; they are copies, not links (its
path sandbox refuses symlinks out of the root and hard links); `index.sense` is there; and a `lexnames` file
exists, which Debian does not ship, so it is written here from the 45 lexicographer file names of WordNet 3.0.
The copies go to a writable cache (~/.cache/jclip/nltk_data), never into dpkg's folder.

Replacements are antonyms, then co-hyponyms (siblings) and cousins of a word's first sense, then siblings of
its second and third senses; never synonyms (any word sharing a synset with the word is dropped). Siblings and
cousins must be attested in the sense-tagged corpus (count >= 1), which removes most odd words.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

#: Where Debian's wordnet-base and wordnet-sense-index install the database.
DEBIAN_WORDNET = Path("/usr/share/wordnet")
INSTALL_HINT = "apt-get install -y --no-install-recommends wordnet-base wordnet-sense-index"

_REQUIRED = ("index.noun", "data.noun", "index.verb", "data.verb", "index.adj", "data.adj", "index.sense")

#: WordNet 3.0's lexicographer files: number, name, syntactic category (1 noun, 2 verb, 3 adjective, 4 adverb).
_LEXNAMES = (
    ["adj.all", "adj.pert", "adv.all"]
    + [f"noun.{n}" for n in (
        "Tops act animal artifact attribute body cognition communication event feeling food group location "
        "motive object person phenomenon plant possession process quantity relation shape state substance "
        "time".split())]
    + [f"verb.{n}" for n in (
        "body change cognition communication competition consumption contact creation emotion motion "
        "perception possession social stative weather".split())]
    + ["adj.ppl"]
)


def _category(name: str) -> int:
    return {"noun": 1, "verb": 2, "adj": 3, "adv": 4}[name.split(".")[0]]


def lexnames_text() -> str:
    """The `lexnames` file nltk expects: 45 lines "NN<TAB>name<TAB>category"."""
    return "".join(f"{i:02d}\t{name}\t{_category(name)}\n" for i, name in enumerate(_LEXNAMES))


def default_cache() -> Path:
    """~/.cache/jclip/nltk_data, or $XDG_CACHE_HOME/jclip/nltk_data."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "jclip" / "nltk_data"


def available(source: Path = DEBIAN_WORDNET) -> bool:
    """Whether the WordNet files are installed (without importing nltk)."""
    return all((source / name).is_file() for name in _REQUIRED)


def prepare(source: Path = DEBIAN_WORDNET, cache: Path | None = None) -> Path:
    """Copy the database into `<cache>/corpora/wordnet` (once) with a lexnames file; returns the nltk root.

    Files already copied with the same size are kept; each copy is written beside its target and renamed.
    """
    if not available(source):
        raise FileNotFoundError(f"WordNet is not in {source}; install it with: {INSTALL_HINT}")
    root = cache or default_cache()
    target = root / "corpora" / "wordnet"
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        dest = target / path.name
        if path.is_file() and not (dest.is_file() and dest.stat().st_size == path.stat().st_size):
            partial = dest.with_name(dest.name + ".partial")
            shutil.copyfile(path, partial)
            partial.replace(dest)
    lexnames = target / "lexnames"
    if not lexnames.is_file() or lexnames.read_text() != lexnames_text():
        lexnames.write_text(lexnames_text())
    return root


@functools.lru_cache(maxsize=None)
def load(source: Path = DEBIAN_WORDNET, cache: Path | None = None):
    """nltk's WordNet reader over the prepared copy (nltk's `wordnet` corpus object, loaded)."""
    root = prepare(source, cache)
    import nltk

    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    from nltk.corpus import wordnet

    wordnet.ensure_loaded()
    return wordnet


class WordNetAlternatives:
    """Antonyms and siblings (co-hyponyms) of a lemma in WordNet, never its synonyms; cached per (lemma, POS)."""

    #: Universal POS -> WordNet POS letters (adjectives include satellites).
    _POS = {"NOUN": ("n",), "VERB": ("v",), "ADJ": ("a", "s")}

    def __init__(self, wordnet, *, senses: int = 3, min_count: int = 1, max_alternatives: int = 10):
        self.wn = wordnet
        self.senses = senses
        self.min_count = min_count
        self.max_alternatives = max_alternatives
        self.alternatives = functools.lru_cache(maxsize=200_000)(self._alternatives)
        self.synsets = functools.lru_cache(maxsize=200_000)(lambda word: frozenset(self.wn.synsets(word)))

    def shares_synset(self, word: str, other: str) -> bool:
        """Whether two words (any inflection, any POS) share a synset: then one is a synonym of the other."""
        return bool(self.synsets(word.lower()) & self.synsets(other.lower()))

    def _senses(self, lemma: str, pos: str) -> list:
        """The first senses (WordNet lists them most frequent first)."""
        return [s for s in self.wn.synsets(lemma) if s.pos() in self._POS[pos]][: self.senses]

    def _counted_lemmas(self, synsets) -> list[str]:
        """Lemma names of synsets attested at least `min_count` times, most frequent first."""
        counts: dict[str, int] = {}
        for synset in synsets:
            for ls in synset.lemmas():
                counts[ls.name()] = max(counts.get(ls.name(), 0), ls.count())
        return [w for w, c in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0])) if c >= self.min_count]

    @staticmethod
    def _siblings(sense) -> list:
        return [h for parent in sense.hypernyms() for h in parent.hyponyms() if h != sense]

    def _alternatives(self, lemma: str, pos: str) -> tuple[str, ...]:
        """Ranked replacements: antonyms; siblings of the first sense; its cousins; siblings of later senses.

        Cousins of the first sense come before the other senses' siblings because a word's later senses are
        often far from what a caption means ("cat" -> "guy" -> "boy"), while "cat" -> carnivores -> "dog" is not.
        """
        if pos not in self._POS:
            return ()
        senses = self._senses(lemma, pos)
        if not senses:
            return ()
        synonyms = {name.lower() for s in self.synsets(lemma) for name in s.lemma_names()}
        ranked = [a.name() for s in senses for ls in s.lemmas() if ls.name().lower() == lemma for a in ls.antonyms()]
        first = [senses[0]]
        if pos == "ADJ" and not ranked:  # colours: "red" -> red.n.01 (an attribute) -> its siblings "blue", ...
            first += [s for s in self.wn.synsets(lemma, "n")[:1] if s.lexname() == "noun.attribute"]
        ranked += self._counted_lemmas(sib for sense in first for sib in self._siblings(sense))
        ranked += self._counted_lemmas(
            cousin
            for sense in first
            for parent in sense.hypernyms()
            for uncle in self._siblings(parent)
            for cousin in uncle.hyponyms()
        )
        ranked += self._counted_lemmas(sib for sense in senses[1:] for sib in self._siblings(sense))
        keep = []
        for word in dict.fromkeys(ranked):
            # Multi-word lemmas and proper names (capitalised) are left out.
            if not (word.isalpha() and word.islower()) or word in synonyms or word == lemma:
                continue
            if self.shares_synset(word, lemma):
                continue
            keep.append(word)
            if len(keep) >= self.max_alternatives:
                break
        return tuple(keep)
