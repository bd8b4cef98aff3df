"""Image and text transforms of the input pipeline: CLIP's evaluation preprocessing and training crops.

Evaluation preprocessing follows OpenAI CLIP's reference (`clip/clip.py::_transform`): bicubic resize of
the short side to the model's image size, centre crop, RGB, scale to [0, 1], normalise with CLIP's mean and
std. For RGB (and greyscale) inputs the result equals OpenAI's bit for bit (tests/data/test_transforms.py).
Training may instead take torchvision's `RandomResizedCrop` (scale range from the config) on the same path.

Colour modes are made RGB *before* resizing (OpenAI converts after the crop). That changes nothing for RGB
and greyscale, and is deliberately better elsewhere: OpenAI's order resizes palette images with nearest
neighbour (PIL forces it for mode P) and clips 16-bit images to white. See `to_rgb` for each mode.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np
from PIL import Image

from jclip.data.tokenizer import Tokenizer, make_tokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


WHITE = (255, 255, 255)
# Modes holding more than 8 bits per sample: PIL's `convert` would clip these instead of scaling them.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


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

    Raises on bad input; `jclip.data.robust` wraps this with checks that turn bad input into counted skips.
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
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Image.Image:
    """torchvision's `RandomResizedCrop` (bicubic): a box of area fraction in `scale` and aspect ratio in
    `ratio` (log-uniform), resized to `size` x `size`.

    Ten tries to fit such a box; failing that, torchvision's fallback: the whole image, centre-cropped to
    the nearest aspect ratio inside `ratio`.
    """
    width, height = image.size
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
            return image.resize((size, size), Image.BICUBIC, box=(left, top, left + crop_w, top + crop_h))
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_w, crop_h = int(round(height * max(ratio))), height
    else:
        crop_w, crop_h = width, height
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return image.resize((size, size), Image.BICUBIC, box=(left, top, left + crop_w, top + crop_h))


@dataclasses.dataclass(frozen=True)
class ImageTextPreprocessor:
    """Maps a raw example {image, caption, ...} to model inputs {images, token_ids, ...}.

    `random_crop_scale` None gives the deterministic evaluation preprocessing; otherwise training uses a
    random-resized crop with that area range (pass an `rng`). Keys listed in `keep` pass through.
    `alpha_background`: see `to_rgb`. Raises on bad input: wrap in `jclip.data.robust.SafePreprocessor`
    to skip and count bad examples instead.
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

