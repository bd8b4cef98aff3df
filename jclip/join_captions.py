"""Join recaptions from any captioner onto a config's training data, without rewriting its images.

    python -m jclip.join_captions --config=configs/clip.py --captions=recaps.jsonl --output=/data/recaps
    python -m jclip.main --config=configs/clip.py --workdir=/tmp/run \\
        --config.data.recaptions=/data/recaps --config.data.caption_rule=mixed:0.5

For the improved-captions method (Stone et al., arXiv 2412.15396), which trains on dense recaptions. Reads
`--captions`, a JSONL file of one `{"key": "...", "caption": "..."}` object per line (other members are
ignored, blank lines skipped), and the example keys of the config's training data (every mixture component,
or `--component`; `--split`, default each component's train split); writes the recaptions of the keys the
data has to the folder `--output` (`jclip.data.recaptions`), which the `joined_captions` op (shorthand
`data.recaptions=DIR`) reads. Prints the lines read, the captions joined, the file's keys that the data
lacks and the examples without a recaption (counts and the first few of each).

Errors, naming the line: a malformed line (not JSON, not an object, `key` or `caption` missing, not a
string, or blank), and a key given twice (no last-one-wins: two captions for one image mean a broken
captioner run). Also errors: a key that two training components share (they could not be told apart; join
onto one with `--component`), and a file with no key in common with the data (the keys are likely written
differently: both kinds are shown).

Keys are those of jclip's raw examples: img2dataset's sample key for tar shards (`000010123`, listed from the
tar headers without reading images), `name:split:index` for TFDS sources (`jclip_scenes/default:train:17`),
the image path for folder sources, `example_id` for DOCCI; other random-access sources are read whole for
their keys.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from absl import app, flags
from etils import epath
from ml_collections import config_flags

from jclip.cli import parse_flags, user_error


def _define_flags() -> None:
    """The command's flags, defined only when it runs: importing this module for its functions defines none, so it
    can share a process with the other commands (whose `--config` and `--output` would clash)."""
    config_flags.DEFINE_config_file("config", None, "The training config whose data the captions join.",
                                    lock_config=True)
    flags.DEFINE_string("captions", None, 'The JSONL file of {"key": ..., "caption": ...} lines.')
    flags.DEFINE_string("output", None, "The recaptions folder to write (local, or gs://).")
    flags.DEFINE_string("field", "dense_caption", "The caption field joined_captions writes (recorded in the "
                        "folder; data.recaptions uses it).")
    flags.DEFINE_string("split", None, "The split whose keys to join (default: each component's train split).")
    flags.DEFINE_string("component", None, "Join onto this mixture component only (default: all).")


#: How many keys the report lists of each kind.
FIRST_FEW = 5
#: A progress line every this many lines or keys.
PROGRESS_EVERY = 100_000


class CaptionsFileError(ValueError):
    """A captions file that cannot be joined as it is (a malformed line, a key given twice)."""


def read_captions(path: str | os.PathLike, log: Callable[[str], None] = print) -> tuple[dict[str, str], int, int]:
    """(key -> caption in file order, lines read, blank lines) of a captions JSONL file, local or a URL (gs://);
    `CaptionsFileError` for a malformed line or a key given twice, naming the line(s)."""
    path = epath.Path(path)
    captions: dict[str, str] = {}
    first_line: dict[str, int] = {}
    lines = blank = 0
    with path.open("rb") as file:
        for number, raw in enumerate(file, start=1):
            lines = number
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise CaptionsFileError(f"{path} line {number} is not UTF-8 ({error})") from None
            if not line.strip():
                blank += 1
                continue
            key, caption = _parse_line(line, number, path)
            if key in first_line:
                raise CaptionsFileError(f"{path} line {number}: key {key!r} was already given on line "
                                        f"{first_line[key]}; give each key one caption")
            first_line[key] = number
            captions[key] = caption
            if number % PROGRESS_EVERY == 0:
                log(f"join_captions: read {number} lines of {path.name}")
    return captions, lines, blank


def _parse_line(line: str, number: int, path: epath.Path) -> tuple[str, str]:
    where = f"{path} line {number}"
    try:
        record = json.loads(line)
    except ValueError as error:
        raise CaptionsFileError(f"{where} is not JSON ({error}): {line.strip()[:80]!r}") from None
    if not isinstance(record, dict):
        raise CaptionsFileError(f'{where} is not a JSON object {{"key": ..., "caption": ...}}: {line.strip()[:80]!r}')
    for name in ("key", "caption"):
        value = record.get(name)
        if value is None:
            problem = f"has no {name!r}"
        elif not isinstance(value, str):
            problem = f"has a {type(value).__name__} {name!r} ({value!r})"
        elif not value.strip():
            problem = f"has a blank {name!r}"
        else:
            continue
        raise CaptionsFileError(f"{where} {problem}; each line needs a non-blank string {name!r}")
    return record["key"], record["caption"]


def data_without_recaptions(config: Any) -> Any:
    """The config's data settings without `recaptions` (the folder this command makes need not exist yet) and
    without `hard_negatives` (nor need pools made from its captions)."""
    from jclip.data.configured import ConfiguredData

    data_config = copy.deepcopy(config.data)
    for settings in [data_config, *(data_config.get("mixture") or {}).values()]:
        for name in ("recaptions", "hard_negatives"):
            if settings.get(name):
                settings[name] = None
    return ConfiguredData(data_config, config.model)


def source_keys(config: Any, split: str | None = None, component: str | None = None,
                log: Callable[[str], None] = print) -> tuple[list[str], dict[str, int]]:
    """(every training example key in source order, examples per component); ValueError for a key seen twice."""
    data = data_without_recaptions(config)
    names = data.component_names()
    if component is not None and component not in names:
        raise ValueError(f"--component={component!r}: the training components are {names}")
    owners: dict[str, str] = {}
    keys: list[str] = []
    counts: dict[str, int] = {}
    for name in names if component is None else [component]:
        count = 0
        for key in data.training_keys(name, split):
            if key in owners:
                where = "twice in" if owners[key] == name else f"in both {owners[key]!r} and"
                raise ValueError(f"example key {key!r} is {where} training component {name!r}: recaptions are joined "
                                 f"by key, so keys must be unique (join onto one component with --component)")
            owners[key] = name
            keys.append(key)
            count += 1
            if count % PROGRESS_EVERY == 0:
                log(f"join_captions: {name}: listed {count} example keys")
        counts[name] = count
        log(f"join_captions: {name}: {count} examples")
    return keys, counts


def join_captions(config: Any, captions_path: str | os.PathLike, output: str | os.PathLike, *,
                  field: str = "dense_caption", split: str | None = None, component: str | None = None,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Joins the captions file onto the config's training keys, writes the folder `output`, returns the report."""
    from jclip.data import recaptions

    captions, lines, blank = read_captions(captions_path, log)
    log(f"join_captions: {len(captions)} captions in {lines} lines")
    keys, counts = source_keys(config, split, component, log)
    present = set(keys)
    joined = {key: caption for key, caption in captions.items() if key in present}
    not_in_source = [key for key in captions if key not in present]
    without = [key for key in keys if key not in captions]
    if not joined:
        raise ValueError(f"no key of {captions_path} is an example key of the training data ({len(keys)} examples): "
                         f"the file's keys look like {list(captions)[:3]}, the data's like {keys[:3]}")
    report = {
        "captions_file": str(captions_path), "lines": lines, "blank_lines": blank, "captions": len(captions),
        "examples": len(keys), "examples_per_component": counts, "split": split, "component": component,
        "joined": len(joined), "not_in_source": len(not_in_source), "not_in_source_first": not_in_source[:FIRST_FEW],
        "without_recaption": len(without), "without_recaption_first": without[:FIRST_FEW],
    }
    directory = recaptions.write_recaptions(output, joined, field=field, source=_source_description(config),
                                            extra_meta={"report": report})
    return {**report, "output": str(directory), "field": field}


def _source_description(config: Any) -> dict[str, Any]:
    data = config.data
    mixture = {name: dict(entry) for name, entry in (data.get("mixture") or {}).items()}
    return {"source": None if mixture else data.source, "mixture": mixture or None, "train_split": data.train_split}


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    """The report as the lines the command prints."""
    def first(keys: list[str], count: int) -> str:
        return f" (first: {', '.join(map(repr, keys))}{', ...' if count > len(keys) else ''})" if count else ""

    return [
        f"captions file: {report['captions_file']}: {report['lines']} lines, {report['captions']} captions"
        + (f" ({report['blank_lines']} blank lines)" if report["blank_lines"] else ""),
        f"training examples: {report['examples']} ("
        + ", ".join(f"{name} {count}" for name, count in report["examples_per_component"].items()) + ")",
        f"joined: {report['joined']} recaptions",
        f"keys in the captions file not in the data: {report['not_in_source']}"
        + first(report["not_in_source_first"], report["not_in_source"]),
        f"examples without a recaption: {report['without_recaption']}"
        + first(report["without_recaption_first"], report["without_recaption"])
        + (" (skipped in training as missing_recaption)" if report["without_recaption"] else ""),
        f"recaptions written to {report['output']} (field {report['field']})",
    ]


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    values = flags.FLAGS
    for name in ("config", "captions", "output"):
        if values[name].value is None:
            raise app.UsageError(f"--{name} is required")
    from jclip.errors import ConfigError

    try:
        report = join_captions(values.config, values.captions, values.output, field=values.field, split=values.split,
                               component=values.component, log=lambda line: print(line, flush=True))
    except (ConfigError, FileNotFoundError, ValueError) as error:
        user_error(f"jclip.join_captions: {error}", error)
    for line in summary_lines(report):
        print(line, flush=True)


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=parse_flags)
