"""Caption ops: check and pick a caption, choose between alt-text and a dense caption, sample sentences.

`choose_caption` checks a caption field (one caption or several) and picks one: training (an rng given)
picks one of the usable captions uniformly, drawing `rng.integers(n)` only when there are several;
evaluation takes the first. Captions made from class labels are a source wrapper
(`jclip.data.sources.label_captions`), since they need the source's class names.

Stone et al. ("Learning Visual Composition through Improved Semantic Guidance", arXiv 2412.15396) train on
dense recaptions instead of alt-text, on random subsets of their sentences. `caption_rule` chooses, per
example, between a short caption field and a dense one (`dense`, `short`, `mixed:p`, `alternate` by epoch);
`sample_sentences` keeps a random subset of a long caption's sentences in their order
(`jclip.data.sentences` splits them). Both draw from the example's RNG, which the pipeline seeds per element
of the stream, so a resumed run draws what it would have drawn; without an rng (evaluation) both are
deterministic (see each op).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jclip.data import sentences
from jclip.data.ops.registry import Op, OpContext, register_op
from jclip.data.pipeline import EPOCH_FIELD
from jclip.data.robust import BadExample


def caption_text(raw: Any) -> str:
    """One caption as text, or `BadExample`: bytes must be UTF-8 and something must remain after stripping."""
    if raw is None:
        raise BadExample("missing_caption")
    if isinstance(raw, np.ndarray) and raw.ndim == 0:
        raw = raw.item()
    if isinstance(raw, (bytes, bytearray, np.bytes_)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as error:
            raise BadExample("undecodable_caption", f"{type(error).__name__}: {error}"[:200]) from None
    if not isinstance(raw, str):
        raise BadExample("undecodable_caption", f"caption of type {type(raw).__name__}")
    if not raw.strip():
        raise BadExample("empty_caption")
    return raw


def caption_candidates(raw: Any) -> list[str]:
    """The usable captions of a caption field (one caption or a list); `BadExample` (the first reason) if none."""
    if isinstance(raw, np.ndarray) and raw.ndim > 0:
        raw = raw.tolist()
    if not isinstance(raw, (list, tuple)):
        return [caption_text(raw)]
    if not raw:
        raise BadExample("missing_caption", "empty list of captions")
    texts, first_bad = [], None
    for item in raw:
        try:
            texts.append(caption_text(item))
        except BadExample as bad:
            first_bad = first_bad or bad
    if not texts:
        raise first_bad
    return texts


@register_op("choose_caption")
class ChooseCaption(Op):
    """`field` (one caption or a list; str or UTF-8 bytes) -> one checked caption (str) in the same field."""

    def __init__(self, context: OpContext, field: str = "caption"):
        self.reads = self.writes = (field,)
        self.field = field

    def __call__(self, example: dict[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
        texts = caption_candidates(example.get(self.field))
        text = texts[int(rng.integers(len(texts)))] if rng is not None and len(texts) > 1 else texts[0]
        return {**example, self.field: text}


@register_op("keep")
class Keep(Op):
    """Raw fields passed through into the batch as NumPy arrays (e.g. `keep(fields=('label',))`);
    a missing one skips the example as `missing_field`."""

    def __init__(self, context: OpContext, fields: tuple[str, ...] = ("label",)):
        if isinstance(fields, str):
            fields = (fields,)
        self.reads = self.writes = tuple(fields)

    def __call__(self, example: dict[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
        out = dict(example)
        for field in self.reads:
            if example.get(field) is None:
                raise BadExample("missing_field", f"no {field!r}")
            out[field] = np.asarray(example[field])
        return out


#: `caption_rule`'s rules (`mixed` is written `mixed:p`).
CAPTION_RULES = ("dense", "short", "mixed", "alternate")


def parse_caption_rule(rule: str) -> tuple[str, float]:
    """`'dense'` -> ('dense', 1.0), `'short'` -> ('short', 0.0), `'mixed:0.3'` -> ('mixed', 0.3),
    `'alternate'` -> ('alternate', 0.5): the kind and the share of dense captions; ValueError otherwise."""
    kind, colon, argument = str(rule).strip().partition(":")
    if kind in ("dense", "short", "alternate") and not colon:
        return kind, {"dense": 1.0, "short": 0.0, "alternate": 0.5}[kind]
    if kind == "mixed" and colon:
        try:
            share = float(argument)
        except ValueError:
            share = -1.0
        if 0.0 <= share <= 1.0:
            return kind, share
    raise ValueError(f"caption rule {rule!r}: write 'dense', 'short', 'alternate' or 'mixed:p' with p in [0, 1] "
                     f"(the probability of the dense caption)")


def _pick(texts: list[str], rng: np.random.Generator | None) -> str:
    """One of several captions: uniform in training (one draw, only when there are several), else the first."""
    return texts[int(rng.integers(len(texts)))] if rng is not None and len(texts) > 1 else texts[0]


@register_op("caption_rule")
class CaptionRule(Op):
    """Writes into `out` the short caption (`short_field`) or the dense one (`dense_field`), by `rule`.

    Either field may hold one caption or a list (one is picked as by `choose_caption`). Rules, in training:
    `dense` and `short` always take that field; `mixed:p` takes the dense caption with probability p (one
    uniform draw per example, always made); `alternate` takes the dense caption in even epochs of its source
    (0, 2, ...: the first epoch is dense) and the short one in odd epochs, reading the pipeline's
    `EPOCH_FIELD`. Evaluation (no rng) takes the dense caption, except under `short`. A chosen dense caption
    that is missing or blank skips the example as `missing_dense_caption` (never a silent fall-back to the
    short one); a chosen short one that is bad skips as `choose_caption` would (`missing_caption`, ...).
    """

    def __init__(self, context: OpContext, rule: str = "dense", short_field: str = "caption",
                 dense_field: str = "dense_caption", out: str = "caption"):
        self.kind, self.dense_share = parse_caption_rule(rule)
        self.rule = str(rule)
        if short_field == dense_field:
            raise ValueError(f"short_field and dense_field must differ, both are {short_field!r}")
        self.short_field, self.dense_field, self.out = short_field, dense_field, out
        self.reads = (short_field, dense_field) + ((EPOCH_FIELD,) if self.kind == "alternate" else ())
        self.writes = (out,)
        self.consumes = tuple(field for field in (short_field, dense_field) if field != out)

    def wants_dense(self, example: dict[str, Any], rng: np.random.Generator | None) -> bool:
        """Whether this example takes the dense caption (draws one uniform under `mixed`)."""
        if self.kind in ("dense", "short"):
            return self.kind == "dense"
        if rng is None:
            return True
        if self.kind == "mixed":
            return bool(rng.random() < self.dense_share)
        epoch = example.get(EPOCH_FIELD)
        if epoch is None:
            raise ValueError(f"caption_rule(rule='alternate') needs the example's epoch ({EPOCH_FIELD!r}), which "
                             f"jclip's training pipeline adds; this example has none")
        return int(epoch) % 2 == 0

    def __call__(self, example: dict[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
        if self.wants_dense(example, rng):
            texts = self._dense(example.get(self.dense_field))
        else:
            texts = caption_candidates(example.get(self.short_field))
        return {**example, self.out: _pick(texts, rng)}

    def _dense(self, raw: Any) -> list[str]:
        try:
            return caption_candidates(raw)
        except BadExample as bad:
            if bad.reason in ("missing_caption", "empty_caption"):
                raise BadExample("missing_dense_caption",
                                 f"{self.dense_field!r}: {bad.detail or bad.reason} (caption_rule {self.rule!r})") from None
            raise


#: `sample_sentences`' distributions of the kept subset (`bernoulli` is written `bernoulli:p`).
SENTENCE_DISTRIBUTIONS = ("uniform", "bernoulli", "all")


@register_op("sample_sentences")
class SampleSentences(Op):
    """`field` (one caption) -> `out` (default `field`): a random subset of its sentences, in their order,
    joined with single spaces (Stone et al.'s sentence sampling).

    With n sentences (`jclip.data.sentences.split_sentences`), lo = min(min_sentences, n) and hi = n, or
    min(max_sentences, n):
    - `uniform`: k uniform on [lo, hi], then k distinct sentences uniformly (every subset of size k alike);
    - `bernoulli:p`: each sentence kept with probability p (n draws); if fewer than lo are kept, kept ones
      are added uniformly from the dropped ones up to lo, and if more than hi, dropped uniformly down to hi;
    - `all`: no sampling: the caption as it is.
    Evaluation (no rng) also keeps the caption as it is. A blank caption skips the example
    (`empty_caption`); put this op after the one that picks a single caption (`choose_caption`, `caption_rule`).
    """

    def __init__(self, context: OpContext, field: str = "caption", out: str | None = None,
                 distribution: str = "uniform", min_sentences: int = 1, max_sentences: int | None = None):
        kind, colon, argument = str(distribution).strip().partition(":")
        self.keep_probability = 1.0
        if kind == "bernoulli" and colon:
            try:
                self.keep_probability = float(argument)
            except ValueError:
                self.keep_probability = -1.0
            if not 0.0 < self.keep_probability <= 1.0:
                raise ValueError(f"distribution {distribution!r}: bernoulli:p needs p in (0, 1]")
        elif kind not in ("uniform", "all") or colon:
            raise ValueError(f"distribution {distribution!r}: write 'uniform', 'bernoulli:p' or 'all'")
        if not isinstance(min_sentences, int) or min_sentences < 1:
            raise ValueError(f"min_sentences must be an int >= 1, got {min_sentences!r}")
        if max_sentences is not None and (not isinstance(max_sentences, int) or max_sentences < min_sentences):
            raise ValueError(f"max_sentences must be None or an int >= min_sentences ({min_sentences}), "
                             f"got {max_sentences!r}")
        self.distribution, self.min_sentences, self.max_sentences = kind, min_sentences, max_sentences
        self.field, self.out = field, out or field
        self.reads, self.writes = (field,), (self.out,)

    def __call__(self, example: dict[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
        raw = example.get(self.field)
        if isinstance(raw, (list, tuple)) or (isinstance(raw, np.ndarray) and raw.ndim > 0):
            raise ValueError(f"sample_sentences reads one caption in {self.field!r}, got a list: put it after "
                             f"choose_caption or caption_rule in data.preprocess")
        text = caption_text(raw)
        if rng is None or self.distribution == "all":
            return {**example, self.out: text}
        parts = sentences.split_sentences(text)
        keep = self.kept(len(parts), rng)
        return {**example, self.out: " ".join(parts[i] for i in keep)}

    def kept(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """The sorted indices of the sentences kept out of `count`."""
        low = min(self.min_sentences, count)
        high = count if self.max_sentences is None else min(self.max_sentences, count)
        if self.distribution == "uniform":
            size = int(rng.integers(low, high + 1))
            return np.sort(rng.choice(count, size=size, replace=False))
        mask = rng.random(count) < self.keep_probability
        kept, dropped = np.flatnonzero(mask), np.flatnonzero(~mask)
        if len(kept) < low:
            kept = np.concatenate([kept, rng.choice(dropped, size=low - len(kept), replace=False)])
        elif len(kept) > high:
            kept = rng.choice(kept, size=high, replace=False)
        return np.sort(kept)
