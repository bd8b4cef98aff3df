"""`python -m jclip.make_negatives`: every caption of every training example, parsed once, written as the
pools the `hard_negatives` op reads; bad caption fields are counted; the command prints the coverage.
A fake generator stands in for `jclip.data.negatives`, so these tests need no parser."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest

from configs import clip
from jclip import make_negatives
from jclip.data import configured, negative_pools
from jclip_testing import REPO_ROOT


@dataclasses.dataclass(frozen=True)
class Result:
    caption: str
    pools: dict
    problem: str | None = None


def fake_pools(caption: str) -> dict:
    """swap: the words reversed (two or more words); replace: 'cube' -> 'ball' where there is a cube;
    shuffle: never."""
    words = caption.split()
    return {"swap": (" ".join(reversed(words)),) if len(words) > 1 else (),
            "replace": (caption.replace("cube", "ball"),) if "cube" in caption else (),
            "shuffle": ()}


class FakeGenerator:
    backend = "fake"
    kinds = ("swap", "replace", "shuffle")

    def __init__(self):
        self.calls = []

    def generate(self, captions):
        self.calls.append(list(captions))
        return [Result(c, fake_pools(c), None if any(fake_pools(c).values()) else "one word") for c in captions]


def embedded_config(data_dir):
    config = clip.get_config()
    config.data.embedded_config, config.data.data_dir = "small", str(data_dir)
    return config


def test_pools_hold_every_caption_of_the_examples_read(tmp_path, scenes_data_dir):
    config = embedded_config(scenes_data_dir)
    raw = configured.ConfiguredData(config.data, config.model).source("train")
    expected = {raw[i]["caption"] for i in range(7)}
    generator, lines = FakeGenerator(), []
    summary = make_negatives.make_negatives(config, tmp_path / "pools", seed=3, limit=7, generator=generator,
                                            chunk_size=3, log=lines.append)
    pools = negative_pools.NegativePools(tmp_path / "pools")
    assert set(pools.captions) == expected and len(pools) == len(expected)
    for caption in expected:
        assert pools.lookup(caption) == fake_pools(caption)
    assert [len(call) for call in generator.calls] == [3, 3, len(expected) - 6][: -(-len(expected) // 3)]
    assert sum("captions/s" in line and f"/{len(expected)} captions" in line for line in lines) == len(generator.calls)
    with_cube = sum("cube" in c for c in expected) / len(expected)
    assert summary["coverage"] == pytest.approx({"swap": 1.0, "replace": with_cube, "shuffle": 0.0, "any": 1.0,
                                                 "all": 0.0})
    assert summary["examples"] == 7 and summary["captions"] == len(expected) and summary["without_negatives"] == 0
    meta = json.loads((tmp_path / "pools" / "meta.json").read_text())
    assert meta["backend"] == "fake" and meta["seed"] == 3 and meta["source"]["source"] == "embedded"
    assert meta["source"]["limit"] == 7


def test_every_caption_of_an_example_and_bad_caption_fields_counted(tmp_path):
    (tmp_path / "images").mkdir()
    entries = [{"path": "a.png", "caption": ["a red cube", "the cube"]}, {"path": "b.png", "caption": "dog"},
               {"path": "c.png", "caption": "   "}, {"path": "d.png", "caption": "a red cube"}]
    (tmp_path / "images" / "captions.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    config = clip.get_config()
    config.data.source = f"folder:{tmp_path / 'images' / 'captions.jsonl'}"
    config.data.hard_negatives = str(tmp_path / "pools")  # the training config names the folder still to be made
    config.lock()
    summary = make_negatives.make_negatives(config, tmp_path / "pools", generator=FakeGenerator(), log=lambda _: None)
    pools = negative_pools.NegativePools(tmp_path / "pools")
    assert sorted(pools.captions) == ["a red cube", "dog", "the cube"]
    assert summary["bad_captions"] == {"empty_caption": 1} and summary["examples"] == 4
    assert summary["without_negatives"] == 1 and summary["problems"] == {"one word": 1}
    lines = make_negatives.summary_lines(summary)
    assert "captions with none: 1 (one word: 1)" in lines
    assert "captions: 3 distinct, from 4 examples (1 with a bad caption field: empty_caption 1)" in lines


def test_a_generator_that_changes_captions_is_refused(tmp_path, scenes_data_dir):
    class Normalising(FakeGenerator):
        def generate(self, captions):
            return [Result(c.upper(), {}) for c in captions]  # e.g. a normalising parser

    with pytest.raises(ValueError, match="looked up by exact text"):
        make_negatives.make_negatives(embedded_config(scenes_data_dir), tmp_path / "p", limit=50,
                                      generator=Normalising(), log=lambda _: None)


RUNNER = """
import sys
sys.path.insert(0, {tests!r})
from absl import app
from jclip import make_negatives
from jclip.cli import parse_flags
from test_make_negatives import FakeGenerator

make_negatives.load_generator = lambda backend, **settings: FakeGenerator()
app.run(make_negatives.main, flags_parser=parse_flags)
"""


def test_the_command_writes_the_pools_and_prints_the_coverage(tmp_path, scenes_data_dir):
    runner = tmp_path / "run_make_negatives.py"
    runner.write_text(textwrap.dedent(RUNNER.format(tests=str(REPO_ROOT / "tests"))))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
    command = [sys.executable, str(runner), "--config=configs/clip.py", f"--output={tmp_path / 'pools'}", "--limit=5",
               "--config.data.embedded_config=small", f"--config.data.data_dir={scenes_data_dir}"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "backend: fake" in out and "captions with a negative: swap 100.0%" in out and "shuffle 0.0%" in out
    assert "captions with none: 0" in out and "captions/s" in out
    assert f"negative pools written to {tmp_path / 'pools'}" in out
    assert len(negative_pools.NegativePools(tmp_path / "pools")) >= 1

    missing = subprocess.run(command[:3] + command[4:], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
    assert missing.returncode != 0 and "--output is required" in missing.stderr


def test_captions_over_max_words_are_counted_as_too_long(tmp_path, scenes_data_dir):
    """With the real (lexicon) generator: the embedded dense captions run to 40-120 words, so max_words=12 refuses
    every one and says why, and max_words=200 keeps them all."""
    config = embedded_config(scenes_data_dir)
    config.data.caption_field = "dense_caption"
    short = make_negatives.make_negatives(config, tmp_path / "short", backend="lexicon", max_words=12, limit=5,
                                          log=lambda line: None)
    assert short["captions"] == 5 and short["problems"] == {"too_long": 5} and short["coverage"]["any"] == 0.0
    assert json.loads((tmp_path / "short" / "meta.json").read_text())["max_words"] == 12
    long = make_negatives.make_negatives(config, tmp_path / "long", backend="lexicon", max_words=200, limit=5,
                                         log=lambda line: None)
    assert long["coverage"]["any"] == 1.0 and not long["problems"]
