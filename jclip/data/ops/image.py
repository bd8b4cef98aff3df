"""Image ops (decode_image, crop_image, normalise_image) and the transforms under them.

`decode_image` checks raw input and decodes it to RGB; a bad image raises `BadExample` with its reason
(empty, undecodable, truncated, too large, extreme aspect ratio, unsupported), checking sizes from the
header before decoding pixels. `crop_image` is the evaluation centre crop, or in training with a scale
range torchvision's `RandomResizedCrop`; `normalise_image` maps to CLIP's normalised float32 space.

Evaluation preprocessing follows OpenAI CLIP's reference (`clip/clip.py::_transform`): bicubic resize of
the short side to the model's image size, centre crop, RGB, scale to [0, 1], normalise with CLIP's mean and
std. For RGB (and greyscale) inputs the result equals OpenAI's bit for bit (tests/data/ops/test_image.py).
Training may instead take torchvision's `RandomResizedCrop` (scale range from the config) on the same path.

JPEG draft mode (`data.jpeg_draft`, on by default): when the op after `decode_image` is `crop_image` and a JPEG
is at least twice as large as that crop needs, libjpeg decodes it already scaled by 1/2, 1/4 or 1/8 (DCT
scaling, PIL's `Image.draft`: about twice as fast from 512 px to 224 px, more from larger photos), and the
crop's bicubic resize does the rest. The draft never leaves fewer pixels than the crop needs
(`CropImage.source_fits`): no upsampling that the exact path would not do. The pixels differ slightly from
the exact decode (README, "Measured"); other formats, arrays, small JPEGs and the evaluation preprocessing
(`ImageTextPreprocessor`, for OpenAI's parity) are decoded exactly.

Colour modes are made RGB *before* resizing (OpenAI converts after the crop). That changes nothing for RGB
and greyscale, and is deliberately better elsewhere: OpenAI's order resizes palette images with nearest
neighbour (PIL forces it for mode P) and clips 16-bit images to white. See `to_rgb` for each mode.
"""

from __future__ import annotations

import dataclasses
import io
import math
import struct
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, JpegImagePlugin

from jclip.data.ops.registry import Op, OpContext, register_op
from jclip.data.robust import BadExample
from jclip.data.tokenizer import Tokenizer, make_tokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


WHITE = (255, 255, 255)
# Modes holding more than 8 bits per sample: PIL's `convert` would clip these instead of scaling them.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS)
DEFAULT_MAX_ASPECT_RATIO = 50.0  # short side 224 -> at most 224 x 11,200 after the resize
# What PIL raises on bad files besides OSError (which includes UnidentifiedImageError): its plugins use
# SyntaxError ("broken PNG file"), EOFError, struct.error, zlib.error, ValueError and IndexError.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, zlib.error)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: libjpeg's DCT scale factors that PIL's `draft` can ask for, largest first.
DRAFT_SCALES = (8, 4, 2)
#: torchvision's default aspect-ratio range of `RandomResizedCrop`.
DEFAULT_RATIO = (3 / 4, 4 / 3)
#: `(width, height) -> bool`: does a source of this size give the following crop all the pixels it needs?
SourceFits = Callable[[tuple[int, int]], bool]


def _sixteen_to_eight_bit(values: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255 by rounding v * 255 / 65535 (so 257 * k -> k exactly); out-of-range values clip."""
    values = np.clip(values.astype(np.int64), 0, 65535)
    return ((values * 255 + 32767) // 65535).astype(np.uint8)


def to_rgb(image: Image.Image, alpha_background: tuple[int, int, int] | None = WHITE) -> Image.Image:
    """An 8-bit RGB image of any PIL mode.

    - RGB, L, 1, CMYK, YCbCr, ...: PIL's `convert("RGB")` (what OpenAI CLIP does; CMYK uses PIL's
      naive inversion, no ICC colour management).
    - 16-bit greyscale (I;16*, and I, which older Pillow gives for 16-bit PNGs): scaled to 8 bits, not
      clipped (PIL's `convert` clips everything over 255 to white).
    - F (32-bit float): PIL's convention, values in 0..255, clipped and rounded.
    - Transparency (RGBA, LA, PA, P or L or RGB with a `transparency` entry): composited onto
      `alpha_background` (white by default: what a browser shows, and what a caption writer saw), so that
      the often arbitrary colour under fully transparent pixels (black in most logos) does not leak in.
      `alpha_background=None` drops the alpha channel instead, as OpenAI's `.convert("RGB")` does.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        grey = _sixteen_to_eight_bit(np.asarray(image))
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        grey = np.clip(np.rint(np.nan_to_num(np.asarray(image, np.float64))), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        if alpha_background is None:
            return rgba.convert("RGB")
        pixels = np.asarray(rgba, dtype=np.uint32)
        alpha = pixels[..., 3:]
        background = np.asarray(alpha_background, np.uint32)
        blended = (pixels[..., :3] * alpha + background * (255 - alpha) + 127) // 255
        return Image.fromarray(blended.astype(np.uint8), "RGB")
    return image.convert("RGB")


def array_to_pil(array: np.ndarray) -> Image.Image:
    """A PIL image of a uint8 (or uint16, scaled to 8 bits) array [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"an image array must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {array.shape}")
    if array.dtype == np.uint16:
        array = _sixteen_to_eight_bit(array)
    if array.dtype != np.uint8:
        raise ValueError(f"an image array must be uint8 (or uint16), got {array.dtype}")
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[array.shape[-1] if array.ndim == 3 else 2]
    return Image.fromarray(np.ascontiguousarray(array), mode)


def to_pil(image: Any, alpha_background: tuple[int, int, int] | None = WHITE) -> Image.Image:
    """An RGB PIL image from encoded bytes, a uint8 array [H, W(, C)] or a PIL image (modes as in `to_rgb`).

    Raises on bad input; `decode_image` wraps this with checks that turn bad input into counted skips.
    """
    if isinstance(image, Image.Image):
        pil = image
    elif isinstance(image, (bytes, bytearray, np.bytes_)):
        pil = Image.open(io.BytesIO(bytes(image)))
        pil.load()
    else:
        pil = array_to_pil(image)
    return to_rgb(pil, alpha_background)


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so the shorter side equals `size` (torchvision's rounding of the long side)."""
    width, height = image.size
    if min(width, height) == size:
        return image
    if width <= height:
        new_width, new_height = size, int(size * height / width)
    else:
        new_width, new_height = int(size * width / height), size
    return image.resize((new_width, new_height), Image.BICUBIC)


def centre_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision's `CenterCrop`: offsets `int(round((side - size) / 2))` (Python's round half to even)."""
    width, height = image.size
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def normalise(image: Image.Image) -> np.ndarray:
    """uint8 RGB -> float32 [H, W, 3] in CLIP's normalised space (torchvision `ToTensor` then `Normalize`)."""
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return (pixels - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def random_resized_crop(
    image: Image.Image,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float],
    ratio: tuple[float, float] = DEFAULT_RATIO,
) -> Image.Image:
    """torchvision's `RandomResizedCrop` (bicubic): a box of area fraction in `scale` and aspect ratio in
    `ratio` (log-uniform), resized to `size` x `size` (see `random_crop_box`)."""
    left, top, crop_w, crop_h = random_crop_box(*image.size, rng, scale, ratio)
    return image.resize((size, size), Image.BICUBIC, box=(left, top, left + crop_w, top + crop_h))


def random_crop_box(width: int, height: int, rng: np.random.Generator, scale: tuple[float, float],
                    ratio: tuple[float, float] = DEFAULT_RATIO) -> tuple[int, int, int, int]:
    """(left, top, width, height) of torchvision's `RandomResizedCrop` box in a `width` x `height` image.

    Ten tries to fit a box of area fraction in `scale` and log-uniform aspect ratio in `ratio`; failing that,
    torchvision's fallback: the whole image, centre-cropped to the nearest aspect ratio inside `ratio`.
    """
    area = width * height
    log_ratio = (np.log(ratio[0]), np.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(*log_ratio))
        crop_w = int(round(np.sqrt(target_area * aspect)))
        crop_h = int(round(np.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left = int(rng.integers(0, width - crop_w + 1))
            top = int(rng.integers(0, height - crop_h + 1))
            return left, top, crop_w, crop_h
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_w, crop_h = int(round(height * max(ratio))), height
    else:
        crop_w, crop_h = width, height
    return (width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h


def random_crop_min_sides(width: int, height: int, scale: tuple[float, float],
                          ratio: tuple[float, float] = DEFAULT_RATIO) -> tuple[int, int]:
    """Lower bounds on the (width, height) of every box `random_crop_box` can return for this image size.

    A tried box has area t >= scale[0] * W * H and aspect a in `ratio`, and is kept only when
    round(sqrt(t a)) <= W, i.e. sqrt(t a) < W + 1/2; so its height sqrt(t / a) is at least
    max(sqrt(t / ratio[1]), t / (W + 1/2)), and its width likewise. The fallback box is at least
    min(W, round(H ratio[1])) wide and min(H, round(W / ratio[0])) high. Rounding is monotone, so the floor of
    each bound bounds the integer sides.
    """
    smallest_area = scale[0] * width * height
    box_w = max(math.sqrt(smallest_area * ratio[0]), smallest_area / (height + 0.5))
    box_h = max(math.sqrt(smallest_area / ratio[1]), smallest_area / (width + 0.5))
    fallback_w = min(width, int(round(height * max(ratio))))
    fallback_h = min(height, int(round(width / min(ratio))))
    return min(math.floor(box_w), fallback_w), min(math.floor(box_h), fallback_h)


def draft_scale(source_size: tuple[int, int], fits: SourceFits) -> int:
    """The largest DCT scale k (8, 4, 2; else 1) whose whole k x k blocks, (W // k) x (H // k), still `fit`.

    Counting whole blocks only makes the test conservative (libjpeg keeps a partial last block as a pixel)
    and means a source must be at least k times what the crop needs in both dimensions.
    """
    width, height = source_size
    for scale in DRAFT_SCALES:
        if width // scale > 0 and height // scale > 0 and fits((width // scale, height // scale)):
            return scale
    return 1


def draft_jpeg(image: Image.Image, fits: SourceFits) -> int:
    """Asks libjpeg for a DCT-scaled decode of a just-opened (not loaded) JPEG, as small as `fits` allows;
    returns the scale.

    Requesting (W // k, H // k) makes PIL choose exactly k: W // (W // k) lies in [k, 2k - 1]. Anything
    that is not a JPEG, or that PIL cannot draft (several tiles), is left alone (scale 1).
    """
    if not isinstance(image, JpegImagePlugin.JpegImageFile):
        return 1
    scale = draft_scale(image.size, fits)
    if scale == 1:
        return 1
    width, height = image.size
    drafted = image.draft("RGB", (width // scale, height // scale))
    return 1 if drafted is None else scale


def _png_declares_empty(data: bytes) -> bool:
    """True for a PNG whose header declares zero width or height (PIL refuses to identify those)."""
    if not data.startswith(_PNG_SIGNATURE) or len(data) < 24 or data[12:16] != b"IHDR":
        return False
    width, height = struct.unpack(">II", data[16:24])
    return width == 0 or height == 0


def _decode_reason(error: BaseException) -> str:
    text = str(error).lower()
    return "truncated_image" if isinstance(error, EOFError) or "truncated" in text else "undecodable_image"


def _short(error: BaseException) -> str:
    if isinstance(error, Image.UnidentifiedImageError):
        return "not an image format PIL can identify"
    return f"{type(error).__name__}: {error}"[:200]


def decode_image(
    raw: Any,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO,
    alpha_background: tuple[int, int, int] | None = WHITE,
    draft_fits: SourceFits | None = None,
) -> Image.Image:
    """An RGB PIL image of raw image input (bytes, array or PIL image), or `BadExample` with the reason.

    The size checks read the header only (`Image.open` is lazy); the pixels are decoded afterwards. PIL's
    own bomb check (at 2 x `Image.MAX_IMAGE_PIXELS`) still applies first, also counted as `image_too_large`.
    With `draft_fits` (what the crop after this needs), JPEG bytes are decoded DCT-scaled where that still
    fits (`draft_jpeg`); the checks above use the full size either way.
    """
    if raw is None:
        raise BadExample("missing_image")
    if isinstance(raw, np.ndarray) and raw.dtype == object and raw.ndim == 0:
        raw = raw.item()
    if isinstance(raw, (bytes, bytearray, memoryview, np.bytes_)):
        data = bytes(raw)
        if not data:
            raise BadExample("empty_image", "zero bytes")
        if _png_declares_empty(data):
            raise BadExample("empty_image", "PNG header declares a zero size")
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as error:
            raise BadExample("image_too_large", _short(error)) from None
        except _DECODE_ERRORS as error:
            raise BadExample(_decode_reason(error), _short(error)) from None
        _check_size(image.size, max_pixels, max_aspect_ratio)
        if draft_fits is not None:
            draft_jpeg(image, draft_fits)
        try:
            image.load()
        except Image.DecompressionBombError as error:
            raise BadExample("image_too_large", _short(error)) from None
        except _DECODE_ERRORS as error:
            raise BadExample(_decode_reason(error), _short(error)) from None
    elif isinstance(raw, Image.Image):
        image = raw
        _check_size(image.size, max_pixels, max_aspect_ratio)
    elif isinstance(raw, (np.ndarray, list, tuple)):
        try:
            array = np.asarray(raw)
        except ValueError as error:  # ragged nested lists
            raise BadExample("unsupported_image", _short(error)) from None
        if array.size == 0:
            raise BadExample("empty_image", f"array of shape {array.shape}")
        try:
            image = array_to_pil(array)
        except (ValueError, TypeError) as error:
            raise BadExample("unsupported_image", _short(error)) from None
        _check_size(image.size, max_pixels, max_aspect_ratio)
    else:
        raise BadExample("unsupported_image", f"image of type {type(raw).__name__}")
    try:
        return to_rgb(image, alpha_background)
    except _DECODE_ERRORS as error:
        raise BadExample("unsupported_image", f"mode {image.mode}: {_short(error)}") from None


def _check_size(size: tuple[int, int], max_pixels: int | None, max_aspect_ratio: float | None) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise BadExample("empty_image", f"size {width}x{height}")
    if max_pixels is not None and width * height > max_pixels:
        raise BadExample("image_too_large", f"{width}x{height} = {width * height} pixels > max_pixels {max_pixels}")
    if max_aspect_ratio is not None and max(width, height) / min(width, height) > max_aspect_ratio:
        raise BadExample("extreme_aspect_ratio", f"{width}x{height} > max_aspect_ratio {max_aspect_ratio}")


@register_op("decode_image")
class DecodeImage(Op):
    """`field` (bytes, array or PIL image) -> a checked RGB PIL image in the same field.

    `draft` (default `data.jpeg_draft`): decode large JPEGs DCT-scaled for the crop that follows. Only when
    the next op that uses `field` says what it needs (`source_fits`, as `crop_image` does; `link` finds it),
    since any other op would see fewer pixels than it asked for.
    """

    def __init__(self, context: OpContext, field: str = "image", max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO,
                 alpha_background: tuple[int, int, int] | None = WHITE, draft: bool | None = None):
        self.reads = self.writes = (field,)
        self.field = field
        self.max_pixels = max_pixels
        self.max_aspect_ratio = max_aspect_ratio
        self.alpha_background = None if alpha_background is None else tuple(alpha_background)
        self.draft = bool(context.jpeg_draft if draft is None else draft)
        self.draft_fits: SourceFits | None = None

    def link(self, later_ops: Sequence[Any]) -> None:
        """Takes the draft's size test from the next op that reads or writes `field`, if it has one."""
        for op in later_ops:
            if self.field in tuple(op.reads) + tuple(op.writes):
                fits = getattr(op, "source_fits", None)
                self.draft_fits = fits if self.draft and callable(fits) else None
                return

    def __call__(self, example: dict[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
        image = decode_image(example.get(self.field), max_pixels=self.max_pixels,
                             max_aspect_ratio=self.max_aspect_ratio, alpha_background=self.alpha_background,
                             draft_fits=self.draft_fits)
        return {**example, self.field: image}


@register_op("crop_image")
class CropImage(Op):
    """An RGB PIL image -> `size` x `size` (default: the model's image size).

    With a `scale` range (default: `data.random_crop_scale`) and an rng (training), torchvision's
    RandomResizedCrop; otherwise the evaluation crop: bicubic resize of the short side, centre crop.
    """

    def __init__(self, context: OpContext, field: str = "image", size: int | None = None,
                 scale: tuple[float, float] | None = None):
        self.reads = self.writes = (field,)
        self.field = field
        self.size = int(context.image_size if size is None else size)
        scale = context.random_crop_scale if scale is None else scale
        if scale is not None and (len(scale) != 2 or not 0 < float(scale[0]) <= float(scale[1]) <= 1):
            raise ValueError(f"scale must be (low, high) with 0 < low <= high <= 1, got {scale!r}")
        self.scale = None if scale is None else tuple(scale)

    def source_fits(self, source_size: tuple[int, int]) -> bool:
        """Whether an image of `source_size` gives this crop at least `size` pixels on every side of its box:
        the short side for the centre crop, and with a `scale` also every random-resized box (bounds from
        `random_crop_min_sides`). A JPEG draft (`decode_image`) must leave this true."""
        width, height = source_size
        if min(width, height) < self.size:
            return False
        if self.scale is None:
            return True
        return min(random_crop_min_sides(width, height, self.scale)) >= self.size

    def __call__(self, example: dict[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
        image = example[self.field]
        if self.scale is not None and rng is not None:
            image = random_resized_crop(image, self.size, rng, self.scale)
        else:
            image = centre_crop(resize_short_side(image, self.size), self.size)
        return {**example, self.field: image}


@register_op("normalise_image")
class NormaliseImage(Op):
    """An RGB PIL image in `field` -> float32 [H, W, 3] in CLIP's normalised space, in `out`."""

    def __init__(self, context: OpContext, field: str = "image", out: str = "images"):
        self.reads, self.writes, self.consumes = (field,), (out,), (field,)
        self.field, self.out = field, out

    def __call__(self, example: dict[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
        out = {key: value for key, value in example.items() if key != self.field}
        out[self.out] = normalise(example[self.field])
        return out


@dataclasses.dataclass(frozen=True)
class ImageTextPreprocessor:
    """The evaluators' fixed preprocessing: a raw example {image, caption, ...} -> {images, token_ids, ...}.

    `random_crop_scale` None gives the deterministic evaluation preprocessing; otherwise a random-resized
    crop with that area range (pass an `rng`). Keys listed in `keep` pass through. `alpha_background`: see
    `to_rgb`. Raises on bad input (evaluations never skip examples); training uses the op chain instead.
    """

    image_size: int
    context_length: int
    image_key: str = "image"
    text_key: str = "caption"
    random_crop_scale: tuple[float, float] | None = None
    keep: tuple[str, ...] = ()
    alpha_background: tuple[int, int, int] | None = WHITE
    tokenizer_spec: str = "clip"  # or "sentencepiece:/path/to/model.model" (see jclip.data.tokenizer)

    @property
    def tokenizer(self) -> Tokenizer:
        return make_tokenizer(self.tokenizer_spec, self.context_length)

    def image(self, raw: Any, rng: np.random.Generator | None = None) -> np.ndarray:
        pil = to_pil(raw, self.alpha_background)
        if self.random_crop_scale is not None and rng is not None:
            pil = random_resized_crop(pil, self.image_size, rng, tuple(self.random_crop_scale))
        else:
            pil = centre_crop(resize_short_side(pil, self.image_size), self.image_size)
        return normalise(pil)

    def text(self, raw: Any) -> np.ndarray:
        if isinstance(raw, (bytes, np.bytes_)):
            raw = bytes(raw).decode("utf-8")
        return self.tokenizer(str(raw))

    def __call__(self, example: dict[str, Any], rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        out = {"images": self.image(example[self.image_key], rng), "token_ids": self.text(example[self.text_key])}
        for key in self.keep:
            out[key] = np.asarray(example[key])
        return out

