"""Tests of jclip.data.sources.folder: captions files (JSONL, CSV, TSV), missing files, labels, class folders, CIFAR-10."""

from __future__ import annotations

import io
import json
import pathlib
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from jclip.data.sources import folder
from jclip.data.sources.folder import FolderSource, folder_from_class_dirs


def _jpeg(value: int, size: tuple[int, int] = (12, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _write_images(root: pathlib.Path, names: list[str]) -> dict[str, bytes]:
    written = {}
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_jpeg(20 * i))
        written[name] = path.read_bytes()
    return written


def _write_jsonl(path: pathlib.Path, entries: list[dict]) -> None:
    path.write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")


def test_jsonl_captions_lazy_images_and_missing_files(tmp_path: pathlib.Path) -> None:
    images = _write_images(tmp_path, ["a.jpg", "sub/b.jpg", "c.jpg"])
    (tmp_path / "c.jpg").unlink()  # listed, but missing: image None, not an exception
    _write_jsonl(tmp_path / "captions.jsonl", [
        {"path": "a.jpg", "caption": "a red square"},
        {"path": "sub/b.jpg", "caption": ["one", "two", "three"]},
        {"path": "c.jpg", "caption": "gone"},
        {"path": "d.jpg"},  # never existed, no caption
    ])
    source = FolderSource(str(tmp_path / "captions.jsonl"))
    assert len(source) == 4
    assert source[0] == {"image": images["a.jpg"], "caption": "a red square", "key": "a.jpg"}
    assert source[1]["caption"] == ["one", "two", "three"] and source[1]["image"] == images["sub/b.jpg"]
    assert source[2]["image"] is None and source[2]["caption"] == "gone"
    assert source[3] == {"image": None, "caption": None, "key": "d.jpg"}
    assert Image.open(io.BytesIO(source[0]["image"])).size == (12, 8)
    assert source.class_names() is None and "label" not in source[0]

    # Images are read per item, not at construction: a file written afterwards is seen.
    (tmp_path / "d.jpg").write_bytes(_jpeg(7))
    assert source[3]["image"] == (tmp_path / "d.jpg").read_bytes()

    clone = pickle.loads(pickle.dumps(source))
    assert len(clone) == 4 and clone[1] == source[1]


def test_image_root_and_field_names(tmp_path: pathlib.Path) -> None:
    images = _write_images(tmp_path / "pictures", ["x.jpg"])
    meta = tmp_path / "meta"
    meta.mkdir()
    _write_jsonl(meta / "list.jsonl", [{"file": "x.jpg", "text": "hello", "y": 4}])
    source = FolderSource(str(meta / "list.jsonl"), image_root=str(tmp_path / "pictures"),
                          path_field="file", caption_field="text", label_field="y")
    assert source[0] == {"image": images["x.jpg"], "caption": "hello", "key": "x.jpg", "label": 4}
    no_caption = FolderSource(str(meta / "list.jsonl"), image_root=str(tmp_path / "pictures"),
                              path_field="file", caption_field=None)
    assert no_caption[0]["caption"] is None


def test_csv_numbered_caption_columns_and_quoting(tmp_path: pathlib.Path) -> None:
    images = _write_images(tmp_path, ["a.jpg", "b.jpg"])
    (tmp_path / "captions.csv").write_text(
        "path,caption_1,caption_2,caption_3,split\n"
        'a.jpg,"a dog, running","a | pipe stays",,train\n'
        "\n"  # blank lines are skipped
        'b.jpg,,"line one\nline two",,train\n'
        "missing.jpg,,,,train\n",
        encoding="utf-8",
    )
    source = FolderSource(str(tmp_path / "captions.csv"))
    assert len(source) == 3
    assert source[0] == {"image": images["a.jpg"], "caption": ["a dog, running", "a | pipe stays"], "key": "a.jpg"}
    assert source[1]["caption"] == ["line one\nline two"]
    assert source[2] == {"image": None, "caption": None, "key": "missing.jpg"}


def test_csv_single_caption_column_gives_str_and_tsv(tmp_path: pathlib.Path) -> None:
    _write_images(tmp_path, ["a.jpg"])
    (tmp_path / "c.csv").write_text("\ufeffpath,caption,caption_source\na.jpg,a cat,web\n", encoding="utf-8")
    assert FolderSource(str(tmp_path / "c.csv"))[0]["caption"] == "a cat"  # BOM and caption_source ignored
    (tmp_path / "c.tsv").write_text("path\tcaption\tlabel\na.jpg\ta cat, sitting\t2\n", encoding="utf-8")
    source = FolderSource(str(tmp_path / "c.tsv"), label_field="label")
    assert source[0]["caption"] == "a cat, sitting" and source[0]["label"] == 2
    assert source.class_names() is None


def test_string_labels_become_sorted_ids(tmp_path: pathlib.Path) -> None:
    _write_jsonl(tmp_path / "c.jsonl", [{"path": f"{i}.jpg", "caption": "x", "label": name}
                                        for i, name in enumerate(["zebra", "ant", "moth", "ant"])])
    source = FolderSource(str(tmp_path / "c.jsonl"), label_field="label")
    assert source.class_names() == ["ant", "moth", "zebra"]
    assert [source[i]["label"] for i in range(4)] == [2, 0, 1, 0]

    # A fixed class list keeps ids the same across splits, even when a class is absent from one.
    fixed = FolderSource(str(tmp_path / "c.jsonl"), label_field="label", class_names=["zebra", "bee", "ant", "moth"])
    assert [fixed[i]["label"] for i in range(4)] == [0, 2, 3, 2]
    assert fixed.class_names() == ["zebra", "bee", "ant", "moth"]
    with pytest.raises(ValueError, match=r"c.jsonl:3: class 'moth' is not in class_names"):
        FolderSource(str(tmp_path / "c.jsonl"), label_field="label", class_names=["zebra", "ant"])

    (tmp_path / "c.csv").write_text("path,caption,label\na.jpg,x,dog\nb.jpg,y,cat\n", encoding="utf-8")
    csv_source = FolderSource(str(tmp_path / "c.csv"), label_field="label")
    assert csv_source.class_names() == ["cat", "dog"] and csv_source[0]["label"] == 1


def test_startup_errors_name_the_path(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        FolderSource(str(tmp_path / "nope.jsonl"))
    _write_jsonl(tmp_path / "c.jsonl", [{"path": "a.jpg", "caption": "x"}])
    with pytest.raises(FileNotFoundError, match="no_such_root"):
        FolderSource(str(tmp_path / "c.jsonl"), image_root=str(tmp_path / "no_such_root"))
    (tmp_path / "c.txt").write_text("a.jpg\n")
    with pytest.raises(ValueError, match="unknown format '.txt'"):
        FolderSource(str(tmp_path / "c.txt"))
    (tmp_path / "bad.jsonl").write_text('{"path": "a.jpg"}\n{"path": "b.jpg", oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON object"):
        FolderSource(str(tmp_path / "bad.jsonl"))
    _write_jsonl(tmp_path / "nopath.jsonl", [{"file": "a.jpg"}])
    with pytest.raises(ValueError, match=r"nopath.jsonl:1: no 'path' string"):
        FolderSource(str(tmp_path / "nopath.jsonl"))
    _write_jsonl(tmp_path / "badcap.jsonl", [{"path": "a.jpg", "caption": 3}])
    with pytest.raises(ValueError, match="caption must be a string or a list of strings"):
        FolderSource(str(tmp_path / "badcap.jsonl"))
    _write_jsonl(tmp_path / "mixed.jsonl", [{"path": "a.jpg", "label": 1}, {"path": "b.jpg", "label": "cat"}])
    with pytest.raises(ValueError, match=r"mixed.jsonl:2: label 'cat' mixes"):
        FolderSource(str(tmp_path / "mixed.jsonl"), label_field="label")
    _write_jsonl(tmp_path / "nolabel.jsonl", [{"path": "a.jpg"}])
    with pytest.raises(ValueError, match=r"nolabel.jsonl:1: label 'label' must be"):
        FolderSource(str(tmp_path / "nolabel.jsonl"), label_field="label")
    (tmp_path / "short.csv").write_text("path,caption\na.jpg\n")
    with pytest.raises(ValueError, match=r"short.csv:2: 1 fields, but the header has 2"):
        FolderSource(str(tmp_path / "short.csv"))
    (tmp_path / "nocap.csv").write_text("path,text\na.jpg,x\n")
    with pytest.raises(ValueError, match="no caption column"):
        FolderSource(str(tmp_path / "nocap.csv"))


def test_class_dirs(tmp_path: pathlib.Path) -> None:
    images = _write_images(tmp_path, ["dog/2.jpg", "dog/1.JPG", "cat/a.png", "cat/nested/b.jpeg", "eel/x.jpg"])
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "cat" / ".hidden.jpg").write_bytes(b"")
    (tmp_path / ".cache").mkdir()
    (tmp_path / "README.md").write_text("top-level files are not classes")
    source = folder_from_class_dirs(str(tmp_path))
    assert source.class_names() == ["cat", "dog", "eel"]
    assert [source[i]["key"] for i in range(len(source))] == [
        "cat/a.png", "cat/nested/b.jpeg", "dog/1.JPG", "dog/2.jpg", "eel/x.jpg"]
    assert [source[i]["label"] for i in range(len(source))] == [0, 0, 1, 1, 2]
    assert source[2]["image"] == images["dog/1.JPG"] and source[2]["caption"] is None
    assert pickle.loads(pickle.dumps(source))[4]["image"] == images["eel/x.jpg"]
    with pytest.raises(FileNotFoundError, match="absent"):
        folder_from_class_dirs(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        folder_from_class_dirs(str(tmp_path / "empty"))


CIFAR_TAR = "data/cifar10/cifar10-train.tar.gz"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_cifar10_export(shared_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """The real CIFAR-10 export: 10 class folders of 5,000 JPEGs; a few per class are extracted and read."""
    archive = shared_dir / CIFAR_TAR
    if not archive.is_file():
        pytest.skip(f"{archive} is absent: the CIFAR-10 export lives in ../shared/data, which only CI has")
    per_class_total: dict[str, int] = {}
    keep = 3
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            parts = pathlib.PurePosixPath(member.name).parts  # ./<class>/<NNNN>.jpg: ('<class>', '<NNNN>.jpg')
            if member.isfile() and len(parts) == 2:
                per_class_total[parts[0]] = per_class_total.get(parts[0], 0) + 1
                if int(pathlib.PurePosixPath(parts[1]).stem) < keep:  # written by hand: no path surprises
                    (tmp_path / parts[0]).mkdir(exist_ok=True)
                    (tmp_path / parts[0] / parts[1]).write_bytes(tar.extractfile(member).read())
    assert sorted(per_class_total) == CIFAR_CLASSES
    assert set(per_class_total.values()) == {5000}

    source = folder_from_class_dirs(str(tmp_path))
    assert source.class_names() == CIFAR_CLASSES and len(source) == keep * 10
    for index in range(0, len(source), 7):
        example = source[index]
        assert example["key"].split("/")[0] == CIFAR_CLASSES[example["label"]]
        image = Image.open(io.BytesIO(example["image"]))
        assert image.format == "JPEG" and image.size == (32, 32)


def test_module_docstring_documents_csv_captions() -> None:
    assert "caption_1, caption_2" in folder.__doc__
