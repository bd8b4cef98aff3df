"""Convert WebDataset tar shards (img2dataset output) to ArrayRecord files for exact global shuffling.

    python -m jclip.data.sources.convert_webdataset --shards='cc3m/{00000..00331}.tar' --output=cc3m_ar \\
        --num_output_shards=64 [--num_workers=2] [--allow_missing] [--keep_incomplete]

Each record is one raw example serialised by `jclip.data.sources.webdataset.encode_example` (msgpack; no pickle).
Output file j holds the samples of a contiguous block of input shards, so record i of the directory (files
in order) is the i-th sample of the input in listed order: the output is deterministic and independent of
the worker count. Samples lacking an image or a caption are counted and left out unless `--keep_incomplete`;
truncated shards contribute the samples before the damage and are listed. `dataset.json` (written last, so a
directory without it is an unfinished conversion) records the count, the files and the source shards.
Read the result with `jclip.data.sources.webdataset.ArrayRecordSource(output)`. Shards may be read from a bucket
(gs://); an `--output` in a bucket is written in a local temporary folder (ArrayRecord's writer writes local
files only), then copied up, `dataset.json` last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Sequence

from etils import epath

from jclip.data.sources import webdataset
from jclip.paths import is_url, upload_folder

log = logging.getLogger(__name__)

WRITER_OPTIONS = "group_size:1,uncompressed"  # one record per chunk: fast random access; images are compressed


@dataclasses.dataclass
class FileSummary:
    """What went into one output file."""

    path: str
    source_shards: list[str]
    num_examples: int
    stats: webdataset.ReadStats


def _write_file(
    output_path: str,
    shard_paths: Sequence[str],
    *,
    keep_incomplete: bool,
    writer_options: str,
    log_every: int,
    label: str,
) -> FileSummary:
    """Write the samples of `shard_paths`, in order, to one ArrayRecord file (via a temporary name)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    stats = webdataset.ReadStats()
    temporary = output_path + ".tmp"
    writer = ArrayRecordWriter(temporary, writer_options)
    written, started = 0, time.monotonic()
    try:
        for path in shard_paths:
            for example in webdataset.iter_tar_samples(path, stats):
                if keep_incomplete or webdataset.is_complete(example):
                    writer.write(webdataset.encode_example(example))
                    written += 1
                if log_every and stats.samples % log_every == 0:
                    rate = stats.samples / max(time.monotonic() - started, 1e-9)
                    log.info("%s: %d samples read, %d written (%.0f samples/s)", label, stats.samples, written, rate)
    finally:
        writer.close()
    if written:
        os.replace(temporary, output_path)
    else:
        os.remove(temporary)
    log.info("%s: done, %d samples written from %d shards", label, written, len(shard_paths))
    return FileSummary(output_path, list(shard_paths), written, stats)


def _write_file_star(job: tuple) -> FileSummary:
    output_path, shard_paths, kwargs = job
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    return _write_file(output_path, shard_paths, **kwargs)


def split_contiguous(items: Sequence[str], parts: int) -> list[list[str]]:
    """`items` cut into `parts` contiguous blocks whose sizes differ by at most one."""
    return [list(items[len(items) * j // parts : len(items) * (j + 1) // parts]) for j in range(parts)]


def convert(
    shards: str | Sequence[str],
    output: str,
    *,
    num_output_shards: int = 1,
    num_workers: int = 1,
    allow_missing: bool = False,
    keep_incomplete: bool = False,
    writer_options: str = WRITER_OPTIONS,
    log_every: int = 10_000,
    overwrite: bool = False,
) -> dict:
    """Convert shards to ArrayRecord files under `output`; returns the `dataset.json` content."""
    present, missing = webdataset.find_shards(shards)
    webdataset.check_missing_shards(shards, present, missing, allow_missing=allow_missing)
    if num_output_shards < 1:
        raise ValueError(f"num_output_shards must be at least 1, got {num_output_shards}")
    if num_output_shards > len(present):
        log.warning("%d output files asked for %d shards: writing %d", num_output_shards, len(present), len(present))
        num_output_shards = len(present)
    info_path = os.path.join(output, webdataset.DATASET_INFO_FILE)
    if is_url(output):
        return _convert_to_url(present, missing, output, num_output_shards=num_output_shards, num_workers=num_workers,
                               keep_incomplete=keep_incomplete, writer_options=writer_options, log_every=log_every,
                               overwrite=overwrite)
    if os.path.exists(info_path) and not overwrite:
        raise FileExistsError(f"{info_path} exists: {output} already holds a converted dataset (use --overwrite)")
    os.makedirs(output, exist_ok=True)
    if os.path.exists(info_path):
        os.remove(info_path)

    blocks = split_contiguous(present, num_output_shards)
    options = dict(keep_incomplete=keep_incomplete, writer_options=writer_options, log_every=log_every)
    jobs = [
        (
            os.path.join(output, f"data-{j:05d}-of-{num_output_shards:05d}.array_record"),
            block,
            {**options, "label": f"file {j + 1}/{num_output_shards}"},
        )
        for j, block in enumerate(blocks)
    ]
    if num_workers > 1:
        with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
            summaries = list(pool.imap(_write_file_star, jobs))
    else:
        summaries = [_write_file(path, block, **kwargs) for path, block, kwargs in jobs]

    total = webdataset.ReadStats()
    for summary in summaries:
        total.add(summary.stats)
    num_examples = sum(summary.num_examples for summary in summaries)
    if not num_examples:
        raise RuntimeError(f"no sample written from {len(present)} shards (all empty, broken or incomplete)")
    info = {
        "format": webdataset.DATASET_FORMAT,
        "record_version": webdataset.RECORD_VERSION,
        "num_examples": num_examples,
        "files": [
            {"path": os.path.basename(s.path), "num_examples": s.num_examples, "source_shards": s.source_shards}
            for s in summaries
            if s.num_examples
        ],
        "source_shards": present,
        "missing_shards": missing,
        "broken_shards": total.broken_shards,
        "samples_read": total.samples,
        "missing_image": total.missing_image,
        "missing_caption": total.missing_caption,
        "bad_metadata": total.bad_metadata,
        "keep_incomplete": keep_incomplete,
    }
    temporary = info_path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    os.replace(temporary, info_path)
    return info


def _convert_to_url(present: list[str], missing: list[str], output: str, *, overwrite: bool, **options) -> dict:
    """`convert` to a URL: into a local temporary folder, then copied up with dataset.json last (removed first when
    overwriting, so that a reader never opens a half-replaced dataset)."""
    info_path = epath.Path(output) / webdataset.DATASET_INFO_FILE
    if info_path.exists():
        if not overwrite:
            raise FileExistsError(f"{info_path} exists: {output} already holds a converted dataset (use --overwrite)")
        info_path.unlink()
    with tempfile.TemporaryDirectory(prefix="jclip-convert-") as local:
        info = convert(present, local, allow_missing=True, **options)
        info["missing_shards"] = missing
        with open(os.path.join(local, webdataset.DATASET_INFO_FILE), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
        log.info("copying %d files to %s", len(info["files"]), output)
        upload_folder(local, output, last=[webdataset.DATASET_INFO_FILE])
    return info


def summary_text(info: dict) -> str:
    """A few lines saying what the conversion read, wrote and left out."""
    lines = [
        f"samples read:     {info['samples_read']}",
        f"samples written:  {info['num_examples']} in {len(info['files'])} files",
        f"missing image:    {info['missing_image']}",
        f"missing caption:  {info['missing_caption']}",
        f"bad metadata:     {info['bad_metadata']}",
        f"missing shards:   {len(info['missing_shards'])}",
        f"broken shards:    {len(info['broken_shards'])}" + "".join(f"\n  {p}" for p in info["broken_shards"]),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jclip.data.sources.convert_webdataset", description=__doc__.split("\n")[0])
    parser.add_argument("--shards", required=True, help="shard spec: 'dir/{00000..00099}.tar', glob, or @list.txt")
    parser.add_argument("--output", required=True, help="output directory (local, or gs://bucket/folder)")
    parser.add_argument("--num_output_shards", type=int, default=1)
    parser.add_argument("--num_workers", type=int, default=1, help="processes, one output file each at a time")
    parser.add_argument("--allow_missing", action="store_true", help="skip missing shards (with a warning)")
    parser.add_argument("--keep_incomplete", action="store_true", help="also write samples lacking image/caption")
    parser.add_argument("--writer_options", default=WRITER_OPTIONS)
    parser.add_argument("--log_every", type=int, default=10_000, help="progress line every N samples per file")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    try:
        info = convert(
            args.shards,
            args.output,
            num_output_shards=args.num_output_shards,
            num_workers=args.num_workers,
            allow_missing=args.allow_missing,
            keep_incomplete=args.keep_incomplete,
            writer_options=args.writer_options,
            log_every=args.log_every,
            overwrite=args.overwrite,
        )
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(summary_text(info))
    print(f"wrote {os.path.join(args.output, webdataset.DATASET_INFO_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
