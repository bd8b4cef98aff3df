"""WebDataset tar shards: shard specs, sample grouping, broken shards, the streaming dataset (host sharding,
per-epoch order, exact resume) and the ArrayRecord converter, all on small shards the tests write."""

from __future__ import annotations

import io
import json
import logging
import os
import pathlib
import tarfile

import numpy as np
import pytest
from PIL import Image

from jclip.data import pipeline

from jclip.data.sources import convert_webdataset, webdataset
from jclip.data.pipeline import HostShard

SAMPLES_PER_SHARD = 5
GOOD_SHARDS = 6  # 00000..00005; 00006 is truncated inside the data of its fourth sample


def jpeg_bytes(value: int, fmt: str = "JPEG") -> bytes:
    image = Image.new("RGB", (8, 8), (value * 37 % 256, value * 11 % 256, value * 5 % 256))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def shard_bytes(shard: int) -> bytes:
    """One img2dataset-like shard: {key}.jpg/.txt/.json per sample; one caption and one .png variant."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for i in range(SAMPLES_PER_SHARD):
            key = f"{shard:05d}{i:04d}"
            value = shard * SAMPLES_PER_SHARD + i
            if (shard, i) == (3, 1):
                add_member(tar, f"{key}.png", jpeg_bytes(value, "PNG"))
            else:
                add_member(tar, f"{key}.jpg", jpeg_bytes(value))
            if (shard, i) != (2, 3):
                add_member(tar, f"{key}.txt", f"caption {value} – café".encode())
            add_member(tar, f"{key}.json", json.dumps({"key": key, "width": 8, "score": value / 7}).encode())
    return buffer.getvalue()


def truncated_shard_bytes(shard: int) -> bytes:
    """A shard cut in the middle of the image data of its fourth sample."""
    data = shard_bytes(shard)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = tar.getmember(f"{shard:05d}0003.jpg")
    return data[: member.offset_data + 10]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> pathlib.Path:
    directory = tmp_path_factory.mktemp("wds")
    for shard in range(GOOD_SHARDS):
        (directory / f"{shard:05d}.tar").write_bytes(shard_bytes(shard))
    (directory / f"{GOOD_SHARDS:05d}.tar").write_bytes(truncated_shard_bytes(GOOD_SHARDS))
    return directory


@pytest.fixture(scope="module")
def all_shards(shard_dir) -> list[str]:
    return [str(shard_dir / f"{shard:05d}.tar") for shard in range(GOOD_SHARDS + 1)]


@pytest.fixture(scope="module")
def readable_samples(all_shards) -> list[dict]:
    """Every sample the shards hold (the truncated one's first three), in listed order."""
    return [example for path in all_shards for example in webdataset.iter_tar_samples(path)]


# ---------------------------------------------------------------------------------------------- shard specs


def test_brace_expansion_ranges_lists_and_several_braces():
    assert webdataset.expand_braces("s/{00008..00011}.tar") == [f"s/{i:05d}.tar" for i in range(8, 12)]
    assert webdataset.expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
    assert webdataset.expand_braces("x{0..6..3}") == ["x0", "x3", "x6"]
    assert webdataset.expand_braces("{p{1..2},q}.tar") == ["p1.tar", "p2.tar", "q.tar"]
    assert webdataset.expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="unbalanced"):
        webdataset.expand_braces("s/{0..3.tar")


def test_shard_specs_braces_globs_lists_and_list_files(shard_dir, all_shards, tmp_path):
    assert webdataset.expand_shards(f"{shard_dir}/{{00000..00006}}.tar") == all_shards
    assert webdataset.expand_shards(f"{shard_dir}/*.tar") == all_shards
    assert webdataset.expand_shards([all_shards[3], f"{shard_dir}/0000{{1,0}}.tar"]) == [
        all_shards[3], all_shards[1], all_shards[0]
    ]
    list_file = shard_dir / "train.txt"  # relative entries are taken from the list file's folder
    list_file.write_text("# training shards\n00002.tar\n\n{00004..00005}.tar\n" + all_shards[0] + "\n")
    assert webdataset.expand_shards(f"@{list_file}") == [all_shards[2], all_shards[4], all_shards[5], all_shards[0]]


def test_missing_shards_are_an_error_naming_them_unless_allowed(shard_dir, all_shards, caplog):
    spec = f"{shard_dir}/{{00005..00008}}.tar"
    with pytest.raises(FileNotFoundError, match=r"2 of 4 shards are missing: .*00007\.tar, .*00008\.tar"):
        webdataset.expand_shards(spec)
    with pytest.raises(FileNotFoundError, match="nothing"):
        webdataset.expand_shards(f"{shard_dir}/nothing*.tar")
    with caplog.at_level(logging.WARNING, logger="jclip.data.sources.webdataset"):
        assert webdataset.expand_shards(spec, allow_missing=True) == all_shards[5:7]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 of 4 shards are missing" in warnings[0].getMessage()
    present, missing = webdataset.find_shards(spec)
    assert len(present) == 2 and [os.path.basename(p) for p in missing] == ["00007.tar", "00008.tar"]
    dataset = webdataset.webdataset_training_dataset(
        spec, seed=0, shard=HostShard(0, 1), shuffle_buffer=2, allow_missing=True
    )
    assert dataset.missing_shards == missing


# ---------------------------------------------------------------------------------------------- reading


def test_iter_tar_samples_groups_members_by_key(all_shards):
    stats = webdataset.ReadStats()
    samples = list(webdataset.iter_tar_samples(all_shards[2], stats))
    assert [s["key"] for s in samples] == [f"00002{i:04d}" for i in range(5)]
    first = samples[0]
    assert first["image"] == jpeg_bytes(10) and first["caption"] == "caption 10 – café"
    assert first["metadata"] == {"key": "000020000", "width": 8, "score": 10 / 7}
    assert samples[3]["caption"] is None and samples[3]["image"] == jpeg_bytes(13)  # kept, with None
    assert (stats.samples, stats.missing_caption, stats.missing_image, stats.num_broken_shards) == (5, 1, 0, 0)
    png = list(webdataset.iter_tar_samples(all_shards[3]))[1]
    assert png["image"] == jpeg_bytes(16, "PNG") and not webdataset.is_complete(samples[3])


def test_broken_shards_stop_with_a_warning_and_are_counted(all_shards, tmp_path, caplog):
    stats = webdataset.ReadStats()
    with caplog.at_level(logging.WARNING, logger="jclip.data.sources.webdataset"):
        samples = list(webdataset.iter_tar_samples(all_shards[6], stats))
    assert [s["key"] for s in samples] == [f"00006{i:04d}" for i in range(3)]
    assert stats.broken_shards == [all_shards[6]] and "broken shard" in caplog.text

    # Cut exactly between two members: tarfile stops silently; the missing end-of-archive block tells.
    data = shard_bytes(9)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        boundary = tar.getmember("000090002.jpg").offset
    (tmp_path / "cut.tar").write_bytes(data[:boundary])
    (tmp_path / "garbage.tar").write_bytes(b"not a tar file" * 100)
    (tmp_path / "empty.tar").write_bytes(b"")
    stats = webdataset.ReadStats()
    cut = list(webdataset.iter_tar_samples(str(tmp_path / "cut.tar"), stats))
    assert [s["key"] for s in cut] == ["000090000"]  # the last sample before the cut may lack members: dropped
    assert list(webdataset.iter_tar_samples(str(tmp_path / "garbage.tar"), stats)) == []
    assert list(webdataset.iter_tar_samples(str(tmp_path / "empty.tar"), stats)) == []
    assert stats.num_broken_shards == 3


# ---------------------------------------------------------------------------------------------- streaming


def stream(shards, host: HostShard, seed=7, buffer=4) -> webdataset.WebDatasetIterDataset:
    return webdataset.webdataset_training_dataset(shards, seed=seed, shard=host, shuffle_buffer=buffer)


def take_with_epochs(iterator, epochs: int) -> list[tuple[int, str]]:
    """(epoch, key) of the elements of the first `epochs` epochs (the epoch read from the state)."""
    out = []
    while True:
        key = next(iterator)["key"]
        epoch = iterator.get_state()["epoch"]
        if epoch == epochs:
            return out
        out.append((epoch, key))


def test_two_processes_read_disjoint_shards_that_cover_each_epoch_once(all_shards, readable_samples):
    all_keys = sorted(s["key"] for s in readable_samples)
    per_host = [take_with_epochs(iter(stream(all_shards, HostShard(p, 2))), epochs=3) for p in range(2)]
    orders = []
    for epoch in range(3):
        keys = [[k for e, k in host if e == epoch] for host in per_host]
        assert not set(keys[0]) & set(keys[1])
        assert sorted(keys[0] + keys[1]) == all_keys  # every readable sample once, the incomplete one too
        assert {k[:5] for k in keys[0]}.isdisjoint({k[:5] for k in keys[1]})  # whole shards per host
        orders.append(keys[0] + keys[1])
    assert orders[0] != orders[1] != orders[2] != orders[0]
    ds = stream(all_shards, HostShard(0, 2))
    assert [ds.epoch_shards(e) for e in range(3)] != [ds.epoch_shards(0)] * 3


def test_samples_are_mixed_across_shards_by_the_buffer(all_shards):
    keys = [next(it)["key"] for it in [iter(stream(all_shards, HostShard(0, 1), buffer=8))] for _ in range(20)]
    shard_runs = sum(a[:5] != b[:5] for a, b in zip(keys, keys[1:]))
    assert shard_runs > 4 and keys != sorted(keys)


def test_more_processes_than_shards_is_an_error(all_shards):
    with pytest.raises(ValueError, match="7 shards cannot be split over 8 processes"):
        stream(all_shards, HostShard(0, 8))


@pytest.mark.parametrize("host", [HostShard(1, 2), HostShard(0, 1)])
def test_exact_resume_mid_shard_and_across_epoch_boundaries(all_shards, host):
    reference_iterator = iter(stream(all_shards, host))
    reference, epochs = [], []
    for _ in range(85):
        reference.append(next(reference_iterator))
        epochs.append(reference_iterator.get_state()["epoch"])
    first_of_epoch_1 = epochs.index(1)
    points = sorted({0, 1, 3, 7, first_of_epoch_1 - 1, first_of_epoch_1, first_of_epoch_1 + 2, epochs.index(2), 45})
    for k in points:
        iterator = iter(stream(all_shards, host))
        for _ in range(k):
            next(iterator)
        state = json.loads(json.dumps(iterator.get_state()))  # Orbax stores it as JSON
        restored = iter(stream(all_shards, host))
        restored.set_state(state)
        assert restored.get_state() == state
        assert [next(restored) for _ in range(15)] == reference[k : k + 15], f"resumed after {k} elements"


def test_resume_through_grain_transformations(all_shards):
    def pipeline_iterator():
        dataset = stream(all_shards, HostShard(0, 1)).filter(webdataset.is_complete).map(lambda e: e["key"]).batch(3)
        return iter(dataset)

    reference = pipeline_iterator()
    expected = [next(reference) for _ in range(20)]
    iterator = pipeline_iterator()
    for _ in range(8):
        next(iterator)
    restored = pipeline_iterator()
    restored.set_state(iterator.get_state())
    assert [list(b) for b in (next(restored) for _ in range(12))] == [list(b) for b in expected[8:]]
    assert all(b.size == 3 for b in expected)


def test_state_of_another_stream_is_rejected(all_shards):
    state = iter(stream(all_shards, HostShard(0, 2), seed=1)).get_state()
    with pytest.raises(ValueError, match="another stream"):
        iter(stream(all_shards, HostShard(0, 2), seed=2)).set_state(state)
    with pytest.raises(ValueError, match="another stream"):
        iter(stream(all_shards, HostShard(1, 2), seed=1)).set_state(state)


def test_grain_worker_slices_split_the_process_shards(all_shards):
    whole = stream(all_shards, HostShard(0, 1))
    slices = []
    for worker in range(2):
        dataset = stream(all_shards, HostShard(0, 1))
        dataset.set_slice(slice(worker, None, 2))
        slices.append(dataset.epoch_shards(0))
    assert sorted(slices[0] + slices[1]) == sorted(whole.epoch_shards(0)) and not set(slices[0]) & set(slices[1])


def test_broken_shard_in_the_stream_is_counted(all_shards):
    iterator = iter(stream(all_shards, HostShard(0, 1)))
    take_with_epochs(iterator, epochs=1)
    assert iterator.stats.broken_shards == [all_shards[6]]
    assert iterator.stats.missing_caption == 1


# ---------------------------------------------------------------------------------------------- conversion


def test_record_encoding_round_trip():
    example = {"key": "k", "image": b"\xff\xd8 jpeg", "caption": b"\xff not utf-8", "metadata": {"a": [1, 2.5, None]}}
    assert webdataset.decode_example(webdataset.encode_example(example)) == example
    example = {"key": "k", "image": None, "caption": "légende", "metadata": {}}
    assert webdataset.decode_example(webdataset.encode_example(example)) == example


def test_converter_round_trip_and_array_record_source(shard_dir, readable_samples, tmp_path, capsys):
    output = tmp_path / "converted"
    shards = f"{shard_dir}/{{00000..00006}}.tar"
    argv = [f"--shards={shards}", f"--output={output}", "--num_output_shards=3", "--log_every=4"]
    assert convert_webdataset.main(argv) == 0
    printed = capsys.readouterr().out
    assert "samples written:  32 in 3 files" in printed and "missing caption:  1" in printed
    assert "broken shards:    1" in printed

    complete = [s for s in readable_samples if webdataset.is_complete(s)]
    source = webdataset.ArrayRecordSource(output)
    assert len(source) == len(complete) == 32
    assert [source[i] for i in range(len(source))] == complete  # every sample, in source order
    assert source.__getitems__([5, 0]) == [complete[5], complete[0]]

    info = json.loads((output / "dataset.json").read_text())
    assert info["num_examples"] == 32 and info["samples_read"] == 33
    assert [f["num_examples"] for f in info["files"]] == [10, 9, 13]
    assert [os.path.basename(p) for f in info["files"] for p in f["source_shards"]] == [
        f"{i:05d}.tar" for i in range(7)
    ]
    assert [os.path.basename(p) for p in info["broken_shards"]] == ["00006.tar"]

    assert convert_webdataset.main(argv) == 1  # refuses to overwrite
    assert "already holds" in capsys.readouterr().err

    kept = tmp_path / "with_incomplete"
    convert_webdataset.convert(f"{shard_dir}/*.tar", str(kept), keep_incomplete=True, log_every=0)
    source = webdataset.ArrayRecordSource(kept)
    assert [source[i] for i in range(len(source))] == readable_samples


def test_converted_data_goes_through_the_random_access_pipeline(shard_dir, readable_samples, tmp_path):
    output = tmp_path / "converted"
    convert_webdataset.convert([f"{shard_dir}/00001.tar", f"{shard_dir}/00004.tar"], str(output), log_every=0)
    source = webdataset.ArrayRecordSource(output)

    def preprocess(example, rng):
        del rng
        return {"index": np.int32(int(example["key"]))}

    dataset = pipeline.training_dataset(
        [(source, 1.0, 0)], preprocess, global_batch_size=5, shard=HostShard(0, 1), num_threads=1
    )
    iterator = iter(dataset)
    seen = np.concatenate([next(iterator)["index"] for _ in range(2)])
    assert sorted(seen.tolist()) == [10000 + i for i in range(5)] + [40000 + i for i in range(5)]


def test_shard_keys_are_the_keys_of_the_samples_read_from_headers_alone(all_shards, tmp_path):
    for path in all_shards:  # the truncated shard's too: its damaged fourth sample is not listed
        assert list(webdataset.shard_keys(path)) == [s["key"] for s in webdataset.iter_tar_samples(path)]
    assert list(webdataset.shard_keys(all_shards[6])) == [f"00006{i:04d}" for i in range(3)]
    data = shard_bytes(9)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        boundary = tar.getmember("000090002.jpg").offset
    (tmp_path / "cut.tar").write_bytes(data[:boundary])
    (tmp_path / "garbage.tar").write_bytes(b"not a tar file" * 100)
    for name, keys in (("cut.tar", ["000090000"]), ("garbage.tar", [])):
        assert list(webdataset.shard_keys(str(tmp_path / name))) == keys


def test_each_sample_carries_its_epoch_for_the_ops(all_shards):
    from jclip.data.pipeline import EPOCH_FIELD

    iterator = iter(stream(all_shards[:2], HostShard(0, 1)))  # 2 shards of 5 samples: 10 per epoch
    epochs = [next(iterator)[EPOCH_FIELD] for _ in range(25)]
    assert epochs == [0] * 10 + [1] * 10 + [2] * 5
    state = iterator.get_state()
    expected = [next(iterator)[EPOCH_FIELD] for _ in range(7)]
    resumed = iter(stream(all_shards[:2], HostShard(0, 1)))
    resumed.set_state(state)
    assert [next(resumed)[EPOCH_FIELD] for _ in range(7)] == expected == [2] * 5 + [3] * 2
