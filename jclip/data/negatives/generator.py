"""Hard-negative caption pools per caption and kind, made offline once and sampled during training.

FSC-CLIP (Oh et al., EMNLP 2024) draws a swap, a replace and a shuffle negative per caption every step. Parsing
costs about 2 ms per caption on a CPU, which would starve an accelerator, so jclip parses once, keeps every
candidate (capped at `max_per_kind` by a seeded subsample) and lets the training op draw from the pool.
Results depend only on (seed, caption): never on the batch a caption comes in, nor its position.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

from jclip.data.negatives import kinds
from jclip.data.negatives.text import Parsed, caption_problem, caption_rng, normalise

KINDS: tuple[str, ...] = ("swap", "replace", "shuffle")


@dataclasses.dataclass(frozen=True)
class CaptionNegatives:
    """A caption's candidate negatives by kind; `problem` says why there are none at all (else None).

    Problems: "empty", "one_word", "not_english", "too_long" (found before parsing) and "no_candidates" (the
    caption parsed, but no kind could change it, e.g. "hello world" with the lexicon).
    """

    caption: str
    pools: dict[str, tuple[str, ...]]
    problem: str | None = None


class Parser(Protocol):
    """A backend: names itself and turns captions into `Parsed` form (batched, for spaCy's nlp.pipe)."""

    name: str

    def parse(self, captions: list[str]) -> list[Parsed]: ...


class NegativeGenerator:
    """Makes the negative pools of captions with one parser backend; see `make_generator`."""

    def __init__(self, parser: Parser, *, seed: int = 0, max_per_kind: int = 16, max_words: int = 100):
        if max_per_kind < 1:
            raise ValueError(f"max_per_kind must be at least 1, got {max_per_kind}")
        self.parser = parser
        self.backend: str = parser.name
        self.seed = seed
        self.max_per_kind = max_per_kind
        self.max_words = max_words

    def generate(self, captions: Sequence[str]) -> list[CaptionNegatives]:
        """The pools of each caption, in order; deterministic in (seed, caption)."""
        problems = {c: caption_problem(c, self.max_words) for c in dict.fromkeys(captions)}
        to_parse = [c for c, problem in problems.items() if problem is None]
        done = {c: CaptionNegatives(c, {k: () for k in KINDS}, p) for c, p in problems.items() if p is not None}
        for caption, parsed in zip(to_parse, self.parser.parse(to_parse)):
            done[caption] = self._negatives(caption, parsed)
        return [done[c] for c in captions]

    def _negatives(self, caption: str, parsed: Parsed) -> CaptionNegatives:
        shuffle_rng = caption_rng(self.seed, caption, "shuffle")
        raw = {
            "swap": kinds.swap(parsed),
            "replace": kinds.replace(parsed),
            "shuffle": kinds.shuffle(parsed.tokens, shuffle_rng, self.max_per_kind),
        }
        pools = {kind: self._pool(caption, kind, raw[kind]) for kind in KINDS}
        problem = None if any(pools.values()) else "no_candidates"
        return CaptionNegatives(caption, pools, problem)

    def _pool(self, caption: str, kind: str, candidates: list[str]) -> tuple[str, ...]:
        """Distinct candidates unlike the caption; a seeded subsample (in candidate order) when over the cap."""
        seen = {normalise(caption)}
        distinct = []
        for candidate in candidates:
            key = normalise(candidate)
            if key not in seen:
                seen.add(key)
                distinct.append(candidate)
        if len(distinct) > self.max_per_kind:
            keep = caption_rng(self.seed, caption, kind).choice(len(distinct), self.max_per_kind, replace=False)
            distinct = [distinct[i] for i in sorted(keep)]
        return tuple(distinct)


def coverage(results: Sequence[CaptionNegatives]) -> dict[str, float]:
    """Share of captions with at least one candidate per kind, with any kind ("any") and with all ("all")."""
    n = max(len(results), 1)
    shares = {kind: sum(bool(r.pools.get(kind)) for r in results) / n for kind in KINDS}
    shares["any"] = sum(any(r.pools.get(k) for k in KINDS) for r in results) / n
    shares["all"] = sum(all(r.pools.get(k) for k in KINDS) for r in results) / n
    return shares
