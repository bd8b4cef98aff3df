"""The input-pipeline benchmark (jclip/tools/data_bench.py) at tiny sizes: JPEG loading and every number it reports."""

from __future__ import annotations

import io
import json
import math
import tarfile

import numpy as np
import pytest
from jclip_testing import micro_config
from PIL import Image

from jclip.tools import data_bench as bench


def _positive_finite(value: float) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def _write_folder_source(root, jpegs: bench.JpegSet) -> str:
    """The JPEGs as files with a JSONL captions file: a `folder:` source for the config part."""
    lines = []
    for index, example in enumerate(jpegs.examples):
        (root / f"{index}.jpg").write_bytes(example["image"])
        lines.append(json.dumps({"path": f"{index}.jpg", "caption": example["caption"]}))
    captions = root / "captions.jsonl"
    captions.write_text("\n".join(lines))
    return str(captions)


def test_load_jpegs_from_tar_and_folder_takes_every_class_and_falls_back_to_synthetic(tmp_path):
    jpegs = bench.synthetic_jpegs(6, size=8)
    with tarfile.open(tmp_path / "images.tar.gz", "w:gz") as archive:
        for example in jpegs.examples:  # class-sorted, like the CIFAR-10 export
            name = "./" + example["key"].split("/", 1)[1]
            info = tarfile.TarInfo(name)
            info.size = len(example["image"])
            archive.addfile(info, io.BytesIO(example["image"]))
            (tmp_path / "folder" / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "folder" / name).write_bytes(example["image"])

    for path in (tmp_path / "images.tar.gz", tmp_path / "folder"):
        loaded, note = bench.load_jpegs(path, 3)
        assert note is None and not loaded.synthetic
        assert [e["caption"] for e in loaded.examples] == ["a photo of a blue.", "a photo of a cyan.",
                                                           "a photo of a green."]
        assert loaded.pixel_size() == "8x8"

    missing, note = bench.load_jpegs(tmp_path / "absent.tar.gz", 4, synthetic_size=8)
    assert missing.synthetic and len(missing.examples) == 4 and "SYNTHETIC" in note


def test_benchmark_numbers_are_positive_finite_and_ratio_is_pipeline_over_step(tmp_path):
    jpegs = bench.synthetic_jpegs(16, size=20)
    # Batch 16, 16 px images: compiles and steps in seconds; the real tokenizer's vocabulary (validated).
    config = micro_config(**{"model.text.vocab_size": 49408})
    config.data.source = "folder:" + _write_folder_source(tmp_path, jpegs)
    config.data.num_threads = 1

    part1 = bench.jpeg_benchmark(config, jpegs, random_crop_scale=(0.5, 1.0), num_batches=2)
    part2 = bench.config_benchmark(config, steps=2, num_batches=2, source_images=8)

    assert part1["preprocess"]["skipped"] == 0 and part1["random_crop_scale"] == [0.5, 1.0]
    assert part1["image_size"] == 16 and part1["pipeline"]["batch_size"] == 16
    rates = [part1["preprocess"]["images_per_cpu_second"], part1["preprocess"]["images_per_wall_second"],
             part1["pipeline"]["examples_per_second"], part2["step"]["examples_per_second"],
             part2["pipeline"]["examples_per_second"], part2["together"]["examples_per_second"],
             part2["source_preprocess"]["images_per_cpu_second"], part2["ratio"], part2["cores_to_feed_step"]]
    assert all(_positive_finite(rate) for rate in rates), rates
    assert part2["ratio"] == part2["pipeline"]["examples_per_second"] / part2["step"]["examples_per_second"]
    assert part2["together"]["examples"] == 2 * 16

    report = bench.format_report({"cpus": bench.cpu_info(), "config_name": "micro", "notes": [],
                                  "jpegs": part1, "config": part2})
    assert "ratio pipeline/step" in report and "SYNTHETIC JPEGs" in report


def test_sizes_parse_and_photos_are_encoded_at_each_size():
    assert bench.parse_size("256") == 256 and bench.parse_size(" 640X480 ") == (640, 480)
    for bad in ("", "x480", "0", "640x-1", "big"):
        with pytest.raises(ValueError, match="size"):
            bench.parse_size(bad)
    photos = bench.synthetic_photos(count=2, size=(120, 90))
    assert photos.synthetic and len(photos.images) == 2
    short, upscaled = bench.photo_jpegs(photos, 96, 5)  # 90 -> 96: upscaled, and said so
    assert len(short.examples) == 5 and short.examples[2]["image"] == short.examples[0]["image"]
    assert [Image.open(io.BytesIO(e["image"])).size for e in short.examples[:2]] == [(128, 96)] * 2
    assert upscaled == list(photos.images)
    coco, upscaled = bench.photo_jpegs(photos, (64, 48), 2)
    assert Image.open(io.BytesIO(coco.examples[0]["image"])).size == (64, 48) and upscaled == []


def test_sizes_part_times_exact_and_draft_and_measures_their_difference():
    config = micro_config(**{"model.text.vocab_size": 49408})  # 16 px crops
    config.data.num_threads = 1
    photos = bench.synthetic_photos(count=3, size=(160, 120))
    result = bench.sizes_benchmark(config, photos, [24, (64, 48)], num_images=16, num_batches=1)
    below, above = result["rows"]
    assert below["size"] == "24" and above["size"] == "64x48" and result["image_size"] == 16
    assert below["input_sizes"] == ["32x24"] and above["input_sizes"] == ["64x48"]
    # 24 px is below twice the 16 px crop: decoded whole, the same pixels; 64 x 48 drafts by 2 to 32 x 24.
    assert below["pixel_difference"] == {"mean_abs": 0.0, "max_abs": 0, "share_over_10": 0.0}
    assert 0 < above["pixel_difference"]["mean_abs"] < 10
    for row in result["rows"]:
        rates = [row[f"{mode}_{part}"]["images_per_cpu_second"] for mode in ("exact", "draft")
                 for part in ("decode_crop", "preprocess")] + [row["pipeline"]["examples_per_second"]]
        assert all(_positive_finite(rate) for rate in rates), rates
        assert row["draft_preprocess"]["skipped"] == 0 and row["pipeline"]["batch_size"] == 16
    report = bench.format_report({"cpus": bench.cpu_info(), "config_name": "micro", "notes": [], "sizes": result})
    assert "[3] JPEG decode to 16 px" in report and "SYNTHETIC" in report and "64x48" in report


def test_the_real_photos_are_scikit_images_bundled_ones():
    pytest.importorskip("skimage", reason="scikit-image is a test and benchmark extra (pip install -e '.[test]')")
    photos = bench.skimage_photos()
    assert not photos.synthetic and len(photos.images) == len(bench.SKIMAGE_PHOTOS) == 7
    for image in photos.images.values():
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3 and min(image.shape[:2]) >= 300
