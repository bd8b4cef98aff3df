"""Bad input through a Grain pipeline: every bad kind skipped and counted by reason, good oddities (CMYK,
greyscale, alpha, 16-bit, long or several captions) decoded right, the skip-rate threshold, the guard
against endless bad streams, and exact resume of the skip-counting iterator."""

from __future__ import annotations

import io
import struct
import zlib

import grain
import numpy as np
import pytest
from PIL import Image

from jclip.data import robust

from jclip.data import ops
from jclip.data.ops import image as image_ops
from jclip.data.robust import SKIP_REASONS, SkipBadExamples, SkipCounter, Skipped, TooManyBadExamples

SIZE = 16  # the test images are 16 x 16, so evaluation preprocessing keeps every pixel as it is


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that declares `width` x `height` and holds no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def pixels(model_image: np.ndarray) -> np.ndarray:
    """Back from CLIP's normalised space to uint8 RGB."""
    mean, std = np.asarray(image_ops.CLIP_MEAN), np.asarray(image_ops.CLIP_STD)
    return np.rint((model_image * std + mean) * 255).astype(np.int64)


def noise_jpeg() -> bytes:
    rng = np.random.default_rng(0)
    return encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")


GREY_RAMP = np.arange(256, dtype=np.uint16).reshape(SIZE, SIZE)


def examples() -> tuple[list[dict], dict[str, int]]:
    """Every bad kind and every good oddity, and the expected skip counts by reason."""
    red = Image.new("RGB", (SIZE, SIZE), (200, 30, 30))
    rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
    rgba[..., 2] = 255
    rgba[:, : SIZE // 2, 3] = 255  # left half opaque blue, right half transparent
    la = np.stack([np.full((SIZE, SIZE), 60, np.uint8), rgba[..., 3]], axis=-1)
    good = [
        ("rgb", encode(red, "JPEG", quality=95), "a red square"),
        ("cmyk", encode(red.convert("CMYK"), "JPEG", quality=95), "a red square in cmyk"),
        ("grey", encode(Image.fromarray(GREY_RAMP.astype(np.uint8))), "a grey ramp"),
        ("la", encode(Image.fromarray(la, "LA")), "grey and transparent"),
        ("rgba", encode(Image.fromarray(rgba, "RGBA")), "blue and transparent"),
        ("i16", encode(Image.fromarray(GREY_RAMP * 257)), "a sixteen bit ramp"),
        ("array", np.full((SIZE, SIZE, 3), 77, np.uint8), "an array"),
        ("long", encode(red), " ".join(["word"] * 500)),
        ("several", encode(red), ["first caption", b"second caption", None, "third caption"]),
        ("bytes_caption", encode(red), "caf\u00e9".encode("utf-8")),
    ]
    bad = [
        ("undecodable", b"this is not an image", "x", "undecodable_image"),
        ("truncated", noise_jpeg()[:1500], "x", "truncated_image"),
        ("zero_png", png_header_only(0, 0), "x", "empty_image"),
        ("empty_array", np.zeros((0, 0, 3), np.uint8), "x", "empty_image"),
        ("zero_bytes", b"", "x", "empty_image"),
        ("huge_png", png_header_only(100_000, 100_000), "x", "image_too_large"),
        ("large_png", png_header_only(3000, 3000), "x", "image_too_large"),  # over max_pixels below
        ("sliver", np.zeros((1, 200, 3), np.uint8), "x", "extreme_aspect_ratio"),
        ("float_array", np.zeros((SIZE, SIZE, 3), np.float32), "x", "unsupported_image"),
        ("no_image", None, "x", "missing_image"),
        ("no_caption", encode(red), None, "missing_caption"),
        ("no_captions", encode(red), [], "missing_caption"),
        ("empty_caption", encode(red), "   ", "empty_caption"),
        ("nbsp_caption", encode(red), "&nbsp;", "empty_caption"),  # empty only once cleaned
        ("latin1_caption", encode(red), "caf\u00e9".encode("latin-1"), "undecodable_caption"),
        ("number_caption", encode(red), 42, "undecodable_caption"),
        ("bad_captions", encode(red), [None, ""], "missing_caption"),  # the first bad one's reason
    ]
    # Interleave, with good examples first and last (the last one carries the trailing skips).
    items = [{"key": k, "image": i, "caption": c} for k, i, c in good[:1]]
    for n, (key, image, caption, _) in enumerate(bad):
        items.append({"key": key, "image": image, "caption": caption})
        if n % 2 and n // 2 + 1 < len(good):
            key, image, caption = good[n // 2 + 1]
            items.append({"key": key, "image": image, "caption": caption})
    emitted = {item["key"] for item in items}
    items += [{"key": k, "image": i, "caption": c} for k, i, c in good if k not in emitted]
    expected = dict.fromkeys(SKIP_REASONS, 0)
    for *_, reason in bad:
        expected[reason] += 1
    return items, expected


CONTEXT = ops.OpContext(image_size=SIZE, context_length=16)


def safe_preprocessor(keep: str = "key") -> ops.Preprocess:
    """Today's default op list, plus the raw `keep` field (checked before the image is decoded)."""
    return ops.Preprocess(ops.make_ops(
        f"choose_caption|keep(fields=({keep!r},))|decode_image(max_pixels=1_000_000)|crop_image|normalise_image|"
        "tokenize(field='caption', out='token_ids')", CONTEXT))


def run(items, batch_size=4, **options) -> list[dict]:
    dataset = grain.MapDataset.source(items).map(safe_preprocessor()).to_iter_dataset()
    return list(SkipBadExamples(dataset, **options).batch(batch_size))


def test_every_bad_kind_is_skipped_and_counted_and_every_good_one_comes_out_right():
    items, expected = examples()
    batches = run(items)
    assert robust.skip_totals(batches) == expected
    assert sum(expected.values()) == 17
    out = {}
    for batch in batches:
        assert batch["skipped_before"].shape == (len(batch["key"]), len(SKIP_REASONS))
        for row, key in enumerate(batch["key"].tolist()):
            out[key] = {name: value[row] for name, value in batch.items()}
    good_keys = {"rgb", "cmyk", "grey", "la", "rgba", "i16", "array", "long", "several", "bytes_caption"}
    assert set(out) == good_keys and sum(len(batch["key"]) for batch in batches) == len(good_keys)

    red = pixels(out["rgb"]["images"])
    assert np.abs(red - [200, 30, 30]).max() <= 3
    assert np.abs(pixels(out["cmyk"]["images"]) - red).max() <= 8, "CMYK must come out as the same red"
    grey = pixels(out["grey"]["images"])
    np.testing.assert_array_equal(grey[..., 0], GREY_RAMP)
    np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
    np.testing.assert_array_equal(pixels(out["i16"]["images"]), grey)  # 257 k -> k, not clipped to 255
    rgba = pixels(out["rgba"]["images"])
    assert (rgba[:, : SIZE // 2] == [0, 0, 255]).all() and (rgba[:, SIZE // 2 :] == 255).all()  # onto white
    la = pixels(out["la"]["images"])
    assert (la[:, : SIZE // 2] == 60).all() and (la[:, SIZE // 2 :] == 255).all()
    assert (pixels(out["array"]["images"]) == 77).all()

    tokenizer = image_ops.ImageTextPreprocessor(image_size=SIZE, context_length=16).tokenizer
    np.testing.assert_array_equal(out["several"]["token_ids"], tokenizer("first caption"))  # evaluation: first
    np.testing.assert_array_equal(out["bytes_caption"]["token_ids"], tokenizer("caf\u00e9"))
    np.testing.assert_array_equal(out["long"]["token_ids"], tokenizer("word " * 500))
    truncated = {key for key, row in out.items() if row["caption_truncated"]}
    assert truncated == {"long"}


def test_skipped_markers_carry_reason_key_and_detail():
    items, _ = examples()
    safe = safe_preprocessor()
    skipped = {item["key"]: safe(item) for item in items}
    assert skipped["truncated"] == Skipped("truncated_image", "truncated", skipped["truncated"].detail)
    assert "3000x3000" in skipped["large_png"].detail
    assert isinstance(skipped["rgb"], dict)
    assert safe_preprocessor(keep="label")(items[0]).reason == "missing_field"
    with pytest.raises(ValueError, match="unknown skip reason"):
        Skipped("bad_vibes")


def test_training_picks_one_of_the_usable_captions_uniformly_with_the_example_rng():
    items = [{"key": "k", "image": np.zeros((SIZE, SIZE, 3), np.uint8), "caption": ["zero", "one", None, "two"]}]
    safe = safe_preprocessor()
    tokenizer = image_ops.ImageTextPreprocessor(image_size=SIZE, context_length=16).tokenizer
    options = {tuple(tokenizer(text)): text for text in ("zero", "one", "two")}
    picked = [options[tuple(safe(items[0], np.random.default_rng(seed))["token_ids"])] for seed in range(300)]
    counts = {text: picked.count(text) for text in ("zero", "one", "two")}
    assert all(70 <= count <= 130 for count in counts.values()), counts
    again = [options[tuple(safe(items[0], np.random.default_rng(seed))["token_ids"])] for seed in range(300)]
    assert picked == again


def test_skip_counter_totals_rate_threshold_and_state():
    items, expected = examples()
    counter = SkipCounter(min_examples=10)
    for batch in run(items):
        batch = counter.update(batch)
        assert "skipped_before" not in batch and "caption_truncated" not in batch and "images" in batch
    assert counter.totals() == expected
    assert counter.examples_seen == len(items) and counter.skip_rate == pytest.approx(17 / 27)
    assert counter.caption_truncated == 1
    counter.check(0.7)  # 63% is under 70%
    with pytest.raises(TooManyBadExamples) as error:
        counter.check(0.05)
    message = str(error.value)
    for part in ("62.96%", "27 examples", "image_too_large 2", "missing_caption 3", "data.max_skip_rate=0.05"):
        assert part in message, message
    SkipCounter(min_examples=1000).check(0.0)  # too few examples to judge: never raises
    restored = SkipCounter.from_state(counter.state(), min_examples=10)
    assert restored.totals() == counter.totals() and restored.examples_seen == counter.examples_seen
    assert restored.caption_truncated == 1 and restored.state() == counter.state()


def test_a_stream_of_only_bad_examples_raises_instead_of_looping_forever():
    bad = [{"key": f"b{i}", "image": None, "caption": "x"} for i in range(5)]
    endless = grain.MapDataset.source(bad).repeat().map(safe_preprocessor()).to_iter_dataset()
    with pytest.raises(TooManyBadExamples, match=r"101 consecutive examples were bad \(missing_image 101.*data.image_field"):
        next(iter(SkipBadExamples(endless, max_consecutive_bad=100).batch(4)))


def mixed_items(n: int = 48) -> list[dict]:
    rng = np.random.default_rng(1)
    good = encode(Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)))
    kinds = [(good, "fine"), (None, "x"), (b"junk", "x"), (good, None), (good, b"\xff")]
    picks = rng.choice(len(kinds), n, p=[0.5, 0.2, 0.1, 0.1, 0.1])
    return [{"key": f"e{i}", "image": kinds[k][0], "caption": kinds[k][1]} for i, k in enumerate(picks)]


def training_stream(items):
    """The shape of the training pipeline: seeded shuffle, repeat, random map, threads, skip, batch."""
    dataset = grain.MapDataset.source(items).seed(7).shuffle().repeat()
    safe = safe_preprocessor()
    dataset = dataset.random_map(lambda example, rng: safe(example, rng))
    dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    return SkipBadExamples(dataset).batch(4, drop_remainder=True)


def test_resume_of_the_skip_counting_iterator_is_exact():
    items = mixed_items()
    iterator = iter(training_stream(items))
    for _ in range(3):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(8)]
    resumed = iter(training_stream(items))
    resumed.set_state(state)
    for want, got in zip(expected, (next(resumed) for _ in range(8))):
        assert want.keys() == got.keys()
        for name in want:
            np.testing.assert_array_equal(want[name], got[name])
    assert sum(robust.skip_totals(expected).values()) > 0


def test_counts_are_exact_through_worker_processes():
    items = mixed_items()

    def stream():
        return SkipBadExamples(grain.MapDataset.source(items).map(safe_preprocessor()).to_iter_dataset()).batch(4)

    iterator = iter(stream().mp_prefetch(grain.MultiprocessingOptions(num_workers=2)))
    try:
        batches = list(iterator)
    finally:
        iterator.close()
    single = list(stream())
    assert robust.skip_totals(batches) == robust.skip_totals(single)
    assert sorted(np.concatenate([b["key"] for b in batches]).tolist()) == sorted(
        np.concatenate([b["key"] for b in single]).tolist()
    )
    assert sum(robust.skip_totals(batches).values()) + sum(len(b["key"]) for b in batches) == len(items)


def test_pending_counts_are_part_of_the_state():
    items = mixed_items(12)
    iterator = iter(SkipBadExamples(grain.MapDataset.source(items).map(safe_preprocessor()).to_iter_dataset()))
    state = iterator.get_state()
    assert set(state) == {"parent", "pending_skips"} and set(state["pending_skips"]) == set(SKIP_REASONS)
    first = next(iterator)["skipped_before"]
    state["pending_skips"]["missing_image"] = 2  # as if two examples had been skipped before the checkpoint
    iterator.set_state(state)
    again = next(iterator)["skipped_before"]
    assert again[SKIP_REASONS.index("missing_image")] == first[SKIP_REASONS.index("missing_image")] + 2


def test_skip_counters_merge_across_processes():
    from jclip.data.robust import SKIP_REASONS, SkipCounter

    first = {"good": 10, "caption_truncated": 1, "skipped": {SKIP_REASONS[0]: 2}}
    second = {"good": 5, "caption_truncated": 0, "skipped": {SKIP_REASONS[0]: 1, SKIP_REASONS[1]: 4}}
    merged = SkipCounter.merged([first, second])
    assert merged.good == 15 and merged.caption_truncated == 1
    assert merged.totals()[SKIP_REASONS[0]] == 3 and merged.totals()[SKIP_REASONS[1]] == 4
    assert merged.skip_rate == 7 / 22
