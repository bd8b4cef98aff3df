"""Tests of jclip.data.sources.docci: split selection, contiguous slices, missing images, errors."""

from __future__ import annotations

import io
import json
import pathlib
import pickle

import numpy as np
import pytest
from PIL import Image

from jclip.data.sources.docci import DocciSource


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((6, 10, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


ENTRIES = [
    {"example_id": "train_00001", "split": "train", "image_file": "train_00001.png", "description": "A red cup."},
    {"example_id": "test_00001", "split": "test", "image_file": "test_00001.png", "description": "A green door."},
    {"example_id": "qual_dev_00001", "split": "qual_dev", "image_file": "qual_dev_00001.png",
     "description": "Two dogs."},
    {"example_id": "test_00002", "split": "test", "image_file": "test_00002.png", "description": "A blue sky."},
    {"example_id": "test_00003", "split": "test", "image_file": "test_00003.png", "description": "A grey cat."},
]


@pytest.fixture
def docci_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    (tmp_path / "images").mkdir()
    for i, entry in enumerate(ENTRIES):
        if entry["example_id"] != "test_00002":  # its image is missing
            (tmp_path / "images" / entry["image_file"]).write_bytes(_png(40 * i))
    (tmp_path / "docci_descriptions.jsonlines").write_text(
        "".join(json.dumps(e) + "\n" for e in ENTRIES) + "\n", encoding="utf-8")
    return tmp_path


def test_a_split_is_its_entries_in_file_order(docci_dir):
    source = DocciSource(str(docci_dir / "docci_descriptions.jsonlines"), "test")
    assert len(source) == 3
    assert source[0] == {"image": (docci_dir / "images/test_00001.png").read_bytes(), "caption": "A green door.",
                         "key": "test_00001"}
    assert source[1] == {"image": None, "caption": "A blue sky.", "key": "test_00002"}
    assert source[2]["key"] == "test_00003" and Image.open(io.BytesIO(source[2]["image"])).size == (10, 6)
    assert source.class_names() is None
    assert pickle.loads(pickle.dumps(source))[2] == source[2]


def test_slices_are_contiguous(docci_dir):
    path = str(docci_dir / "docci_descriptions.jsonlines")
    assert [e["key"] for e in DocciSource(path, "test[1:]")] == ["test_00002", "test_00003"]
    assert [DocciSource(path, "test[:1]")[0]["key"]] == ["test_00001"]
    assert [e["key"] for e in DocciSource(path, "test[-67%:]")] == ["test_00002", "test_00003"]  # round(2.01) = 2


def test_image_root(docci_dir, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere")
    (other / "train_00001.png").write_bytes(b"other bytes")
    source = DocciSource(str(docci_dir / "docci_descriptions.jsonlines"), "train", image_root=str(other))
    assert source[0]["image"] == b"other bytes"


def test_errors(docci_dir):
    path = docci_dir / "docci_descriptions.jsonlines"
    with pytest.raises(FileNotFoundError, match="nope.jsonlines"):
        DocciSource(str(docci_dir / "nope.jsonlines"), "test")
    with pytest.raises(ValueError, match=r"no split 'validation'; its splits are \['qual_dev', 'test', 'train'\]"):
        DocciSource(str(path), "validation")
    with pytest.raises(ValueError, match="bad split"):
        DocciSource(str(path), "test[::]")
    with pytest.raises(FileNotFoundError, match="image folder"):
        DocciSource(str(path), "test", image_root=str(docci_dir / "absent"))
    bad = docci_dir / "bad.jsonlines"
    bad.write_text(json.dumps(ENTRIES[0]) + "\n" + json.dumps({"example_id": "x", "split": "test"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonlines:2: no string \['image_file', 'description'\]"):
        DocciSource(str(bad), "test")
