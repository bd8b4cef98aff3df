"""Procedurally generated image–caption scenes: the embedded dataset's generator.

A scene is 2–4 coloured shapes (exactly one of them large: the *main* object) on a mildly textured, tinted
background. From a scene this module derives everything the embedded dataset stores:

* `render`: the image (uint8, supersampled and box-filtered so edges are anti-aliased);
* `short_caption`: alt-text-like, varied templates ("red circle and blue square", "picture of ...");
* `dense_caption`: several sentences naming every object with all attributes and position, and the spatial
  relations between objects (for dense-caption methods);
* class labels "<colour> <shape>" from the fixed `CLASS_NAMES` (zero-shot classification), with the main
  object's class as the image label;
* a positive *probe* caption ("a red circle to the left of a blue square") and three hard negatives with
  exact ground truth, SugarCrepe-style: `attribute_swap` (swap colours or sizes of the two objects),
  `relation_swap` (swap the two objects of the relation: the very same bag of words) and `object_replace`
  (replace a shape by one absent from the image). Every negative is checked false against the scene
  geometry, under the loosest reading of the relation (any positive offset), and regenerated otherwise.

Everything is pure Python/NumPy/PIL and deterministic given a `np.random.Generator`, so the TFDS builder in
`jclip.data.sources.embedded` can derive each example from (seed, split, index) alone.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import numpy as np
from PIL import Image, ImageDraw

# ---------------------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------------------

#: Shapes, chosen to stay distinguishable at 32x32 (no rotation, so a square is never a diamond).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")

#: Object colours and their nominal RGB; pairwise far apart so the nearest palette entry is unambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (245, 225, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "purple": (150, 40, 190),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

SIZES: tuple[str, ...] = ("small", "large")

#: Half side of an object's bounding box as a fraction of the image side (range sampled uniformly).
#: At 64x64 a small object is 15-17 px, a large one 26-30 px; at 32x32 they remain ~8 and ~14 px.
HALF_SIZE_RANGE: dict[str, tuple[float, float]] = {"small": (7.5 / 64, 8.5 / 64), "large": (13.0 / 64, 15.0 / 64)}

#: Muted background tints (low saturation, mid value) that contrast with every object colour, incl. white/black.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "beige": (165, 150, 120),
    "sage": (118, 138, 112),
    "slate": (98, 112, 135),
    "rose": (150, 112, 120),
    "teal": (96, 132, 130),
}
BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)

#: Zero-shot classes: every "<colour> <shape>"; class id = colour index * len(SHAPES) + shape index.
CLASS_NAMES: tuple[str, ...] = tuple(f"{c} {s}" for c in COLOUR_NAMES for s in SHAPES)

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
_RELATION_TEXT = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}

#: A relation is stated only when the centres differ by more than this (fraction of the image side, ~6 px).
RELATION_MARGIN = 0.1
#: Minimum gap between bounding boxes (along x or y): objects never overlap, nor share an anti-aliased pixel.
_MIN_GAP = 2.0 / 64
#: Probability of 2, 3, 4 objects.
_NUM_OBJECTS_P = (0.3, 0.4, 0.3)


def class_id(colour: str, shape: str) -> int:
    """Index of "<colour> <shape>" in `CLASS_NAMES`."""
    return COLOUR_NAMES.index(colour) * len(SHAPES) + SHAPES.index(shape)


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


# ---------------------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One shape. Coordinates are fractions of the image side (y grows downwards), so any size renders."""

    shape: str
    colour: str
    size: str  # "small" or "large"
    x: float  # centre
    y: float
    half_size: float  # half side of the bounding box
    rgb: tuple[int, int, int]  # the nominal colour with a small jitter

    @property
    def class_name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def class_id(self) -> int:
        return class_id(self.colour, self.shape)

    def phrase(self, with_size: bool = False) -> str:
        """E.g. "large red circle" (no article)."""
        return f"{self.size} {self.class_name}" if with_size else self.class_name


@dataclasses.dataclass(frozen=True)
class Background:
    """A tinted background with a linear gradient and low- plus high-frequency noise drawn from `texture_seed`."""

    tint: str
    rgb: tuple[int, int, int]
    gradient: tuple[float, float]  # brightness change per image side along x and y
    texture_seed: int


@dataclasses.dataclass(frozen=True)
class Scene:
    """A background and 2–4 objects of distinct classes; exactly one object is large (the main object)."""

    objects: tuple[SceneObject, ...]
    background: Background

    @property
    def main_index(self) -> int:
        """Index of the main object: the single large one, so "the largest object" is never ambiguous."""
        (index,) = [i for i, o in enumerate(self.objects) if o.size == "large"]
        return index

    @property
    def main_object(self) -> SceneObject:
        return self.objects[self.main_index]

    @property
    def labels(self) -> list[int]:
        """Class ids of all objects, in drawing order."""
        return [o.class_id for o in self.objects]

    @property
    def label(self) -> int:
        """Class id of the main (largest) object."""
        return self.main_object.class_id


_NUM_OBJECTS_CDF = np.cumsum(_NUM_OBJECTS_P)[:-1]
_PALETTE = np.array([COLOURS[c] for c in COLOUR_NAMES])


def _place(rng: np.random.Generator, half_sizes: list[float], candidates: int = 64) -> list[tuple[float, float]] | None:
    """Non-overlapping centres fully inside the image, by rejection sampling; None if it gets stuck.

    Two boxes are apart when they are separated by at least `_MIN_GAP` along x or along y. (Plain Python
    floats: with 2–4 objects, NumPy's per-call overhead would dominate.)
    """
    placed: list[tuple[float, float, float]] = []
    for half in half_sizes:
        lo, span = half + 1 / 64, 1 - 2 * (half + 1 / 64)
        uniforms = rng.random(2 * candidates).tolist()
        for x, y in zip(uniforms[::2], uniforms[1::2]):
            x, y = lo + span * x, lo + span * y
            if all(abs(x - px) >= ph + half + _MIN_GAP or abs(y - py) >= ph + half + _MIN_GAP
                   for px, py, ph in placed):
                placed.append((x, y, half))
                break
        else:
            return None
    return [(x, y) for x, y, _ in placed]


def sample_scene(rng: np.random.Generator) -> Scene:
    """Samples a scene: 2–4 objects of distinct "<colour> <shape>" classes, one large, none overlapping."""
    while True:
        num_objects = 2 + int(np.searchsorted(_NUM_OBJECTS_CDF, rng.random(), side="right"))
        classes = rng.permutation(len(CLASS_NAMES))[:num_objects]
        sizes = ["large"] + ["small"] * (num_objects - 1)  # the large one is placed first: it is the hardest
        half_sizes = [lo + (hi - lo) * u for (lo, hi), u in
                      zip((HALF_SIZE_RANGE[s] for s in sizes), rng.random(num_objects).tolist())]
        centres = _place(rng, half_sizes)
        if centres is not None:
            break
    colours = classes // len(SHAPES)
    rgbs = np.clip(_PALETTE[colours] + rng.integers(-12, 13, size=(num_objects, 3)), 0, 255).tolist()
    objects = [
        SceneObject(SHAPES[cls % len(SHAPES)], COLOUR_NAMES[cls // len(SHAPES)], size, x, y, half, tuple(rgb))
        for cls, size, half, (x, y), rgb in zip(classes.tolist(), sizes, half_sizes, centres, rgbs)
    ]
    order = rng.permutation(num_objects).tolist()  # drawing and label order: the main object can be anywhere
    tint = BACKGROUND_NAMES[int(rng.integers(len(BACKGROUND_NAMES)))]
    tint_rgb = np.clip(np.array(BACKGROUNDS[tint]) + rng.integers(-10, 11, size=3), 0, 255).tolist()
    gradient = rng.uniform(-25, 25, size=2).tolist()
    background = Background(tint, tuple(tint_rgb), tuple(gradient), int(rng.integers(2**31)))
    return Scene(objects=tuple(objects[i] for i in order), background=background)


# ---------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------


def _star(points: int = 5, inner: float = 0.42) -> list[tuple[float, float]]:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return [(float(r * np.cos(a)), float(r * np.sin(a))) for r, a in zip(radii, angles)]


_ARM = 0.34  # half width of a cross arm
#: Unit polygons in [-1, 1]^2 (y down). Every shape contains its centre, so the centre pixel has its colour.
_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)],
    "triangle": [(0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)],
    "star": _star(),
    "cross": [(-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM), (_ARM, _ARM), (_ARM, 1),
              (-_ARM, 1), (-_ARM, _ARM), (-1, _ARM), (-1, -_ARM), (-_ARM, -_ARM)],
    "diamond": [(0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)],
}


@functools.lru_cache(maxsize=8)
def _upsampling_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] linear-interpolation weights (cell-centred), for smooth low-frequency textures."""
    positions = np.clip((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0, size_in - 1)
    lower = np.minimum(np.floor(positions).astype(int), size_in - 2)
    frac = positions - lower
    weights = np.zeros((size_out, size_in), np.float32)
    weights[np.arange(size_out), lower] = 1 - frac
    weights[np.arange(size_out), lower + 1] = frac
    return weights


_BLOTCH_GRID = 5


def _background(background: Background, image_size: int) -> np.ndarray:
    """Tint + gradient + smooth blotches (mostly brightness, a little colour) + fine grain.

    Channels-first float32 [3, H, W]: NumPy is several times slower on a trailing axis of length 3.
    """
    rng = np.random.default_rng(background.texture_seed)
    coords = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size - 0.5
    shade = background.gradient[0] * coords[None, :] + background.gradient[1] * coords[:, None]
    up = _upsampling_matrix(_BLOTCH_GRID, image_size)
    brightness = up @ rng.standard_normal((_BLOTCH_GRID, _BLOTCH_GRID), dtype=np.float32) @ up.T * 9.0
    tint = up @ rng.standard_normal((3, _BLOTCH_GRID, _BLOTCH_GRID), dtype=np.float32) @ up.T * 5.0  # [3, H, W]
    # Uniform grain in [-4, 4] (std 2.3) from raw bytes: a quarter of the cost of normal samples.
    grain = np.frombuffer(rng.bytes(image_size * image_size), np.uint8).reshape(image_size, image_size)
    grain = grain.astype(np.float32) * (8 / 255) - 4
    luminance = shade + brightness + grain  # shared by the three channels
    return luminance + tint + np.asarray(background.rgb, np.float32)[:, None, None]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, half: float) -> None:
    if shape == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=255)
    else:
        draw.polygon([(cx + u * half, cy + v * half) for u, v in _POLYGONS[shape]], fill=255)


def render(scene: Scene, image_size: int = 64, supersample: int = 4) -> np.ndarray:
    """Draws the scene as uint8 [image_size, image_size, 3].

    All shapes are drawn into one coverage mask `supersample`x larger and box-filtered down (anti-aliased
    edges); each object's colour fills its own box in a colour layer, and the layer is alpha-blended onto the
    background. That needs no pixel to be touched by two objects, which `_MIN_GAP` (2 px) guarantees.
    """
    if supersample < 2:
        raise ValueError("supersample must be >= 2: a shape's edge may reach one sub-pixel past its box")
    big = image_size * supersample
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    colour = np.zeros((3, image_size, image_size), np.float32)
    reach = 1 / supersample  # PIL fills edge pixels inclusively: at most one sub-pixel past the box
    for obj in scene.objects:
        _draw_shape(draw, obj.shape, obj.x * big, obj.y * big, obj.half_size * big)
        lo_x, hi_x = (obj.x - obj.half_size) * image_size - reach, (obj.x + obj.half_size) * image_size + reach
        lo_y, hi_y = (obj.y - obj.half_size) * image_size - reach, (obj.y + obj.half_size) * image_size + reach
        rows, cols = slice(max(int(lo_y), 0), int(hi_y) + 1), slice(max(int(lo_x), 0), int(hi_x) + 1)
        colour[:, rows, cols] = np.asarray(obj.rgb, np.float32)[:, None, None]
    mask = mask.reduce(supersample)
    alpha = np.frombuffer(mask.tobytes(), np.uint8).reshape(image_size, image_size) * np.float32(1 / 255)
    canvas = _background(scene.background, image_size)  # [3, H, W]
    canvas += alpha * (colour - canvas)
    return np.ascontiguousarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8).transpose(1, 2, 0))


# ---------------------------------------------------------------------------------------------------------
# Relations
# ---------------------------------------------------------------------------------------------------------


def relation_holds(a: SceneObject, b: SceneObject, relation: str, margin: float = RELATION_MARGIN) -> bool:
    """Whether "a <relation> b" holds, i.e. the centres differ by more than `margin` the right way (y is down)."""
    if relation == "left of":
        return b.x - a.x > margin
    if relation == "right of":
        return a.x - b.x > margin
    if relation == "above":
        return b.y - a.y > margin
    if relation == "below":
        return a.y - b.y > margin
    raise ValueError(f"unknown relation {relation!r}")


def relations_between(a: SceneObject, b: SceneObject, margin: float = RELATION_MARGIN) -> list[str]:
    """All relations "a <r> b" that hold with the margin (at most one horizontal and one vertical)."""
    return [r for r in RELATIONS if relation_holds(a, b, r, margin)]


# ---------------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------------

_NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}


def _join(phrases: list[str], style: int) -> str:
    if len(phrases) == 1:
        return phrases[0]
    if style == 0:
        return ", ".join(phrases[:-1]) + " and " + phrases[-1]
    if style == 1:
        return ", ".join(phrases)
    if style == 2:
        return " & ".join(phrases) if len(phrases) == 2 else ", ".join(phrases[:-1]) + " & " + phrases[-1]
    return " + ".join(phrases)


def short_caption(scene: Scene, rng: np.random.Generator) -> str:
    """An alt-text-like caption: objects in random order, optional articles/sizes/background, varied templates.

    Like real alt-text it is sometimes incomplete: with 3+ objects, one small object is left out 20% of the time.
    """
    objects = [scene.objects[i] for i in rng.permutation(len(scene.objects))]
    main = scene.main_object
    if rng.random() < 0.5:  # alt-text tends to name the salient object first
        objects.remove(main)
        objects.insert(0, main)
    complete = True
    if len(objects) >= 3 and rng.random() < 0.2:
        small = [o for o in objects if o is not main]
        objects.remove(small[int(rng.integers(len(small)))])
        complete = False
    size_mode = int(rng.choice(3, p=[0.55, 0.25, 0.2]))  # 0: no size words, 1: only "large" main, 2: all
    articles = rng.random() < 0.4

    def phrase(obj: SceneObject) -> str:
        text = obj.phrase(with_size=size_mode == 2 or (size_mode == 1 and obj is main))
        return f"{_article(text)} {text}" if articles else text

    phrases = [phrase(o) for o in objects]
    listing = _join(phrases, int(rng.integers(4)))
    bg = scene.background.tint
    template = int(rng.integers(10))
    if template == 0:
        return listing
    if template == 1:
        return f"{listing} on a {bg} background"
    if template == 2:
        return f"picture of {listing}"
    if template == 3 and complete:
        return f"{_NUMBER_WORDS[len(objects)]} shapes: {listing}"
    if template == 4:
        return f"{listing}, {bg} background"
    if template == 5:
        return f"simple drawing of {listing}"
    if template == 6:
        return f"{phrases[0]} with {_join(phrases[1:], 0)}"
    if template == 7:
        relations = relations_between(objects[0], objects[1])
        if relations:
            relation = _RELATION_TEXT[relations[int(rng.integers(len(relations)))]]
            rest = f", and {_join(phrases[2:], 0)}" if len(phrases) > 2 else ""
            return f"{phrases[0]} {relation} {phrases[1]}{rest}"
        return f"{phrases[0]} next to {_join(phrases[1:], 0)}"
    if template == 8:
        return f"clip art: {listing}"
    return f"{listing} - illustration"


def _position_phrase(obj: SceneObject) -> str:
    """Where the centre lies in a 3x3 grid: "in the top left", "at the top", "in the centre", "on the left"…"""
    col = "left" if obj.x < 1 / 3 else "right" if obj.x > 2 / 3 else ""
    row = "top" if obj.y < 1 / 3 else "bottom" if obj.y > 2 / 3 else ""
    if row and col:
        return f"in the {row} {col}"
    if row:
        return f"at the {row}"
    if col:
        return f"on the {col}"
    return "in the centre"


def dense_caption(scene: Scene) -> str:
    """Several sentences: the background, every object (size, colour, shape, position), then pairwise relations.

    Objects are listed main object first, then left to right; a relation sentence is written for every pair
    whose centres differ by more than `RELATION_MARGIN` along x and/or y.
    """
    main = scene.main_object
    others = sorted((o for o in scene.objects if o is not main), key=lambda o: (o.x, o.y))
    ordered = [main, *others]
    count = _NUMBER_WORDS[len(ordered)]
    sentences = [f"An image of {count} shapes on a {scene.background.tint} background."]
    for obj in ordered:
        text = obj.phrase(with_size=True)
        sentences.append(f"{_article(text).capitalize()} {text} {_position_phrase(obj)}.")
    for a, b in itertools.combinations(ordered, 2):
        relations = relations_between(a, b)
        if not relations:
            continue
        vertical = [r for r in relations if r in ("above", "below")]
        horizontal = [_RELATION_TEXT[r] for r in relations if r in ("left of", "right of")]
        sentences.append(f"The {a.class_name} is {' and '.join(vertical + horizontal)} the {b.class_name}.")
    return " ".join(sentences)


# ---------------------------------------------------------------------------------------------------------
# Probe captions and hard negatives
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ObjectRef:
    """A description of an object in a probe: colour and shape, optionally size."""

    colour: str
    shape: str
    size: str | None = None

    def matches(self, obj: SceneObject) -> bool:
        return (obj.colour == self.colour and obj.shape == self.shape
                and (self.size is None or obj.size == self.size))

    @property
    def text(self) -> str:
        words = f"{self.size} {self.colour} {self.shape}" if self.size else f"{self.colour} {self.shape}"
        return f"{_article(words)} {words}"


@dataclasses.dataclass(frozen=True)
class Probe:
    """A relational statement "<subject> <relation> <object>" that can be checked against a scene."""

    subject: ObjectRef
    relation: str
    object: ObjectRef

    @property
    def text(self) -> str:
        return f"{self.subject.text} {_RELATION_TEXT[self.relation]} {self.object.text}"


def probe_holds(scene: Scene, probe: Probe, margin: float = RELATION_MARGIN) -> bool:
    """Whether two distinct objects of the scene match the probe's descriptions and stand in its relation.

    Positives must hold with `RELATION_MARGIN`; negatives must fail with `margin=0.0` (the loosest reading).
    """
    return any(
        probe.subject.matches(a) and probe.object.matches(b) and relation_holds(a, b, probe.relation, margin)
        for a, b in itertools.permutations(scene.objects, 2)
    )


def _ref(obj: SceneObject, with_size: bool) -> ObjectRef:
    return ObjectRef(obj.colour, obj.shape, obj.size if with_size else None)


def sample_probe(scene: Scene, rng: np.random.Generator) -> Probe | None:
    """A true probe about two related objects whose attribute swap differs from swapping the objects.

    Preferred: objects that differ in colour and in shape (sizes stated half the time), so a colour swap
    is not just the relation swap ("an orange circle below a white circle" would be). Otherwise a pair
    with the large object, with sizes stated, for a size swap. None if neither exists.
    """
    pairs = [(a, b) for a, b in itertools.permutations(scene.objects, 2) if relations_between(a, b)]
    distinct = [(a, b) for a, b in pairs if a.colour != b.colour and a.shape != b.shape]
    if distinct:
        a, b = distinct[int(rng.integers(len(distinct)))]
        with_size = bool(rng.random() < 0.5)
    else:
        pairs = [(a, b) for a, b in pairs if a.size != b.size]
        if not pairs:
            return None
        a, b = pairs[int(rng.integers(len(pairs)))]
        with_size = True
    relations = relations_between(a, b)
    relation = relations[int(rng.integers(len(relations)))]
    return Probe(_ref(a, with_size), relation, _ref(b, with_size))


def attribute_swap(scene: Scene, probe: Probe, rng: np.random.Generator) -> Probe | None:
    """Swaps the colours (or, when both sizes are stated and differ, the sizes) of the probe's two objects.

    Returns None if no swap yields a statement that is false for the scene and differs from both the probe
    and its relation swap.
    """
    s, o = probe.subject, probe.object
    candidates = []
    if s.colour != o.colour:
        candidates.append(Probe(dataclasses.replace(s, colour=o.colour), probe.relation,
                                dataclasses.replace(o, colour=s.colour)))
    if s.size is not None and o.size is not None and s.size != o.size:
        candidates.append(Probe(dataclasses.replace(s, size=o.size), probe.relation,
                                dataclasses.replace(o, size=s.size)))
    objects_swapped = Probe(probe.object, probe.relation, probe.subject)
    for i in rng.permutation(len(candidates)):
        if candidates[i] not in (probe, objects_swapped) and not probe_holds(scene, candidates[i], margin=0.0):
            return candidates[i]
    return None


def relation_swap(scene: Scene, probe: Probe, rng: np.random.Generator) -> Probe | None:
    """Swaps the two objects of the relation ("A left of B" -> "B left of A"): the same bag of words.

    (Flipping the relation word instead states the same falsehood but changes the words, so it is not used.)
    `rng` is unused; it is accepted so every negative constructor has the same signature.
    """
    del rng
    swapped = Probe(probe.object, probe.relation, probe.subject)
    if swapped != probe and not probe_holds(scene, swapped, margin=0.0):
        return swapped
    return None


def object_replace(scene: Scene, probe: Probe, rng: np.random.Generator) -> Probe | None:
    """Replaces the shape of one of the probe's objects by a shape that appears nowhere in the scene."""
    absent = [s for s in SHAPES if all(o.shape != s for o in scene.objects)]
    if not absent:
        return None
    shape = absent[int(rng.integers(len(absent)))]
    if rng.random() < 0.5:
        replaced = Probe(dataclasses.replace(probe.subject, shape=shape), probe.relation, probe.object)
    else:
        replaced = Probe(probe.subject, probe.relation, dataclasses.replace(probe.object, shape=shape))
    if probe_holds(scene, replaced, margin=0.0):
        return None
    return replaced


NEGATIVE_KINDS: tuple[str, ...] = ("attribute_swap", "relation_swap", "object_replace")
_NEGATIVE_FNS = {"attribute_swap": attribute_swap, "relation_swap": relation_swap, "object_replace": object_replace}


def sample_probe_and_negatives(scene: Scene, rng: np.random.Generator,
                               max_tries: int = 50) -> tuple[Probe, tuple[Probe, Probe, Probe]] | None:
    """A true probe and its three verified-false negatives (order: `NEGATIVE_KINDS`); None if none is found."""
    for _ in range(max_tries):
        probe = sample_probe(scene, rng)
        if probe is None:
            return None
        if not probe_holds(scene, probe):
            continue
        negatives = tuple(_NEGATIVE_FNS[kind](scene, probe, rng) for kind in NEGATIVE_KINDS)
        if all(n is not None for n in negatives):
            return probe, negatives  # type: ignore[return-value]
    return None


# ---------------------------------------------------------------------------------------------------------
# One example
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: comparing the image array is ambiguous
class Example:
    """Everything the embedded dataset stores about one image (the image itself as uint8 [H, W, 3])."""

    scene: Scene
    image: np.ndarray
    caption: str
    dense_caption: str
    probe: Probe
    negatives: tuple[Probe, Probe, Probe]

    @property
    def negative_captions(self) -> list[str]:
        return [n.text for n in self.negatives]


def make_example(rng: np.random.Generator, image_size: int = 64) -> Example:
    """Samples a scene that admits a probe with all three negatives, and derives all its annotations."""
    while True:
        scene = sample_scene(rng)
        probe_set = sample_probe_and_negatives(scene, rng)
        if probe_set is not None:
            break
    probe, negatives = probe_set
    return Example(
        scene=scene,
        image=render(scene, image_size),
        caption=short_caption(scene, rng),
        dense_caption=dense_caption(scene),
        probe=probe,
        negatives=negatives,
    )
