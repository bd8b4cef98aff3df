"""Tests of jclip.data.sources.scenes against checks re-derived here from object geometry and rendered pixels."""

from __future__ import annotations

import collections
import re

import numpy as np
import pytest

from jclip.data.sources import scenes

NUM_EXAMPLES = 150

_OBJECT = r"an? (?:(small|large) )?(\w+) (\w+)"
_PROBE = re.compile(rf"^{_OBJECT} (to the left of|to the right of|above|below) {_OBJECT}$")


@pytest.fixture(scope="module")
def examples() -> list[scenes.Example]:
    return [scenes.make_example(np.random.default_rng([7, i])) for i in range(NUM_EXAMPLES)]


def _parse_probe(text: str) -> tuple[tuple[str | None, str, str], str, tuple[str | None, str, str]]:
    match = _PROBE.match(text)
    assert match is not None, text
    size_a, colour_a, shape_a, relation, size_b, colour_b, shape_b = match.groups()
    return (size_a, colour_a, shape_a), relation, (size_b, colour_b, shape_b)


def _offset_holds(a: scenes.SceneObject, b: scenes.SceneObject, relation: str, margin: float) -> bool:
    """Our own reading of a relation phrase: image y grows downwards."""
    dx, dy = b.x - a.x, b.y - a.y
    return {"to the left of": dx, "to the right of": -dx, "above": dy, "below": -dy}[relation] > margin


def _statement_true(scene: scenes.Scene, text: str, margin: float) -> bool:
    """Whether any two distinct objects fit the two descriptions of `text` and stand in its relation."""
    desc_a, relation, desc_b = _parse_probe(text)

    def fits(obj: scenes.SceneObject, desc: tuple[str | None, str, str]) -> bool:
        size, colour, shape = desc
        return obj.colour == colour and obj.shape == shape and size in (None, obj.size)

    return any(fits(a, desc_a) and fits(b, desc_b) and _offset_holds(a, b, relation, margin)
               for a in scene.objects for b in scene.objects if a is not b)


def _nearest_colour(pixel: np.ndarray) -> str:
    names = list(scenes.COLOURS)
    distances = [np.abs(pixel.astype(int) - np.array(scenes.COLOURS[n])).sum() for n in names]
    return names[int(np.argmin(distances))]


def test_vocabulary_and_class_names() -> None:
    assert len(scenes.SHAPES) == 6 and len(scenes.COLOURS) == 8
    assert len(scenes.CLASS_NAMES) == len(set(scenes.CLASS_NAMES)) == 48
    for name in scenes.CLASS_NAMES:
        colour, shape = name.split(" ")
        assert colour in scenes.COLOURS and shape in scenes.SHAPES
        assert scenes.CLASS_NAMES[scenes.class_id(colour, shape)] == name


def test_same_rng_seed_gives_same_example() -> None:
    first = scenes.make_example(np.random.default_rng(123))
    again = scenes.make_example(np.random.default_rng(123))
    other = scenes.make_example(np.random.default_rng(124))
    assert first.scene == again.scene
    np.testing.assert_array_equal(first.image, again.image)
    assert (first.caption, first.dense_caption, first.probe, first.negatives) == (
        again.caption, again.dense_caption, again.probe, again.negatives)
    assert first.scene != other.scene


def test_scene_structure(examples: list[scenes.Example]) -> None:
    counts = collections.Counter(len(e.scene.objects) for e in examples)
    assert set(counts) == {2, 3, 4}
    for example in examples:
        objects = example.scene.objects
        assert len({o.class_name for o in objects}) == len(objects), "classes within a scene are distinct"
        for i, a in enumerate(objects):
            assert a.half_size <= a.x <= 1 - a.half_size and a.half_size <= a.y <= 1 - a.half_size
            for b in objects[i + 1:]:  # bounding boxes are separated along x or y
                reach = a.half_size + b.half_size
                assert abs(a.x - b.x) >= reach or abs(a.y - b.y) >= reach


def test_labels_and_main_object(examples: list[scenes.Example]) -> None:
    for example in examples:
        scene = example.scene
        assert scene.labels == [scenes.CLASS_NAMES.index(f"{o.colour} {o.shape}") for o in scene.objects]
        halves = sorted((o.half_size for o in scene.objects), reverse=True)
        assert halves[0] > 1.4 * halves[1], "the largest object is unambiguous"
        largest = max(scene.objects, key=lambda o: o.half_size)
        assert scene.label == scenes.CLASS_NAMES.index(f"{largest.colour} {largest.shape}")
        assert largest.size == "large" and all(o.size == "small" for o in scene.objects if o is not largest)


def test_rendered_pixels_match_scene(examples: list[scenes.Example]) -> None:
    """The centre pixel has the object's colour, and the object's pixels are centred on its position."""
    for example in examples[:60]:
        image = example.image
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        for obj in example.scene.objects:
            cx, cy = int(obj.x * 64), int(obj.y * 64)
            assert _nearest_colour(image[cy, cx]) == obj.colour
            r = int(np.ceil(obj.half_size * 64)) + 1
            y0, x0 = max(cy - r, 0), max(cx - r, 0)
            patch = image[y0:cy + r + 1, x0:cx + r + 1].astype(int)
            ys, xs = np.nonzero(np.abs(patch - np.array(obj.rgb)).sum(-1) < 30)
            half_px = obj.half_size * 64
            assert len(ys) > 0.15 * (2 * half_px) ** 2  # a star covers the least of its box
            # Triangles have their centroid 0.2 half-sizes below the box centre; the rest are symmetric.
            assert abs(xs.mean() + x0 + 0.5 - obj.x * 64) < 1.0
            assert abs(ys.mean() + y0 + 0.5 - obj.y * 64) < 0.25 * half_px + 1.0


def test_background_is_textured_and_unlike_objects(examples: list[scenes.Example]) -> None:
    for example in examples[:20]:
        scene = example.scene
        yy, xx = np.mgrid[0:64, 0:64] + 0.5
        free = np.ones((64, 64), bool)
        for o in scene.objects:
            free &= (np.abs(xx / 64 - o.x) > o.half_size + 1 / 64) | (np.abs(yy / 64 - o.y) > o.half_size + 1 / 64)
        background = example.image[free].astype(float)
        assert background.std(0).mean() > 2.0, "not a flat colour"
        saturation = background.max(-1) - background.min(-1)
        assert np.median(saturation) < 90, "muted, unlike the saturated object colours"


def test_probe_is_true_and_negatives_false(examples: list[scenes.Example]) -> None:
    for example in examples:
        scene, positive = example.scene, example.probe.text
        assert _statement_true(scene, positive, margin=scenes.RELATION_MARGIN), positive
        negatives = example.negative_captions
        assert len(negatives) == len(set(negatives)) == 3, "three different negatives"
        for negative in negatives:
            assert negative != positive
            # False even under the loosest reading of the relation (any offset the right way).
            assert not _statement_true(scene, negative, margin=0.0), (positive, negative)


def test_negatives_are_hard(examples: list[scenes.Example]) -> None:
    shapes_seen = collections.Counter()
    for example in examples:
        positive = example.probe.text
        attribute, relation, replaced = example.negative_captions
        bag = sorted(positive.split())
        assert sorted(attribute.split()) == bag, "attribute swap uses the same words"
        assert sorted(relation.split()) == bag, "relation swap uses the same words"
        # object_replace: exactly one word differs, and it is a shape absent from the image.
        diff = [(p, n) for p, n in zip(positive.split(), replaced.split()) if p != n]
        assert len(positive.split()) == len(replaced.split()) and len(diff) == 1
        assert diff[0][1] in scenes.SHAPES and diff[0][1] not in {o.shape for o in example.scene.objects}
        shapes_seen[diff[0][1]] += 1
        # The relation swap exchanges the two object descriptions.
        a, rel, b = _parse_probe(positive)
        assert _parse_probe(relation) == (b, rel, a)
    assert len(shapes_seen) == len(scenes.SHAPES)


def test_attribute_swaps_cover_colours_and_sizes(examples: list[scenes.Example]) -> None:
    kinds = collections.Counter()
    for example in examples:
        (size_a, colour_a, shape_a), _, (size_b, colour_b, shape_b) = _parse_probe(example.probe.text)
        (nsize_a, ncolour_a, nshape_a), _, (nsize_b, ncolour_b, nshape_b) = _parse_probe(example.negative_captions[0])
        assert (nshape_a, nshape_b) == (shape_a, shape_b)
        if (ncolour_a, ncolour_b) == (colour_b, colour_a) and colour_a != colour_b:
            kinds["colour"] += 1
        else:
            assert (nsize_a, nsize_b) == (size_b, size_a) and size_a != size_b
            kinds["size"] += 1
    assert kinds["colour"] > 0.5 * len(examples) and kinds["size"] > 0


def test_short_captions_name_objects_and_vary(examples: list[scenes.Example]) -> None:
    templates = set()
    for example in examples:
        caption = example.caption
        assert example.scene.main_object.class_name in caption
        named = [o for o in example.scene.objects if o.class_name in caption]
        assert len(named) >= len(example.scene.objects) - 1
        skeleton = caption
        for o in example.scene.objects:
            skeleton = skeleton.replace(o.class_name, "X")
        templates.add(re.sub(r"\b(an?|small|large|two|three|four)\b ?", "", skeleton))
    assert len(templates) >= 10, templates


def test_dense_caption_describes_everything(examples: list[scenes.Example]) -> None:
    for example in examples:
        text = example.dense_caption
        for o in example.scene.objects:
            assert f"{o.size} {o.colour} {o.shape}" in text
        assert example.scene.background.tint in text
        objects = example.scene.objects
        for a in objects:
            for b in objects:
                if a is b or b.x - a.x <= scenes.RELATION_MARGIN:
                    continue  # `a` clearly left of `b`: one of the two phrasings must be there
                left = re.search(rf"The {a.class_name} is [a-z ]*to the left of the {b.class_name}\.", text)
                right = re.search(rf"The {b.class_name} is [a-z ]*to the right of the {a.class_name}\.", text)
                assert left or right, (a.class_name, b.class_name, text)
        assert len(text.split(". ")) >= 1 + len(objects)


def test_render_other_sizes() -> None:
    scene = scenes.sample_scene(np.random.default_rng(0))
    assert scenes.render(scene, image_size=32).shape == (32, 32, 3)
    assert scenes.render(scene, image_size=128).shape == (128, 128, 3)


def test_render_equals_naive_per_object_compositing() -> None:
    """The one-mask renderer relies on objects never sharing a pixel; compare with blending one object at a time."""
    from PIL import Image, ImageDraw

    for seed in range(40):
        scene = scenes.sample_scene(np.random.default_rng(seed))
        canvas = scenes._background(scene.background, 64)
        for obj in scene.objects:
            mask = Image.new("L", (256, 256), 0)
            scenes._draw_shape(ImageDraw.Draw(mask), obj.shape, obj.x * 256, obj.y * 256, obj.half_size * 256)
            alpha = np.asarray(mask.reduce(4), np.float32) / 255
            canvas = canvas + alpha * (np.asarray(obj.rgb, np.float32)[:, None, None] - canvas)
        expected = np.clip(canvas + 0.5, 0, 255).astype(np.uint8).transpose(1, 2, 0)
        np.testing.assert_array_equal(scenes.render(scene), expected)
