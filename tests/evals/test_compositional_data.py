"""Compositional benchmark readers, image source and accuracy, on tiny hand-written benchmark files."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
from PIL import Image

from jclip.evals import compositional_data as cd
from jclip.evals.compositional_data import CompositionalItem

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def quadrant_png(path, top_left=RED, top_right=GREEN, bottom_left=BLUE, bottom_right=WHITE):
    """A 40x30 PNG whose four 20x15 quadrants have distinct colours, so a crop's pixels tell where it came from."""
    pixels = np.zeros((30, 40, 3), np.uint8)
    pixels[:15, :20], pixels[:15, 20:], pixels[15:, :20], pixels[15:, 20:] = top_left, top_right, bottom_left, bottom_right
    Image.fromarray(pixels).save(path)
    return path


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


# ---------------------------------------------------------------------------------------------------------
# SugarCrepe


@pytest.fixture
def sugarcrepe_dir(tmp_path):
    root = tmp_path / "sugarcrepe"
    root.mkdir()
    # Ids deliberately not in sorted order: file order must be kept.
    write_json(root / "replace_att.json", {
        "7": {"filename": "000000000001.jpg", "caption": "a red bus", "negative_caption": "a blue bus"},
        "2": {"filename": "000000000002.jpg", "caption": "a small dog", "negative_caption": "a huge dog"},
    })
    write_json(root / "add_obj.json", {
        "0": {"filename": "000000000001.jpg", "caption": "a bus", "negative_caption": "a bus and a cat"},
    })
    write_json(root / "swap_att.json", {
        "5": {"filename": "000000000003.jpg", "caption": "white cat, black hat", "negative_caption": "black cat, white hat"},
    })
    return root


def test_sugarcrepe_reads_every_file_sorted_in_file_order(sugarcrepe_dir):
    items = cd.read_sugarcrepe(sugarcrepe_dir)
    assert items == [
        CompositionalItem("000000000001.jpg", "a bus", ("a bus and a cat",), "add_obj"),
        CompositionalItem("000000000001.jpg", "a red bus", ("a blue bus",), "replace_att"),
        CompositionalItem("000000000002.jpg", "a small dog", ("a huge dog",), "replace_att"),
        CompositionalItem("000000000003.jpg", "white cat, black hat", ("black cat, white hat",), "swap_att"),
    ]
    assert all(item.bbox is None for item in items)


def test_sugarcrepe_named_categories_in_given_order(sugarcrepe_dir):
    items = cd.read_sugarcrepe(sugarcrepe_dir, categories=["swap_att", "add_obj"])
    assert [item.category for item in items] == ["swap_att", "add_obj"]
    with pytest.raises(FileNotFoundError, match="swap_obj.json"):
        cd.read_sugarcrepe(sugarcrepe_dir, categories=["add_obj", "swap_obj"])


def test_sugarcrepe_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no SugarCrepe"):
        cd.read_sugarcrepe(tmp_path)


@pytest.mark.parametrize("entry, message", [
    ({"filename": "a.jpg", "caption": "x"}, "negative_caption"),
    ({"filename": "a.jpg", "caption": "  ", "negative_caption": "y"}, "caption must be a non-empty"),
    ({"filename": "a.jpg", "caption": "x", "negative_caption": None}, "negative_caption must be a non-empty"),
    ("not an object", "expected a JSON object"),
])
def test_sugarcrepe_malformed_entry_names_file_and_id(tmp_path, entry, message):
    path = write_json(tmp_path / "swap_obj.json", {"ok": {"filename": "b.jpg", "caption": "p", "negative_caption": "n"},
                                                    "bad9": entry})
    with pytest.raises(ValueError, match=message) as error:
        cd.read_sugarcrepe(tmp_path)
    assert str(path) in str(error.value) and "'bad9'" in str(error.value)


def test_sugarcrepe_non_json_and_duplicate_ids_name_the_file(tmp_path):
    path = tmp_path / "add_att.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON") as error:
        cd.read_sugarcrepe(tmp_path)
    assert str(path) in str(error.value)
    path.write_text('{"1": {"filename": "a", "caption": "b", "negative_caption": "c"}, '
                    '"1": {"filename": "d", "caption": "e", "negative_caption": "f"}}')
    with pytest.raises(ValueError, match="duplicate key '1'") as error:
        cd.read_sugarcrepe(tmp_path)
    assert str(path) in str(error.value)


# ---------------------------------------------------------------------------------------------------------
# ARO


def aro_entry(image="1.jpg", bbox=(0, 0, 20, 15), true="the horse is eating the grass",
              false="the grass is eating the horse", **extra):
    x, y, w, h = bbox
    return {"image_path": image, "bbox_x": x, "bbox_y": y, "bbox_w": w, "bbox_h": h,
            "true_caption": true, "false_caption": false, **extra}


def test_aro_relation_and_attribution(tmp_path):
    relation = write_json(tmp_path / "visual_genome_relation.json", [
        aro_entry(relation_name="eating"),
        aro_entry(image="2.jpg", bbox=(20, 15, 20, 15), true="the cup is on the table", false="the table is on the cup",
                  relation_name="on"),
    ])
    assert cd.read_aro(relation, "relation") == [
        CompositionalItem("1.jpg", "the horse is eating the grass", ("the grass is eating the horse",), "eating",
                          (0.0, 0.0, 20.0, 15.0)),
        CompositionalItem("2.jpg", "the cup is on the table", ("the table is on the cup",), "on", (20.0, 15.0, 20.0, 15.0)),
    ]
    attribution = write_json(tmp_path / "visual_genome_attribution.json", [
        aro_entry(bbox=(1.5, 2, 10, 5), true="the white cat and the black dog", false="the black cat and the white dog",
                  attributes=["white", "black"]),
    ])
    (item,) = cd.read_aro(attribution, "attribution")
    assert item.category == "white_black" and item.bbox == (1.5, 2.0, 10.0, 5.0)
    assert cd.read_compositional("aro_attribution", attribution) == [item]
    with pytest.raises(ValueError, match="unknown kind"):
        cd.read_aro(attribution, "relations")


@pytest.mark.parametrize("entry, message", [
    ({k: v for k, v in aro_entry(relation_name="on").items() if k != "bbox_h"}, "bbox_h"),
    (aro_entry(), "relation_name"),
    (aro_entry(false="", relation_name="on"), "false_caption must be a non-empty"),
    (aro_entry(bbox=(0, 0, 0, 5), relation_name="on"), "positive"),
    (aro_entry(bbox=(0, "a", 3, 5), relation_name="on"), "finite numbers"),
])
def test_aro_malformed_entry_names_file_and_index(tmp_path, entry, message):
    path = write_json(tmp_path / "visual_genome_relation.json", [aro_entry(relation_name="on"), entry])
    with pytest.raises(ValueError, match=message) as error:
        cd.read_aro(path, "relation")
    assert f"{path}: entry 1" in str(error.value)


def test_aro_bad_attributes_and_wrong_top_level(tmp_path):
    path = write_json(tmp_path / "visual_genome_attribution.json", [aro_entry(attributes=["white"])])
    with pytest.raises(ValueError, match="2 strings") as error:
        cd.read_aro(path, "attribution")
    assert f"{path}: entry 0" in str(error.value)
    write_json(path, {"0": aro_entry(attributes=["a", "b"])})
    with pytest.raises(ValueError, match="JSON list") as error:
        cd.read_aro(path, "attribution")
    assert str(path) in str(error.value)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        cd.read_aro(tmp_path / "missing.json", "relation")


# ---------------------------------------------------------------------------------------------------------
# Generic pairs JSONL


def test_pairs_jsonl(tmp_path):
    path = tmp_path / "order.jsonl"
    path.write_text("\n".join([
        json.dumps({"image": "a.png", "positive": "a dog on a sofa", "negatives": ["a sofa on a dog", "on a dog a sofa"],
                    "category": "coco_order"}),
        "",
        json.dumps({"image": "/abs/b.png", "positive": "p", "negative": "n", "bbox": [1, 2, 3, 4], "source": "ignored"}),
        "   ",
    ]) + "\n")
    assert cd.read_compositional("pairs", path) == [
        CompositionalItem("a.png", "a dog on a sofa", ("a sofa on a dog", "on a dog a sofa"), "coco_order"),
        CompositionalItem("/abs/b.png", "p", ("n",), "all", (1.0, 2.0, 3.0, 4.0)),
    ]


@pytest.mark.parametrize("line, message", [
    ('{"image": "a.png", "positive": "p"', "not a JSON object"),
    ('{"image": "a.png", "negative": "n"}', "positive"),
    ('{"image": "a.png", "positive": "p"}', "exactly one of"),
    ('{"image": "a.png", "positive": "p", "negative": "n", "negatives": ["m"]}', "exactly one of"),
    ('{"image": "a.png", "positive": "p", "negatives": []}', "non-empty list"),
    ('{"image": "a.png", "positive": "p", "negatives": ["m", ""]}', "each negative"),
    ('{"image": "a.png", "positive": "p", "negative": "n", "category": ""}', "category"),
    ('{"image": "a.png", "positive": "p", "negative": "n", "bbox": [1, 2, 3]}', "4 numbers"),
    ('[1, 2]', "expected a JSON object"),
])
def test_pairs_malformed_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"image": "a.png", "positive": "p", "negative": "n"}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=message) as error:
        cd.read_pairs_jsonl(path)
    assert f"{path}:3" in str(error.value)


def test_unknown_format_lists_known_ones(tmp_path):
    with pytest.raises(ValueError, match="sugarcrepe.*aro_relation.*aro_attribution.*pairs"):
        cd.read_compositional("winoground", tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Images


def test_images_dedup_bytes_and_crops(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    quadrant_png(root / "q.png")
    quadrant_png(root / "swapped.png", top_left=WHITE, bottom_right=RED)
    items = [
        CompositionalItem("q.png", "p1", ("n1",), "a"),
        CompositionalItem("swapped.png", "p2", ("n2",), "a"),
        CompositionalItem("q.png", "p3", ("n3",), "b"),  # same image, no bbox: shared
        CompositionalItem("q.png", "p4", ("n4",), "c", (20.0, 15.0, 20.0, 15.0)),  # bottom-right quadrant
        CompositionalItem("q.png", "p5", ("n5",), "c", (20.0, 15.0, 20.0, 15.0)),  # same crop: shared
        CompositionalItem("q.png", "p6", ("n6",), "c", (10.0, 0.0, 20.0, 5.0)),  # straddles red | green
    ]
    images = cd.CompositionalImages(items, root)
    assert len(images) == 4
    np.testing.assert_array_equal(images.item_image_index, [0, 1, 0, 2, 2, 3])
    assert images.item_image_index.dtype.kind == "i"

    whole = images[0]
    assert whole["key"] == "q.png"
    assert whole["image"] == (root / "q.png").read_bytes()
    assert np.asarray(Image.open(io.BytesIO(images[1]["image"])))[0, 0].tolist() == list(WHITE)

    corner = images[2]
    assert corner["key"] == "q.png#bbox=20,15,20,15"
    assert corner["image"].mode == "RGB" and corner["image"].size == (20, 15)
    assert (np.asarray(corner["image"]) == WHITE).all()

    strip = np.asarray(images[3]["image"])
    assert strip.shape == (5, 20, 3)
    assert (strip[:, :10] == RED).all() and (strip[:, 10:] == GREEN).all()

    restored = pickle.loads(pickle.dumps(images))
    assert len(restored) == 4 and restored[0]["image"] == whole["image"]
    np.testing.assert_array_equal(restored.item_image_index, images.item_image_index)
    with pytest.raises(IndexError):
        images[4]


def test_images_without_root_and_from_sugarcrepe(tmp_path, sugarcrepe_dir, monkeypatch):
    for name in ("000000000001.jpg", "000000000002.jpg", "000000000003.jpg"):
        quadrant_png(tmp_path / name)  # PNG bytes under a .jpg name: bytes are passed through untouched
    items = cd.read_compositional("sugarcrepe", sugarcrepe_dir)
    monkeypatch.chdir(tmp_path)
    images = cd.CompositionalImages(items, None)
    assert [images[i]["key"] for i in range(len(images))] == ["000000000001.jpg", "000000000002.jpg", "000000000003.jpg"]
    np.testing.assert_array_equal(images.item_image_index, [0, 0, 1, 2])
    absolute = cd.CompositionalImages([CompositionalItem(str(tmp_path / "000000000002.jpg"), "p", ("n",), "x")], "/nowhere")
    assert absolute[0]["image"] == (tmp_path / "000000000002.jpg").read_bytes()


def test_missing_image_fails_loudly(tmp_path):
    quadrant_png(tmp_path / "here.png")
    items = [CompositionalItem("here.png", "p", ("n",), "x"), CompositionalItem("gone.png", "p", ("n",), "x", (0, 0, 5, 5))]
    images = cd.CompositionalImages(items, tmp_path)
    assert images[0]["key"] == "here.png"
    with pytest.raises(FileNotFoundError) as error:
        images[1]
    assert "gone.png" in str(error.value) and repr(str(tmp_path)) in str(error.value)
    with pytest.raises(FileNotFoundError, match="1 image file.*gone.png"):
        images.check_files()


# ---------------------------------------------------------------------------------------------------------
# Accuracy


def test_accuracy_ties_several_negatives_micro_and_macro():
    positive = np.array([0.9, 0.5, 0.7, 0.3, 0.8])
    negatives = [
        np.array([0.1]),  # right
        np.array([0.5]),  # tie: wrong
        np.array([0.2, 0.6, 0.69]),  # above all three: right
        np.array([0.1, 0.4]),  # one negative wins: wrong
        np.array([0.2]),  # right
    ]
    categories = ["swap", "swap", "swap", "add", "add"]
    result = cd.compositional_accuracy(positive, negatives, categories)
    assert result == pytest.approx({
        "accuracy": 3 / 5,
        "accuracy/swap": 2 / 3,
        "accuracy/add": 1 / 2,
        "accuracy_macro": (2 / 3 + 1 / 2) / 2,
        "count/swap": 3,
        "count/add": 2,
    })
    # The same scores as a -inf padded matrix give the same answer.
    padded = np.full((5, 3), -np.inf)
    for i, row in enumerate(negatives):
        padded[i, : len(row)] = row
    assert cd.compositional_accuracy(positive, padded, categories) == result


def test_accuracy_min_count_filters_categories_but_not_micro():
    positive = np.array([1.0, 1.0, 1.0, 0.0])
    negatives = np.array([0.0, 0.0, 0.0, 1.0])  # one negative each
    result = cd.compositional_accuracy(positive, negatives, ["big", "big", "big", "rare"], min_count=2)
    assert result == {"accuracy": 0.75, "accuracy/big": 1.0, "accuracy_macro": 1.0, "count/big": 3, "count/rare": 1}
    none = cd.compositional_accuracy(positive, negatives, ["big", "big", "big", "rare"], min_count=10)
    assert none["accuracy"] == 0.75 and np.isnan(none["accuracy_macro"])


def test_accuracy_rejects_bad_shapes():
    with pytest.raises(ValueError, match="no negative"):
        cd.compositional_accuracy(np.array([1.0]), np.array([[-np.inf, -np.inf]]), ["a"])
    with pytest.raises(ValueError, match="one category per item"):
        cd.compositional_accuracy(np.array([1.0, 2.0]), [np.array([0.0]), np.array([0.0])], ["a"])
    with pytest.raises(ValueError, match="negative score rows"):
        cd.compositional_accuracy(np.array([1.0, 2.0]), [np.array([0.0])], ["a", "b"])
    with pytest.raises(ValueError, match="NaN"):
        cd.compositional_accuracy(np.array([1.0]), [np.array([np.nan])], ["a"])
