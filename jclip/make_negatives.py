"""Make the hard-negative candidate pools of a config's training captions, for FSC-CLIP (Oh et al., EMNLP 2024).

    python -m jclip.make_negatives --config=configs/clip.py --output=/data/negatives
    python -m jclip.main --config=<an FSC-CLIP config> --workdir=/tmp/fsc --config.data.hard_negatives=/data/negatives

Reads every caption of every training example of `--config`'s data (each mixture component's training
split; all captions of an example, since training picks among them), parses each distinct caption once with
the `jclip.data.negatives` generator, and writes the folder `jclip.data.negative_pools` describes. Training
then draws fresh negatives from it each step at no parsing cost (the `hard_negatives` op). Prints the
backend, the number of captions, the share of captions with each kind of negative, the captions with none
(counted by problem) and the speed. `--limit` reads only the first examples of each component, for a look.
"""

from __future__ import annotations

import collections
import copy
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from absl import app, flags
from ml_collections import config_flags

from jclip.cli import parse_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "The training config whose captions to parse.", lock_config=True)
_OUTPUT = flags.DEFINE_string("output", None, "The pools folder to write (local, or gs://).")
_BACKEND = flags.DEFINE_enum("backend", "auto", ["auto", "spacy", "lexicon"],
                             "The generator: spacy (a parser), lexicon (no parser), or auto (spacy when installed).")
_SEED = flags.DEFINE_integer("seed", 0, "The generator's seed (which candidates are kept when there are too many).")
_MAX_PER_KIND = flags.DEFINE_integer("max_per_kind", 16, "At most this many candidates per caption and kind.")
_MAX_WORDS = flags.DEFINE_integer("max_words", 100, "Longer captions get no negatives (counted as too_long); "
                                  "raise it for dense captions.")
_LIMIT = flags.DEFINE_integer("limit", None, "Read only the first N examples of each training component.")
CHUNK_SIZE = 512


class Generator(Protocol):
    """What `jclip.data.negatives.make_generator` returns."""

    backend: str

    def generate(self, captions: Sequence[str]) -> list[Any]: ...


def load_generator(backend: str, *, seed: int, max_per_kind: int, max_words: int = 100) -> Generator:
    """The `jclip.data.negatives` generator (imported here: only this command needs the parser)."""
    from jclip.data.negatives import make_generator

    return make_generator(backend, seed=seed, max_per_kind=max_per_kind, max_words=max_words)


def training_captions(config: Any, limit: int | None = None, log: Callable[[str], None] = print
                      ) -> tuple[list[str], dict[str, int], int]:
    """(every distinct caption in first-seen order, bad caption fields counted by reason, examples read)."""
    from jclip.data import robust
    from jclip.data.configured import ConfiguredData
    from jclip.data.ops.captions import caption_candidates

    data_config = copy.deepcopy(config.data)
    if data_config.get("hard_negatives"):
        data_config.hard_negatives = None  # the folder this command makes need not exist yet
    data = ConfiguredData(data_config, config.model)
    captions: dict[str, None] = {}
    bad: collections.Counter[str] = collections.Counter()
    examples = 0
    for name, raw in data.random_access_training_sources():
        count = len(raw) if limit is None else min(int(limit), len(raw))
        for index in range(count):
            try:
                captions.update(dict.fromkeys(caption_candidates(raw[index].get("caption"))))
            except robust.BadExample as error:
                bad[error.reason] += 1
        examples += count
        log(f"negatives: {name}: read {count} examples, {len(captions)} distinct captions so far")
    return list(captions), dict(bad), examples


def _source_description(config: Any, limit: int | None) -> dict[str, Any]:
    data = config.data
    mixture = {name: dict(entry) for name, entry in (data.get("mixture") or {}).items()}
    return {"source": None if mixture else data.source, "mixture": mixture or None, "train_split": data.train_split,
            "caption_field": data.caption_field, "caption_templates": data.get("caption_templates"), "limit": limit}


def make_negatives(
    config: Any, output: str | os.PathLike, *, backend: str = "auto", seed: int = 0, max_per_kind: int = 16,
    max_words: int = 100, limit: int | None = None, generator: Generator | None = None, chunk_size: int = CHUNK_SIZE,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Generates the pools of every training caption of `config` and writes them to `output`; returns a summary.

    `generator` replaces the `jclip.data.negatives` one (tests); `log` receives the progress lines.
    """
    from jclip.data import negative_pools

    captions, bad, examples = training_captions(config, limit, log)
    if not captions:
        raise ValueError(f"the training data of this config has no usable caption ({examples} examples read, "
                         f"bad caption fields: {bad or 'none'})")
    if generator is None:
        generator = load_generator(backend, seed=seed, max_per_kind=max_per_kind, max_words=max_words)
    results: list[Any] = []
    started = time.perf_counter()
    for start in range(0, len(captions), chunk_size):
        chunk = captions[start:start + chunk_size]
        generated = list(generator.generate(chunk))
        if [result.caption for result in generated] != chunk:
            raise ValueError(f"the {generator.backend!r} generator returned results for other captions than it was "
                             f"given (captions {start}..{start + len(chunk) - 1}); the pools are looked up by exact text")
        results += generated
        elapsed = time.perf_counter() - started
        log(f"negatives: {len(results)}/{len(captions)} captions, {len(results) / max(elapsed, 1e-9):.0f} captions/s")
    rate = len(results) / max(time.perf_counter() - started, 1e-9)
    kinds = getattr(generator, "kinds", None)
    directory = negative_pools.write_pools(
        output, results, backend=generator.backend, seed=seed, source=_source_description(config, limit), kinds=kinds,
        extra_meta={"max_per_kind": max_per_kind, "max_words": max_words, "examples": examples, "bad_captions": bad,
                    "captions_per_second": round(rate, 1)},
    )
    meta = negative_pools.NegativePools(directory).meta
    return {
        "output": str(directory), "backend": generator.backend, "examples": examples, "captions": len(results),
        "bad_captions": bad, "kinds": meta["kinds"], "coverage": meta["coverage"],
        "without_negatives": sum(meta["problems"].values()), "problems": meta["problems"],
        "captions_per_second": rate,
    }


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """The summary as the lines the command prints."""
    coverage = summary["coverage"]
    lines = [
        f"backend: {summary['backend']}",
        f"captions: {summary['captions']} distinct, from {summary['examples']} examples"
        + (f" ({sum(summary['bad_captions'].values())} with a bad caption field: "
           f"{', '.join(f'{reason} {n}' for reason, n in summary['bad_captions'].items())})" if summary["bad_captions"] else ""),
        "captions with a negative: " + ", ".join(f"{kind} {100 * coverage[kind]:.1f}%" for kind in summary["kinds"])
        + f"; any {100 * coverage['any']:.1f}%, all {100 * coverage['all']:.1f}%",
        f"captions with none: {summary['without_negatives']}"
        + (" (" + ", ".join(f"{problem}: {n}" for problem, n in summary["problems"].items()) + ")" if summary["problems"] else ""),
        f"speed: {summary['captions_per_second']:.0f} captions/s",
        f"negative pools written to {summary['output']}",
    ]
    return lines


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    for flag in (_CONFIG, _OUTPUT):
        if flag.value is None:
            raise app.UsageError(f"--{flag.name} is required")
    from jclip.errors import ConfigError

    try:
        summary = make_negatives(_CONFIG.value, _OUTPUT.value, backend=_BACKEND.value, seed=_SEED.value,
                                 max_per_kind=_MAX_PER_KIND.value, max_words=_MAX_WORDS.value, limit=_LIMIT.value,
                                 log=lambda line: print(line, flush=True))
    except (ConfigError, FileNotFoundError, ImportError, ValueError) as error:
        print(f"jclip.make_negatives: {error}", file=sys.stderr)
        sys.exit(2)
    for line in summary_lines(summary):
        print(line, flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
