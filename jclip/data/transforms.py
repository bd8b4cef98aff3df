"""Image and text transforms of the input pipeline: CLIP's evaluation preprocessing and training crops.

Evaluation preprocessing follows OpenAI CLIP's reference: bicubic resize of the short side to the
model's image size, centre crop, scale to [0, 1], normalise with CLIP's mean and std. Training may
instead take a random-resized crop (scale range from the config) on the same path.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np
from PIL import Image

from jclip.data.tokenizer import ClipTokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_pil(image: Any) -> Image.Image:
    """An RGB PIL image from encoded bytes, a uint8 array [H, W, C] or a PIL image."""
    if isinstance(image, Image.Image):
        pil = image
    elif isinstance(image, (bytes, bytearray, np.bytes_)):
        pil = Image.open(io.BytesIO(bytes(image)))
        pil.load()
    else:
        array = np.asarray(image)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        pil = Image.fromarray(array)
    return pil if pil.mode == "RGB" else pil.convert("RGB")


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
    width, height = image.size
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def normalise(image: Image.Image) -> np.ndarray:
    """uint8 RGB -> float32 [H, W, 3] in CLIP's normalised space."""
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return (pixels - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def random_resized_crop(
    image: Image.Image, size: int, rng: np.random.Generator, scale: tuple[float, float], ratio=(3 / 4, 4 / 3)
) -> Image.Image:
    """Inception-style crop: random area fraction in `scale` and aspect ratio in `ratio`, resized bicubically."""
    width, height = image.size
    area = width * height
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        crop_w = int(round(np.sqrt(target_area * aspect)))
        crop_h = int(round(np.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left = int(rng.integers(0, width - crop_w + 1))
            top = int(rng.integers(0, height - crop_h + 1))
            return image.resize((size, size), Image.BICUBIC, box=(left, top, left + crop_w, top + crop_h))
    return centre_crop(resize_short_side(image, size), size)


@dataclasses.dataclass(frozen=True)
class ImageTextPreprocessor:
    """Maps a raw example {image, caption, ...} to model inputs {images, token_ids, ...}.

    `random_crop_scale` None gives the deterministic evaluation preprocessing; otherwise training uses a
    random-resized crop with that area range (pass an `rng`). Keys listed in `keep` pass through.
    """

    image_size: int
    context_length: int
    image_key: str = "image"
    text_key: str = "caption"
    random_crop_scale: tuple[float, float] | None = None
    keep: tuple[str, ...] = ()

    def image(self, raw: Any, rng: np.random.Generator | None = None) -> np.ndarray:
        pil = to_pil(raw)
        if self.random_crop_scale is not None and rng is not None:
            pil = random_resized_crop(pil, self.image_size, rng, tuple(self.random_crop_scale))
        else:
            pil = centre_crop(resize_short_side(pil, self.image_size), self.image_size)
        return normalise(pil)

    def text(self, raw: Any) -> np.ndarray:
        if isinstance(raw, (bytes, np.bytes_)):
            raw = bytes(raw).decode("utf-8")
        return _tokenizer(self.context_length)(str(raw))

    def __call__(self, example: dict[str, Any], rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        out = {"images": self.image(example[self.image_key], rng), "token_ids": self.text(example[self.text_key])}
        for key in self.keep:
            out[key] = np.asarray(example[key])
        return out


_TOKENIZERS: dict[int, ClipTokenizer] = {}


def _tokenizer(context_length: int) -> ClipTokenizer:
    if context_length not in _TOKENIZERS:
        _TOKENIZERS[context_length] = ClipTokenizer(context_length)
    return _TOKENIZERS[context_length]
