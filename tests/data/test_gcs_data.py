"""Every data-side path input and output on gs://, against a Cloud Storage emulator on 127.0.0.1 (the `gcs` fixture,
tests/conftest.py): a prepared TFDS dataset copied to a bucket and the embedded one built into it, converted tar
shards, captions files, class folders, DOCCI, tokenizer files, and the folders of write_guidance, make_negatives
and join_captions. Each is made locally by jclip's own code, copied or written to the bucket, and read back from
both places: the local reader is the reference, and the two must agree exactly. A missing gs:// file or folder
fails with the local message, naming the path."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from gcs_emulator import BUCKET
from jclip.data.sources.tfds_source import TfdsSource
from jclip_testing import embedded_data_config

ROOT = f"gs://{BUCKET}"
TINY = "jclip_scenes/tiny"  # 128/32/32 examples


def _fs():
    import gcsfs

    return gcsfs.GCSFileSystem(token="anon", project="test")


def upload(local, url: str) -> str:
    """Copies a local file or folder to `url`, as `gcloud storage cp -r` does."""
    _fs().put(str(local), url.removeprefix("gs://"), recursive=os.path.isdir(local))
    return url


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def assert_same_examples(got, expected, indices=None) -> None:
    assert len(got) == len(expected)
    for index in range(len(expected)) if indices is None else indices:
        a, b = got[index], expected[index]
        assert a.keys() == b.keys(), index
        for key in b:
            if isinstance(b[key], np.ndarray):
                np.testing.assert_array_equal(a[key], b[key])
            else:
                assert a[key] == b[key], (index, key)


def message(error: pytest.ExceptionInfo, path: str, placeholder: str = "<PATH>") -> str:
    return str(error.value).replace(path, placeholder)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A local TFDS data dir holding the tiny embedded dataset."""
    from jclip.data.sources import embedded

    data_dir = tmp_path_factory.mktemp("tfds_tiny")
    for split in ("train", "validation"):
        embedded.load_source(split, data_dir=str(data_dir), config="tiny")
    return data_dir


@pytest.fixture(scope="module")
def tiny_url(gcs, tiny_dir):
    """The tiny dataset's data dir copied to the bucket."""
    return upload(tiny_dir / "jclip_scenes", f"{ROOT}/tfds/jclip_scenes")[: -len("/jclip_scenes")]


def tiny_config(data_dir, **data):
    return embedded_data_config(data_dir, "tiny", batch_size=8, **data)


# ----- TFDS -------------------------------------------------------------------------------------------------


def test_a_tfds_dataset_copied_to_a_bucket_reads_as_the_local_copy(tiny_dir, tiny_url):
    fields = dict(label_field="label", extra_fields={"negatives": "negative_captions", "boxes": "object_bboxes"})
    for split in ("validation", "train[:25%]"):
        local = TfdsSource(TINY, split, data_dir=str(tiny_dir), **fields)
        remote = TfdsSource(TINY, split, data_dir=tiny_url, **fields)
        assert remote.builder_dir.startswith(f"{tiny_url}/jclip_scenes/tiny/")
        assert_same_examples(remote, local)
        assert remote.class_names() == local.class_names()
    clone = pickle.loads(pickle.dumps(remote))  # as a Grain worker gets it: reopened from the bucket
    assert_same_examples(clone, local, [0, 31])

    from jclip.data.configured import ConfiguredData

    config = tiny_config(tiny_url)
    remote = ConfiguredData(config.data, config.model).source("validation")
    config = tiny_config(tiny_dir)
    assert_same_examples(remote, ConfiguredData(config.data, config.model).source("validation"), [0, 5, 31])


def test_the_embedded_dataset_builds_into_a_bucket(gcs, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a path mistaken for a local one would land
    data_dir = f"{ROOT}/built"
    remote = TfdsSource(TINY, "validation", data_dir=data_dir, label_field="label", download=True)
    assert_same_examples(remote, TfdsSource(TINY, "validation", data_dir=str(tiny_dir), label_field="label"))
    names = {name.rsplit("/", 1)[-1] for name in _fs().find(f"{BUCKET}/built/jclip_scenes/tiny/1.0.0")}
    assert {"dataset_info.json", "features.json", "jclip_scenes-test.array_record-00000-of-00001"} <= names
    assert not os.path.exists(tmp_path / "gs:"), "a gs:// data dir became a local folder"


def test_a_missing_tfds_dataset_in_a_bucket_names_the_bucket_like_a_local_one(gcs, tmp_path):
    url = f"{ROOT}/no-tfds-here"
    for name in ("coco_captions", TINY):
        with pytest.raises(FileNotFoundError) as local:
            TfdsSource(name, "train", data_dir=str(tmp_path))
        with pytest.raises(FileNotFoundError) as remote:
            TfdsSource(name, "train", data_dir=url)
        assert url in str(remote.value) and "not prepared" in str(remote.value)
        assert message(remote, url) == message(local, str(tmp_path))


# ----- converted tar shards ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shards")
    for shard in range(2):
        with tarfile.open(directory / f"{shard:05d}.tar", "w") as archive:
            for index in range(6):
                key = f"{shard:05d}{index:04d}"
                members = [(f"{key}.jpg", jpeg(10 * shard + index)),
                           (f"{key}.txt", f"shard {shard} photo {index}".encode()),
                           (f"{key}.json", json.dumps({"index": index}).encode())]
                for name, data in members[:2] if index == 3 else members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    return directory


def test_shards_in_a_bucket_convert_into_a_bucket_and_read_as_the_local_conversion(gcs, shard_dir, tmp_path,
                                                                                   monkeypatch):
    from jclip.data.configured import ConfiguredData
    from jclip.data.sources import convert_webdataset, webdataset

    monkeypatch.chdir(tmp_path)
    local_info = convert_webdataset.convert(f"{shard_dir}/{{00000..00001}}.tar", str(tmp_path / "converted"),
                                            num_output_shards=2, log_every=0)
    shards = upload(shard_dir, f"{ROOT}/shards")
    output = f"{ROOT}/converted"
    argv = [f"--shards={shards}/{{00000..00001}}.tar", f"--output={output}", "--num_output_shards=2", "--log_every=0"]
    assert convert_webdataset.main(argv) == 0
    assert not os.path.exists(tmp_path / "gs:"), "a gs:// output became a local folder"
    remote = webdataset.ArrayRecordSource(output)
    assert_same_examples(remote, webdataset.ArrayRecordSource(tmp_path / "converted"))
    assert len(remote) == 12
    info = json.loads((_fs().cat(f"{BUCKET}/converted/dataset.json")))
    assert info["source_shards"] == [f"{shards}/{shard:05d}.tar" for shard in range(2)]
    assert {k: v for k, v in info.items() if k not in ("source_shards", "files")} == {
        k: v for k, v in local_info.items() if k not in ("source_shards", "files")}
    assert [f["path"] for f in info["files"]] == [f["path"] for f in local_info["files"]]
    assert convert_webdataset.main(argv) == 1, "an existing conversion is not overwritten"
    assert convert_webdataset.main(argv + ["--overwrite"]) == 0

    config = tiny_config(tmp_path, source=f"arrayrecord:{output}")
    remote = ConfiguredData(config.data, config.model).source("train")  # through the split selection
    config = tiny_config(tmp_path, source=f"arrayrecord:{tmp_path / 'converted'}")
    assert_same_examples(remote, ConfiguredData(config.data, config.model).source("train"))

    missing = f"{ROOT}/not-converted"
    with pytest.raises(FileNotFoundError) as remote_error:
        webdataset.ArrayRecordSource(missing)
    with pytest.raises(FileNotFoundError) as local_error:
        webdataset.ArrayRecordSource(str(tmp_path / "not-converted"))
    assert missing in str(remote_error.value) and "convert_webdataset" in str(remote_error.value)
    assert message(remote_error, missing) == message(local_error, str(tmp_path / "not-converted"))


# ----- image folders ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory):
    """Captions files (JSONL, CSV), class folders (nested, hidden and non-image files) and a DOCCI layout."""
    root = tmp_path_factory.mktemp("images")
    files = ["cat/a.jpg", "cat/b.png", "cat/deep/c.jpg", "cat/a-b.jpg", "cat/a/z.jpg", "dog/x.jpeg", "dog/notes.txt",
             "dog/.hidden.jpg", ".cache/q.jpg", "emu/e.JPG"]
    for seed, name in enumerate(files):
        (root / "classes" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "classes" / name).write_bytes(jpeg(seed))
    (root / "classes" / "top.jpg").write_bytes(jpeg(99))  # not in a class folder: not an example
    captions = root / "captions"
    for seed, name in enumerate(["a.jpg", "sub/b.jpg", "c.jpg"]):
        (captions / name).parent.mkdir(parents=True, exist_ok=True)
        (captions / name).write_bytes(jpeg(50 + seed))
    entries = [{"path": "a.jpg", "caption": "a cat", "label": "cat"},
               {"path": "sub/b.jpg", "caption": ["x", "y"], "label": "dog"},
               {"path": "missing.jpg", "caption": "gone", "label": "cat"}, {"path": "c.jpg", "label": "emu"}]
    (captions / "captions.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    (captions / "captions.csv").write_text("path,caption_1,caption_2,label\na.jpg,one,two,3\nc.jpg,three,,1\n")
    docci = root / "docci"
    (docci / "images").mkdir(parents=True)
    lines = []
    for index, split in enumerate(["train", "test", "test", "qual_dev"]):
        (docci / "images" / f"{split}_{index}.jpg").write_bytes(jpeg(70 + index))
        lines.append(json.dumps({"example_id": f"{split}_{index}", "split": split, "image_file": f"{split}_{index}.jpg",
                                 "description": f"a long description {index}"}))
    (docci / "docci_descriptions.jsonlines").write_text("\n".join(lines) + "\n")
    return root


def test_captions_files_class_folders_and_docci_in_a_bucket_read_as_the_local_copies(gcs, image_tree):
    from jclip.data.sources import docci, folder

    url = upload(image_tree, f"{ROOT}/images")
    for name, kwargs in (("captions.jsonl", {"label_field": "label"}), ("captions.csv", {"label_field": "label"})):
        local = folder.FolderSource(str(image_tree / "captions" / name), **kwargs)
        remote = folder.FolderSource(f"{url}/captions/{name}", **kwargs)
        assert_same_examples(remote, local)
        assert remote.class_names() == local.class_names()
        assert_same_examples(pickle.loads(pickle.dumps(remote)), local)
    assert remote.image_root == f"{url}/captions"

    local = folder.folder_from_class_dirs(str(image_tree / "classes"))
    remote = folder.folder_from_class_dirs(f"{url}/classes")
    assert remote.class_names() == local.class_names() == ["cat", "dog", "emu"]
    assert [remote[i]["key"] for i in range(len(remote))] == [local[i]["key"] for i in range(len(local))]
    assert [local[i]["key"] for i in range(len(local))][:5] == ["cat/a/z.jpg", "cat/a-b.jpg", "cat/a.jpg", "cat/b.png",
                                                                 "cat/deep/c.jpg"]
    assert_same_examples(remote, local)

    for split in ("test", "test[1:]", "qual_dev"):
        remote = docci.DocciSource(f"{url}/docci/docci_descriptions.jsonlines", split)
        local = docci.DocciSource(str(image_tree / "docci" / "docci_descriptions.jsonlines"), split)
        assert_same_examples(remote, local)

    missing = f"{ROOT}/no-images"
    cases = [lambda root: folder.FolderSource(f"{root}/captions.jsonl"),
             lambda root: folder.folder_from_class_dirs(root),
             lambda root: docci.DocciSource(f"{root}/docci_descriptions.jsonlines", "test")]
    for case in cases:
        with pytest.raises(FileNotFoundError) as remote_error:
            case(missing)
        with pytest.raises(FileNotFoundError) as local_error:
            case(str(image_tree / "nowhere"))
        assert missing in str(remote_error.value)
        assert message(remote_error, missing) == message(local_error, str(image_tree / "nowhere"))


# ----- tokenizer files ---------------------------------------------------------------------------------------


def test_tokenizer_files_in_a_bucket(gcs, tmp_path):
    sentencepiece = pytest.importorskip("sentencepiece")
    tokenizers = pytest.importorskip("tokenizers")
    from jclip.data.tokenizer import make_tokenizer

    words = ["red", "blue", "circle", "square", "left", "of", "a", "the", "large", "small"]
    rng = np.random.default_rng(0)
    (tmp_path / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words, size=6)) for _ in range(300)))
    sentencepiece.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "spm"),
                                             vocab_size=24, model_type="unigram", minloglevel=2)
    wordlevel = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])},
                                                                 unk_token="[UNK]"))
    wordlevel.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    wordlevel.save(str(tmp_path / "tokenizer.json"))
    url = upload(tmp_path, f"{ROOT}/tokenizers")
    text = "a large red circle left of the small blue square and a cat"
    for spec in ("sentencepiece:{}/spm.model", "sentencepiece:{}/spm.model:lower", "hf:{}/tokenizer.json?append_eos=3"):
        remote = make_tokenizer(spec.format(url), 10)
        np.testing.assert_array_equal(remote(text), make_tokenizer(spec.format(tmp_path), 10)(text))
    with pytest.raises(FileNotFoundError, match=f"tokenizer file {url}/nope.json does not exist"):
        make_tokenizer(f"hf:{url}/nope.json", 10)


# ----- the folders the writers make, and a training stream reading everything from the bucket ----------------


class FakeNegatives:
    """Stands in for jclip.data.negatives: the words reversed, 'cross' -> 'star'."""

    backend, kinds = "fake", ("swap", "replace", "shuffle")

    def generate(self, captions):
        from types import SimpleNamespace

        return [SimpleNamespace(caption=c, problem=None, pools={
            "swap": (" ".join(reversed(c.split())),), "replace": (c.replace("cross", "star"),) if "cross" in c else (),
            "shuffle": ()}) for c in captions]


def test_writers_write_into_a_bucket_and_training_reads_it_all_through_a_grain_worker(gcs, tiny_dir, tiny_url, tmp_path,
                                                                                       monkeypatch):
    from jclip import join_captions, make_negatives
    from jclip.data import negative_pools, recaptions
    from jclip.data.configured import ConfiguredData
    from jclip.data.ops import guidance
    from jclip.data.pipeline import HostShard

    monkeypatch.chdir(tmp_path)
    local_dir, url = tmp_path / "local", f"{ROOT}/written"
    keys = [f"{TINY}:train:{i}" for i in range(128)]
    rng = np.random.default_rng(0)
    image, text = rng.normal(size=(128, 6)).astype(np.float32), rng.normal(size=(128, 5)).astype(np.float32)
    train = ConfiguredData(tiny_config(tiny_dir).data, tiny_config(tiny_dir).model).source("train")
    recaps = {key: train[i]["caption"] for i, key in enumerate(keys[:100])}  # texts the pools hold
    lines = [json.dumps({"key": key, "caption": caption}) + "\n" for key, caption in recaps.items()]
    (tmp_path / "recaps.jsonl").write_text("".join(lines))
    captions_url = upload(tmp_path / "recaps.jsonl", f"{ROOT}/recaps.jsonl")
    places = ((str(local_dir), tiny_dir, tmp_path / "recaps.jsonl"), (url, tiny_url, captions_url))
    for root, data_dir, captions in places:
        guidance.write_guidance_features(f"{root}/guidance", keys[::-1], image=image[::-1], text=text[::-1])
        make_negatives.make_negatives(tiny_config(data_dir), f"{root}/pools", generator=FakeNegatives(),
                                      log=lambda _: None)
        join_captions.join_captions(tiny_config(data_dir), captions, f"{root}/recaptions", log=lambda _: None)
    assert not os.path.exists(tmp_path / "gs:"), "a gs:// output became a local folder"

    fs = _fs()
    for name in ("guidance/keys.npy", "guidance/image.npy", "guidance/text.npy", "pools/captions_utf8.npy",
                 "pools/swap_utf8.npy", "pools/replace_offsets.npy", "recaptions/keys_utf8.npy",
                 "recaptions/captions_bounds.npy"):
        assert fs.cat(f"{url.removeprefix('gs://')}/{name}") == (local_dir / name).read_bytes(), name
    remote_guidance = guidance.GuidanceFeatures(f"{url}/guidance")
    for key in keys[:3]:
        assert remote_guidance.lookup(key).keys() == {"guidance_image_features", "guidance_text_features"}
        for field, value in remote_guidance.lookup(key).items():
            np.testing.assert_array_equal(value, guidance.GuidanceFeatures(local_dir / "guidance").lookup(key)[field])
    pools = negative_pools.NegativePools(f"{url}/pools")
    assert list(pools.captions) == list(negative_pools.NegativePools(local_dir / "pools").captions)
    assert pools.meta["counts"] == json.loads((local_dir / "pools" / "meta.json").read_text())["counts"]
    assert recaptions.Recaptions(f"{url}/recaptions").caption(keys[7]) == recaps[keys[7]]
    assert pickle.loads(pickle.dumps(pools)).lookup(pools.captions[0]) == pools.lookup(pools.captions[0])

    batches = {}
    for root, data_dir, workers in ((str(local_dir), tiny_dir, 0), (url, tiny_url, 1)):
        config = tiny_config(data_dir, guidance_features=f"{root}/guidance", hard_negatives=f"{root}/pools",
                             recaptions=f"{root}/recaptions", caption_rule="mixed:0.5", num_workers=workers)
        data = ConfiguredData(config.data, config.model)
        data.prepare({("validation", None)})
        iterator = iter(data.training_dataset(seed=0, shard=HostShard(0, 1)))
        try:
            batches[workers] = [next(iterator) for _ in range(2)]
        finally:
            iterator.close()  # stops the worker now: prefetching on after the emulator stops, it would retry for long
    for local, remote in zip(batches[0], batches[1]):
        assert {"guidance_image_features", "negative_token_ids", "token_ids", "images"} <= set(local)
        assert local.keys() == remote.keys()
        for field in local:
            np.testing.assert_array_equal(remote[field], local[field], err_msg=field)

    for make, what in ((guidance.GuidanceFeatures, "no keys.npy in"), (negative_pools.NegativePools, "no folder"),
                       (recaptions.Recaptions, "no folder")):
        with pytest.raises(FileNotFoundError) as remote_error:
            make(f"{ROOT}/nothing")
        with pytest.raises(FileNotFoundError) as local_error:
            make(str(tmp_path / "nothing"))
        assert f"{what} {ROOT}/nothing" in str(remote_error.value)
        assert message(remote_error, f"{ROOT}/nothing") == message(local_error, str(tmp_path / "nothing"))
