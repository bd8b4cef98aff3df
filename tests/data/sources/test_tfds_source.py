"""Tests of jclip.data.sources.tfds_source: a small TFDS builder defined here, and jclip_scenes, read as raw examples.

The toy builder is prepared as ArrayRecord without TensorFlow (images given as PNG bytes or PIL images, which
TFDS encodes without TF), in index order (no writer shuffling), so record i is example i.
"""

from __future__ import annotations

import io
import json
import pathlib
import pickle
import shutil

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from jclip.data.sources import embedded, scenes
from jclip.data.sources.tfds_source import TfdsSource

NUM_TRAIN, NUM_TEST = 20, 6
CLASSES = ["cat", "dog", "eel"]
UNDECODABLE = b"caf\xe9"  # Latin-1, not UTF-8


def _pixels(index: int) -> np.ndarray:
    return np.full((6, 4, 3), (index * 10, 255 - index, 7), np.uint8)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _captions(index: int) -> list[str]:
    return [f"example {index} caption {j}" for j in range(index % 3)]  # 0, 1 or 2 captions


class TfdsSourceToy(tfds.core.GeneratorBasedBuilder):
    """A coco_captions-like toy: image, Sequence of caption dicts, a ClassLabel, keys containing '/'."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Test data."}
    BUILDS_WITHOUT_NETWORK = True  # may be built by TfdsSource(download=True)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="png"),
                "image/filename": tfds.features.Text(),
                "captions": tfds.features.Sequence({"text": tfds.features.Text(), "id": np.int64}),
                "tags": tfds.features.Sequence(tfds.features.Text()),
                "meta": {"title": tfds.features.Text(),
                         "pixels": tfds.features.Tensor(shape=(2, 2, 3), dtype=np.uint8)},
                "label": tfds.features.ClassLabel(names=CLASSES),
                "id": np.int64,
            }),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(NUM_TRAIN), "test": self._generate_examples(NUM_TEST)}

    def _generate_examples(self, count: int):
        for i in range(count):
            array = _pixels(i)
            yield i, {
                "image": _png(array) if i % 2 else Image.fromarray(array),  # both ways TFDS takes without TF
                "image/filename": f"img_{i:03d}.png",
                "captions": {"text": _captions(i), "id": list(range(len(_captions(i))))},
                "tags": ["ok", UNDECODABLE] if i == 4 else [],
                "meta": {"title": f"title {i}", "pixels": np.full((2, 2, 3), i, np.uint8)},
                "label": i % 3,
                "id": i,
            }


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    data_dir = tmp_path_factory.mktemp("tfds_toy")
    TfdsSourceToy(data_dir=str(data_dir)).download_and_prepare(file_format="array_record")
    return data_dir


def _toy(toy_dir: pathlib.Path, split: str = "train", **kwargs) -> TfdsSource:
    kwargs.setdefault("caption_field", "captions/text")
    return TfdsSource("tfds_source_toy", split, data_dir=str(toy_dir), **kwargs)


def test_split_slicing(toy_dir: pathlib.Path) -> None:
    assert len(_toy(toy_dir)) == NUM_TRAIN and len(_toy(toy_dir, "test")) == NUM_TEST
    head, tail = _toy(toy_dir, "train[:90%]"), _toy(toy_dir, "train[90%:]")
    assert (len(head), len(tail)) == (18, 2)
    assert tail[0]["caption"] is None and tail[1]["caption"] == _captions(19)  # 18 has no caption, 19 one
    assert [tail[i]["image"] for i in range(2)] == [_toy(toy_dir)[i]["image"] for i in (18, 19)]
    assert len(_toy(toy_dir, "train[5:8]")) == 3 and _toy(toy_dir, "train[5:8]")[0]["caption"] == _captions(5)
    assert tail[1]["key"] == "tfds_source_toy:train[90%:]:1" and tail[-1]["key"] == tail[1]["key"]
    with pytest.raises(IndexError):
        tail[2]


def test_raw_examples_and_nested_fields(toy_dir: pathlib.Path) -> None:
    source = _toy(toy_dir, label_field="label")
    for i in (0, 1, 2, 5):
        example = source[i]
        assert set(example) == {"image", "caption", "label", "key"}
        assert isinstance(example["image"], bytes), "Image features stay encoded: decoding is preprocessing's"
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(example["image"]))), _pixels(i))
        # a Sequence of dicts gives a list of str; an empty one gives None
        assert example["caption"] == (_captions(i) or None)
        assert example["label"] == i % 3 and type(example["label"]) is int

    assert _toy(toy_dir, caption_field="image/filename")[3]["caption"] == "img_003.png"  # key with '/'
    assert _toy(toy_dir, caption_field="meta/title")[3]["caption"] == "title 3"  # nested dict
    tags = _toy(toy_dir, caption_field="tags")
    assert tags[4]["caption"] == ["ok", UNDECODABLE], "undecodable bytes stay bytes for a later stage to count"
    assert tags[3]["caption"] is None
    arrays = _toy(toy_dir, image_field="meta/pixels", caption_field=None)
    assert arrays[7]["caption"] is None
    np.testing.assert_array_equal(arrays[7]["image"], np.full((2, 2, 3), 7, np.uint8))
    assert arrays[7]["image"].dtype == np.uint8


def test_class_names(toy_dir: pathlib.Path) -> None:
    assert _toy(toy_dir, label_field="label").class_names() == CLASSES
    assert _toy(toy_dir).class_names() is None  # no label field
    plain = _toy(toy_dir, label_field="id")  # an integer, not a ClassLabel
    assert plain.class_names() is None and plain[9]["label"] == 9


def test_pickles_and_feeds_grain(toy_dir: pathlib.Path) -> None:
    source = _toy(toy_dir, "train[:10]", label_field="label")
    clone = pickle.loads(pickle.dumps(source))
    assert len(clone) == 10
    for i in (0, 4, 9):
        assert clone[i] == source[i]
    dataset = grain.MapDataset.source(clone).seed(3).shuffle().map(lambda e: e["label"])
    assert sorted(dataset[i] for i in range(10)) == sorted(i % 3 for i in range(10))


def test_field_and_split_errors(toy_dir: pathlib.Path) -> None:
    with pytest.raises(ValueError, match=r"no field 'captions/txt'.*captions/text"):
        _toy(toy_dir, caption_field="captions/txt")
    with pytest.raises(ValueError, match="not a leaf"):
        _toy(toy_dir, caption_field="captions")
    with pytest.raises(ValueError, match="not text"):
        _toy(toy_dir, caption_field="label")
    with pytest.raises(ValueError, match="inside a Sequence; expected one integer or ClassLabel"):
        _toy(toy_dir, label_field="captions/id")
    with pytest.raises(ValueError, match="expected one Image"):
        _toy(toy_dir, image_field="meta/title")
    with pytest.raises(ValueError, match=r"split 'validation'.*\['test', 'train'\]"):
        _toy(toy_dir, "validation")


def test_missing_dataset_messages(tmp_path: pathlib.Path) -> None:
    empty = str(tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        TfdsSource("coco_captions", "train", data_dir=empty, caption_field="captions/text")
    message = str(error.value)
    assert "'coco_captions'" in message and empty in message and "format found: none" in message
    assert f"tfds build coco_captions --file_format=array_record --data_dir={empty}" in message

    with pytest.raises(FileNotFoundError) as error:
        TfdsSource("imagenet2012", "validation", data_dir=empty, caption_field=None, manual_dir="/data/imagenet")
    message = str(error.value)
    assert "ILSVRC2012_img_train.tar" in message and "Put them in /data/imagenet" in message
    assert "--manual_dir=/data/imagenet" in message

    with pytest.raises(FileNotFoundError, match="No TFDS builder named 'no_such_dataset'"):
        TfdsSource("no_such_dataset", "train", data_dir=empty)
    with pytest.raises(FileNotFoundError, match="pass download=True"):
        TfdsSource("jclip_scenes/tiny", "train", data_dir=empty)
    with pytest.raises(ValueError, match="download=True builds only datasets made locally"):
        TfdsSource("cifar10", "train", data_dir=empty, caption_field=None, download=True)


def test_other_file_format_is_refused(toy_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """A dataset prepared as TFRecord (simulated by relabelling the metadata) fails with what to do."""
    version_dir = tmp_path / "tfds_source_toy" / "1.0.0"
    shutil.copytree(toy_dir / "tfds_source_toy" / "1.0.0", version_dir)
    info_path = version_dir / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"
    info_path.write_text(json.dumps(info))
    with pytest.raises(ValueError) as error:
        TfdsSource("tfds_source_toy", "train", data_dir=str(tmp_path), caption_field=None)
    message = str(error.value)
    assert "'tfds_source_toy'" in message and str(version_dir) in message and "format tfrecord" in message
    assert f"tfds convert_format --dataset_version_dir={version_dir} --out_file_format=array_record" in message


def test_download_builds_local_builders(tmp_path: pathlib.Path) -> None:
    source = TfdsSource("tfds_source_toy", "test", data_dir=str(tmp_path), caption_field="captions/text",
                        download=True)
    assert len(source) == NUM_TEST and source[2]["caption"] == _captions(2)
    assert list((tmp_path / "tfds_source_toy" / "1.0.0").glob("*.array_record-*"))

    scenes_source = TfdsSource("jclip_scenes/tiny", "validation", data_dir=str(tmp_path), download=True,
                               label_field="label")
    assert len(scenes_source) == 32 and scenes_source.class_names() == list(scenes.CLASS_NAMES)


def test_jclip_scenes_small(scenes_data_dir: pathlib.Path) -> None:
    data_dir = str(scenes_data_dir)
    head = TfdsSource("jclip_scenes/small", "train[:90%]", data_dir=data_dir)
    tail = TfdsSource("jclip_scenes/small", "train[90%:]", data_dir=data_dir)
    assert (len(head), len(tail)) == (1800, 200)

    source = TfdsSource("jclip_scenes/small", "validation", data_dir=data_dir, label_field="label")
    assert len(source) == 256 and source.class_names() == list(scenes.CLASS_NAMES)
    reference = embedded.load_source("validation", data_dir=data_dir, config="small")
    for i in (0, 100, 255):
        example, expected = source[i], reference[i]
        assert example["caption"] == expected["caption"].decode("utf-8")
        assert example["label"] == int(expected["label"])
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(example["image"]))), expected["image"])

    negatives = TfdsSource("jclip_scenes/small", "validation[:4]", data_dir=data_dir, caption_field="negative_captions")
    assert negatives[1]["caption"] == [c.decode("utf-8") for c in reference[1]["negative_captions"]]


def test_extra_fields(toy_dir: pathlib.Path) -> None:
    source = _toy(toy_dir, extra_fields={"title": "meta/title", "tags": "tags", "pixels": "meta/pixels",
                                         "ids": "captions/id", "filename": "image/filename"})
    example = source[5]
    assert example["title"] == "title 5" and example["filename"] == "img_005.png"
    assert example["tags"] == [] and source[4]["tags"] == ["ok", UNDECODABLE]
    np.testing.assert_array_equal(example["pixels"], np.full((2, 2, 3), 5, np.uint8))
    np.testing.assert_array_equal(example["ids"], [0, 1])  # 5 % 3 = 2 captions
    assert example["caption"] == _captions(5), "the canonical fields are unchanged"
    assert pickle.loads(pickle.dumps(source))[5]["title"] == "title 5"
    with pytest.raises(ValueError, match=r"keys \['caption'\] .* clash"):
        _toy(toy_dir, extra_fields={"caption": "meta/title"})
    with pytest.raises(ValueError, match="no field 'meta/nope'"):
        _toy(toy_dir, extra_fields={"x": "meta/nope"})
