"""WebDataset tar shards (img2dataset output: CC3M, CC12M, LAION, DataComp) as jclip data.

A shard is a tar whose members are grouped into samples by key (the member path with the basename cut at
its first dot; `000123.jpg`, `000123.txt`, `000123.json` form sample `000123`), the members of one sample
being consecutive. This module gives:

- `expand_shards`: brace ranges (`{00000..00999}`), comma lists (`{a,b}`), globs, lists and `@list.txt`
  files to a list of shard paths, with missing shards an error (or a counted warning).
- `iter_tar_samples`: the samples of one shard in jclip's canonical raw form (see `iter_tar_samples`).
  A truncated or corrupt shard ends early with a warning and is counted in `ReadStats`; it never stops a run.
- `webdataset_training_dataset`: the infinite, host-sharded, buffer-shuffled training stream as a Grain
  `IterDataset` whose iterator state (checkpointed with the model) resumes to the exact sample.
- `ArrayRecordSource`: random access to the output of `python -m jclip.data.sources.convert_webdataset`, for the
  random-access pipeline of `jclip.data.pipeline` with its exact global shuffle.

Streaming order. Epoch e permutes the shard list with a key derived from (seed, e); process p of P reads
positions p, p+P, ... of that permutation (disjoint shard sets; together every shard once per epoch).
Samples go through a shuffle buffer of `shuffle_buffer` samples, which drains at the end of each epoch, so
every epoch yields each readable sample of the process's shards exactly once. Every random choice is a
splitmix64 hash of integers (no RNG state, no dependence on NumPy's stream), so the order is a pure function
of (shards, seed, process, epoch) and the iterator state is a handful of integers plus the buffer's
(shard, sample offset) references, which are re-read on restore (tar headers make skipping cheap). Each
training example carries its epoch in `jclip.data.pipeline.EPOCH_FIELD`, as the random-access pipeline's do.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import msgpack

from jclip.data.pipeline import EPOCH_FIELD, HostShard
from jclip.paths import glob_files, is_file, is_url, open_file

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSION = "txt"
METADATA_EXTENSION = "json"
_READ_EXTENSIONS = frozenset(IMAGE_EXTENSIONS + (CAPTION_EXTENSION, METADATA_EXTENSION))

RawExample = dict[str, Any]

# --------------------------------------------------------------------------------------------------------
# Shard lists.

_RANGE = re.compile(r"^(\d+)\.\.(\d+)(?:\.\.(\d+))?$")
_GLOB_CHARS = re.compile(r"[*?[]")


def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion: `a{1..3}` (zero padding kept, optional `..step`), `{x,y}`, nested, several."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth, last, end, alternatives = 0, start + 1, -1, []
    for i in range(start, len(pattern)):
        char = pattern[i]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                end = i
                break
        elif char == "," and depth == 1:
            alternatives.append(pattern[last:i])
            last = i + 1
    if end < 0:
        raise ValueError(f"unbalanced '{{' in shard pattern {pattern!r}")
    alternatives.append(pattern[last:end])
    if len(alternatives) == 1:
        alternatives = _expand_range(alternatives[0], pattern)
    prefix, suffix = pattern[:start], pattern[end + 1 :]
    return [out for alternative in alternatives for out in expand_braces(prefix + alternative + suffix)]


def _expand_range(body: str, pattern: str) -> list[str]:
    match = _RANGE.match(body)
    if not match:
        raise ValueError(f"cannot expand {{{body}}} in {pattern!r}: expected {{a,b,...}} or {{first..last}}")
    first, last, step = match.group(1), match.group(2), int(match.group(3) or 1)
    if step == 0:
        raise ValueError(f"zero step in {{{body}}} of {pattern!r}")
    padded = any(len(s) > 1 and s.startswith("0") for s in (first, last))
    width = max(len(first), len(last)) if padded else 0
    lo, hi = int(first), int(last)
    numbers = range(lo, hi + 1, step) if lo <= hi else range(lo, hi - 1, -step)
    return [str(n).zfill(width) for n in numbers]


def find_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[str], list[str]]:
    """(present, missing) shard paths of a spec, in spec order; see `expand_shards` for the spec forms."""
    return _find_shards(spec, base_dir=None)


def _find_shards(spec: Any, base_dir: str | None) -> tuple[list[str], list[str]]:
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    present: list[str] = []
    missing: list[str] = []
    for item in items:
        item = os.fspath(item).strip()
        if not item:
            continue
        if item.startswith("@"):
            list_file = _resolve(item[1:], base_dir)
            if not is_file(list_file):
                raise FileNotFoundError(f"shard list file {list_file!r} does not exist")
            with open_file(list_file, "r") as f:
                lines = [line.strip() for line in f]
            entries = [line for line in lines if line and not line.startswith("#")]
            more_present, more_missing = _find_shards(entries, base_dir=os.path.dirname(list_file))
            present += more_present
            missing += more_missing
            continue
        for pattern in expand_braces(item):
            pattern = _resolve(pattern, base_dir)
            if _GLOB_CHARS.search(pattern):
                matches = glob_files(pattern)
                if matches:
                    present.extend(matches)
                else:
                    missing.append(pattern)
            elif is_file(pattern):
                present.append(pattern)
            else:
                missing.append(pattern)
    return present, missing


def _resolve(path: str, base_dir: str | None) -> str:
    path = os.path.expanduser(path)
    return path if base_dir is None or os.path.isabs(path) or is_url(path) else os.path.join(base_dir, path)


def expand_shards(
    spec: str | os.PathLike | Sequence[str | os.PathLike], *, allow_missing: bool = False
) -> list[str]:
    """The shard paths of a spec, checked to exist.

    A spec is a path pattern (brace ranges and lists, globs), `@file.txt` (one pattern a line, `#` comments,
    relative paths taken from the list file's folder), or a list of those. Missing shards (and globs that
    match nothing) raise `FileNotFoundError` naming them; with `allow_missing` they are logged once as a
    warning with their count and left out (`find_shards` returns them, for callers that count them).
    """
    present, missing = find_shards(spec)
    check_missing_shards(spec, present, missing, allow_missing=allow_missing)
    return present


def check_missing_shards(spec: Any, present: list[str], missing: list[str], *, allow_missing: bool) -> None:
    """Raise `FileNotFoundError` naming the missing shards (or, with `allow_missing`, log them once)."""
    if missing:
        total = len(present) + len(missing)
        shown = ", ".join(missing[:20]) + (f", ... ({len(missing) - 20} more)" if len(missing) > 20 else "")
        if not allow_missing:
            raise FileNotFoundError(f"{len(missing)} of {total} shards are missing: {shown}")
        log.warning("%d of %d shards are missing and left out: %s", len(missing), total, shown)
    if not present:
        raise FileNotFoundError(f"no shard found for {spec!r}")


# --------------------------------------------------------------------------------------------------------
# Reading one shard.


@dataclasses.dataclass
class ReadStats:
    """Counters of what reading saw: samples, the ones missing an image or caption, bad metadata, broken shards."""

    samples: int = 0
    missing_image: int = 0
    missing_caption: int = 0
    bad_metadata: int = 0
    broken_shards: list[str] = dataclasses.field(default_factory=list)

    @property
    def num_broken_shards(self) -> int:
        return len(self.broken_shards)

    def add(self, other: "ReadStats") -> None:
        self.samples += other.samples
        self.missing_image += other.missing_image
        self.missing_caption += other.missing_caption
        self.bad_metadata += other.bad_metadata
        self.broken_shards += other.broken_shards


class _TruncatedShard(Exception):
    """The tar ended without its end-of-archive blocks (a cut-off download or copy)."""


def is_complete(example: RawExample) -> bool:
    """Whether a raw example has both an image and a caption (the stage after reading skips the others)."""
    return example["image"] is not None and example["caption"] is not None


def iter_tar_samples(path: str, stats: ReadStats | None = None) -> Iterator[RawExample]:
    """The samples of one shard, in tar order, as canonical raw examples.

    A raw example is `{"key": str, "image": bytes | None (the encoded file, first of .jpg/.jpeg/.png/.webp),
    "caption": str (UTF-8 .txt; bytes if not UTF-8) | None, "metadata": dict (parsed .json, {} if absent)}`.
    Samples lacking an image or caption are yielded with None (counted in `stats`). A truncated or corrupt
    shard yields the samples before the damage, logs a warning and is added to `stats.broken_shards`.
    """
    for _, example in _shard_samples(path, stats=stats):
        yield example


def shard_keys(path: str) -> Iterator[str]:
    """The sample keys of one shard in tar order, exactly those `iter_tar_samples` yields, from the tar headers
    alone (for joining data by key, `python -m jclip.join_captions`, without reading images).

    As in reading, a key is given once the next sample or the archive's end shows its sample complete, and a
    damaged shard stops at the damage with a warning.
    """
    key = None
    try:
        with open_file(path) as file, tarfile.open(fileobj=file, mode="r:*") as tar:
            while True:
                info = tar.next()
                if info is None:
                    _check_end_of_archive(tar)
                    break
                if not info.isfile():
                    continue
                member_key, _ = _split_member_name(info.name)
                if member_key.rpartition("/")[2] and member_key != key:
                    if key is not None:
                        yield key
                    key = member_key
            if key is not None:
                yield key
    except (tarfile.TarError, _TruncatedShard, EOFError, OSError, zlib.error) as error:
        log.warning("broken shard %s: its keys from %r on are not listed: %s", path, key, error)


def _split_member_name(name: str) -> tuple[str, str]:
    """(sample key, lower-case extension) of a tar member: `dir/000123.seg.png` -> (`dir/000123`, `seg.png`)."""
    while name.startswith("./"):
        name = name[2:]
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _shard_samples(
    path: str,
    *,
    start: int = 0,
    only: frozenset[int] | None = None,
    stats: ReadStats | None = None,
) -> Iterator[tuple[int, RawExample]]:
    """(sample offset, raw example) of one shard from offset `start`, or only the offsets in `only`.

    Samples that are not wanted are stepped over by their tar headers without reading their data. A sample
    is only yielded once the next member (or the archive's end) shows it complete; a damaged shard stops.
    """
    stats = stats if stats is not None else ReadStats()
    last_wanted = None if only is None else max(only, default=-1)

    def wanted(offset: int) -> bool:
        return offset >= start and (only is None or offset in only)

    index, key, parts = -1, None, {}
    try:
        with open_file(path) as file, tarfile.open(fileobj=file, mode="r:*") as tar:
            while True:
                info = tar.next()
                if info is None:
                    _check_end_of_archive(tar)
                    break
                if not info.isfile():
                    continue
                member_key, extension = _split_member_name(info.name)
                if not member_key.rpartition("/")[2]:
                    continue  # dot files such as macOS `._x` are not samples
                if member_key != key:
                    if key is not None and wanted(index):
                        yield index, _raw_example(key, parts, stats)
                    if last_wanted is not None and index >= last_wanted:
                        return
                    index, key, parts = index + 1, member_key, {}
                if extension in _READ_EXTENSIONS and extension not in parts and wanted(index):
                    parts[extension] = tar.extractfile(info).read()
            if key is not None and wanted(index):
                yield index, _raw_example(key, parts, stats)
    except (tarfile.TarError, _TruncatedShard, EOFError, OSError, zlib.error) as error:
        stats.broken_shards.append(path)
        log.warning("broken shard %s after %d samples, the rest of it is skipped: %s", path, max(index, 0), error)


def _check_end_of_archive(tar: tarfile.TarFile) -> None:
    """Raise `_TruncatedShard` unless a zero block follows the last member (tarfile itself stops silently)."""
    tar.fileobj.seek(tar.offset)
    block = tar.fileobj.read(tarfile.BLOCKSIZE)
    if block != tarfile.NUL * tarfile.BLOCKSIZE:
        raise _TruncatedShard(f"no end-of-archive block at byte {tar.offset}")


def _raw_example(key: str, parts: dict[str, bytes], stats: ReadStats) -> RawExample:
    image = next((data for extension, data in parts.items() if extension in IMAGE_EXTENSIONS and data), None)
    caption: str | bytes | None = parts.get(CAPTION_EXTENSION)
    if caption is not None:
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError:
            pass
    metadata: dict[str, Any] = {}
    if METADATA_EXTENSION in parts:
        try:
            parsed = json.loads(parts[METADATA_EXTENSION])
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            metadata = parsed
        else:
            stats.bad_metadata += 1
    stats.samples += 1
    stats.missing_image += image is None
    stats.missing_caption += caption is None
    return {"key": key, "image": image, "caption": caption, "metadata": metadata}


# --------------------------------------------------------------------------------------------------------
# Streaming training dataset.

_MASK64 = (1 << 64) - 1
_ORDER_TAG = 0x5348_4152_444F_5244  # domain separation of the shard permutation and the buffer picks
_PICK_TAG = 0x4255_4646_4552_5049


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def _hash(*values: int) -> int:
    """A 64-bit hash of integers, stable across Python and NumPy versions."""
    state = 0
    for value in values:
        state = _splitmix64(state ^ (value & _MASK64))
    return state


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The permutation of shard indices of one epoch (Fisher-Yates driven by hashes of (seed, epoch, i))."""
    order = list(range(num_shards))
    for i in range(num_shards - 1, 0, -1):
        j = _hash(_ORDER_TAG, seed, epoch, i) % (i + 1)
        order[i], order[j] = order[j], order[i]
    return order


class WebDatasetIterDataset(grain.IterDataset):
    """The infinite training stream of raw examples of one process (see the module docstring)."""

    def __init__(self, shards: Sequence[str], *, seed: int, shard: HostShard, shuffle_buffer: int):
        super().__init__()
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be at least 1, got {shuffle_buffer}")
        if len(shards) < shard.count:
            raise ValueError(
                f"{len(shards)} shards cannot be split over {shard.count} processes: every process needs at "
                "least one shard per epoch (use fewer processes or more, smaller shards)"
            )
        self.shards = tuple(shards)
        self.stream_seed = int(seed)
        self.host = shard
        self.shuffle_buffer = int(shuffle_buffer)
        self.worker = (0, 1)  # (index, count) of this Grain worker within the process; see `set_slice`
        self.missing_shards: list[str] = []  # left out by `allow_missing`, for reporting

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """Grain worker slicing (`mp_prefetch`): worker i of W reads every W-th of the process's shards."""
        del sequential_slice  # the shard order is random anyway; strided and contiguous are equivalent
        index, count = sl.start or 0, sl.step or 1
        if len(self.shards) < self.host.count * count:
            raise ValueError(
                f"{len(self.shards)} shards are too few for {self.host.count} processes x {count} workers"
            )
        self.worker = (index, count)

    def epoch_shards(self, epoch: int) -> list[int]:
        """Indices into `shards` that this process (and worker) reads in `epoch`, in reading order."""
        order = shard_order(len(self.shards), self.stream_seed, epoch)
        mine = order[self.host.index :: self.host.count]
        return mine[self.worker[0] :: self.worker[1]]

    def __iter__(self) -> "WebDatasetIterator":
        return WebDatasetIterator(self)

    def __str__(self) -> str:
        return (
            f"WebDatasetIterDataset({len(self.shards)} shards, process {self.host.index}/{self.host.count}, "
            f"buffer {self.shuffle_buffer})"
        )


class WebDatasetIterator(grain.DatasetIterator):
    """Reads the shards of each epoch in order through a seeded shuffle buffer; exactly resumable.

    State (JSON-able ints): `epoch`; `shard_position` (index into this epoch's shard list of the shard being
    read); `sample_offset` (next sample to read in it); `buffer_shards` / `buffer_offsets` (the buffered
    samples as (index into the shard list, sample offset), in buffer order); `yielded` (elements returned
    so far, which keys the buffer picks); plus `num_shards`, `seed`, `process`, `worker`, `shuffle_buffer`,
    checked on restore. `stats` counts what this iterator read (not checkpointed).
    """

    def __init__(self, dataset: WebDatasetIterDataset):
        super().__init__()
        self._dataset = dataset
        self.stats = ReadStats()
        self._reader: Iterator[tuple[int, RawExample]] | None = None
        self._start_epoch(0)
        self._yielded = 0

    def _start_epoch(self, epoch: int) -> None:
        self._close_reader()
        self._epoch = epoch
        self._epoch_shards = self._dataset.epoch_shards(epoch)
        self._position = 0
        self._offset = 0
        # The shuffle buffer as parallel lists, so that `get_state` is two list copies (it runs once per
        # element or batch under Grain's prefetching).
        self._buffer: list[RawExample] = []
        self._buffer_shards: list[int] = []
        self._buffer_offsets: list[int] = []

    def _close_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _fill(self) -> None:
        """Read samples into the buffer until it is full or this epoch's shards are done."""
        while len(self._buffer) < self._dataset.shuffle_buffer and self._position < len(self._epoch_shards):
            shard_id = self._epoch_shards[self._position]
            if self._reader is None:
                self._reader = _shard_samples(self._dataset.shards[shard_id], start=self._offset, stats=self.stats)
            item = next(self._reader, None)
            if item is None:
                self._close_reader()
                self._position += 1
                self._offset = 0
                continue
            offset, example = item
            self._buffer.append(example)
            self._buffer_shards.append(shard_id)
            self._buffer_offsets.append(offset)
            self._offset = offset + 1

    def __next__(self) -> RawExample:
        self._assert_not_closed()
        while True:
            fresh_epoch = self._position == 0 and self._offset == 0 and not self._buffer
            self._fill()
            if self._buffer:
                break
            if fresh_epoch:
                paths = [self._dataset.shards[i] for i in self._epoch_shards]
                raise RuntimeError(f"epoch {self._epoch}: no sample in any of this process's shards {paths}")
            self._start_epoch(self._epoch + 1)
        worker_index = self._dataset.worker[0]
        pick = _hash(_PICK_TAG, self._dataset.stream_seed, self._dataset.host.index, worker_index, self._yielded)
        j = pick % len(self._buffer)
        example = self._buffer[j]
        for buffer in (self._buffer, self._buffer_shards, self._buffer_offsets):
            buffer[j] = buffer[-1]
            buffer.pop()
        self._yielded += 1
        return {**example, EPOCH_FIELD: self._epoch}

    def _fingerprint(self) -> dict[str, Any]:
        ds = self._dataset
        return {
            "num_shards": len(ds.shards),
            "seed": ds.stream_seed,
            "process": [ds.host.index, ds.host.count],
            "worker": list(ds.worker),
            "shuffle_buffer": ds.shuffle_buffer,
        }

    def get_state(self) -> dict[str, Any]:
        return {
            "epoch": self._epoch,
            "shard_position": self._position,
            "sample_offset": self._offset,
            "buffer_shards": list(self._buffer_shards),
            "buffer_offsets": list(self._buffer_offsets),
            "yielded": self._yielded,
            **self._fingerprint(),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        expected = self._fingerprint()
        found = {name: _plain(state.get(name)) for name in expected}
        if found != expected:
            raise ValueError(f"the iterator state belongs to another stream: state has {found}, this is {expected}")
        self._start_epoch(int(state["epoch"]))
        self._position = int(state["shard_position"])
        self._offset = int(state["sample_offset"])
        self._yielded = int(state["yielded"])
        self._buffer_shards = [int(s) for s in state["buffer_shards"]]
        self._buffer_offsets = [int(o) for o in state["buffer_offsets"]]
        self._buffer = self._reread(list(zip(self._buffer_shards, self._buffer_offsets, strict=True)))

    def _reread(self, refs: list[tuple[int, int]]) -> list[RawExample]:
        """The buffered samples named by (shard index, offset), read again (each shard once, headers skipped)."""
        wanted: dict[int, set[int]] = {}
        for shard_id, offset in refs:
            wanted.setdefault(shard_id, set()).add(offset)
        found: dict[tuple[int, int], RawExample] = {}
        for shard_id, offsets in wanted.items():
            for offset, example in _shard_samples(self._dataset.shards[shard_id], only=frozenset(offsets)):
                found[(shard_id, offset)] = example
        lost = [ref for ref in refs if ref not in found]
        if lost:
            paths = sorted({self._dataset.shards[s] for s, _ in lost})
            raise RuntimeError(f"cannot restore the shuffle buffer: samples {lost[:5]} no longer readable in {paths}")
        return [found[ref] for ref in refs]

    def close(self) -> None:
        self._close_reader()
        super().close()

    def __str__(self) -> str:
        return f"WebDatasetIterator(epoch {self._epoch}, shard {self._position}, offset {self._offset})"


def _plain(value: Any) -> Any:
    """State values as plain ints/lists (states may come back from JSON or NumPy)."""
    if isinstance(value, (list, tuple)) or getattr(value, "ndim", 0) > 0:
        return [int(v) for v in value]
    return None if value is None else int(value)


def webdataset_training_dataset(
    shards: str | Sequence[str],
    *,
    seed: int,
    shard: HostShard,
    shuffle_buffer: int,
    allow_missing: bool = False,
) -> WebDatasetIterDataset:
    """The infinite, shuffled stream of raw examples of process `shard.index` over tar shards.

    `shards` is a spec for `expand_shards`. Elements are raw examples, incomplete ones included: the next
    stage skips and counts them (`jclip.data.robust`), or drops them with `.filter(is_complete)`. Hosts read disjoint shard sets (`len(shards) >= shard.count`).
    Shards left out by `allow_missing` are in the result's `missing_shards`.
    """
    present, missing = find_shards(shards)
    check_missing_shards(shards, present, missing, allow_missing=allow_missing)
    dataset = WebDatasetIterDataset(present, seed=seed, shard=shard, shuffle_buffer=shuffle_buffer)
    dataset.missing_shards = missing
    return dataset


# --------------------------------------------------------------------------------------------------------
# Converted data: ArrayRecord files of serialised raw examples.

DATASET_INFO_FILE = "dataset.json"
DATASET_FORMAT = "jclip.webdataset.array_record"
RECORD_VERSION = 1


def encode_example(example: RawExample) -> bytes:
    """A raw example as one msgpack map (bytes stay bytes, str stays str; metadata as JSON text, exact)."""
    return msgpack.packb(
        {
            "v": RECORD_VERSION,
            "key": example["key"],
            "image": example["image"],
            "caption": example["caption"],
            "metadata": json.dumps(example["metadata"], ensure_ascii=False, separators=(",", ":")),
        },
        use_bin_type=True,
    )


def decode_example(record: bytes) -> RawExample:
    """Inverse of `encode_example`."""
    fields = msgpack.unpackb(record, raw=False)
    if fields.get("v") != RECORD_VERSION:
        raise ValueError(f"record version {fields.get('v')!r} is not {RECORD_VERSION}")
    return {
        "key": fields["key"],
        "image": fields["image"],
        "caption": fields["caption"],
        "metadata": json.loads(fields["metadata"]),
    }


class ArrayRecordSource:
    """Random access (len, [i]) to a converted directory, local or a URL (gs://, which ArrayRecord's reader reads
    itself): item i is the i-th raw example, in source order."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        info_path = os.path.join(self.directory, DATASET_INFO_FILE)
        try:
            with open_file(info_path, "r") as f:
                self.info = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{info_path} does not exist: {self.directory} is not a converted dataset (or its "
                                    f"conversion did not finish); make it with python -m "
                                    f"jclip.data.sources.convert_webdataset") from None
        if self.info.get("format") != DATASET_FORMAT:
            raise ValueError(f"{info_path} is not a {DATASET_FORMAT} dataset (format {self.info.get('format')!r})")
        paths = [os.path.join(self.directory, entry["path"]) for entry in self.info["files"]]
        if not paths:
            raise ValueError(f"{info_path} lists no files")
        self._records = grain.sources.ArrayRecordDataSource(paths)
        if len(self._records) != self.info["num_examples"]:
            raise ValueError(
                f"{self.directory}: {len(self._records)} records, dataset.json says {self.info['num_examples']}"
            )

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> RawExample:
        return decode_example(self._records[index])

    def __getitems__(self, indices: Sequence[int]) -> list[RawExample]:
        return [decode_example(record) for record in self._records.__getitems__(indices)]

    def __repr__(self) -> str:
        return f"ArrayRecordSource({self.directory!r}, {len(self)} examples)"
