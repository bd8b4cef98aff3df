"""Image transforms: evaluation preprocessing against OpenAI CLIP's reference, written out independently
here (torchvision is not installed), on real CIFAR-10 photos and a synthetic image; colour modes; the
random-resized crop read back from an image whose pixel values encode their coordinates."""

from __future__ import annotations

import io
import pathlib
import tarfile

import numpy as np
import pytest
from PIL import Image

from jclip.data.ops import image as image_ops

N_PX = 224
OPENAI_MEAN = np.asarray((0.48145466, 0.4578275, 0.40821073), np.float32)
OPENAI_STD = np.asarray((0.26862954, 0.26130258, 0.27577711), np.float32)


def openai_reference(image: Image.Image, n_px: int = N_PX) -> np.ndarray:
    """OpenAI CLIP's `_transform(n_px)`, [H, W, C]: Resize(n_px, BICUBIC), CenterCrop(n_px), RGB, ToTensor,
    Normalize — with torchvision's size arithmetic for PIL images."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    if short != n_px:  # torchvision: the long side is int(n_px * long / short), no rounding
        new_long = int(n_px * long / short)
        image = image.resize((n_px, new_long) if width <= height else (new_long, n_px), Image.BICUBIC)
    width, height = image.size
    top, left = int(round((height - n_px) / 2.0)), int(round((width - n_px) / 2.0))
    image = image.crop((left, top, left + n_px, top + n_px)).convert("RGB")
    tensor = np.asarray(image).astype(np.float32) / np.float32(255)  # ToTensor: uint8 -> float32 / 255
    return (tensor - OPENAI_MEAN) / OPENAI_STD  # Normalize: sub_(mean).div_(std) in float32


def jclip_eval(raw) -> np.ndarray:
    return image_ops.ImageTextPreprocessor(image_size=N_PX, context_length=77).image(raw)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def assert_parity(encoded: bytes) -> float:
    reference = openai_reference(Image.open(io.BytesIO(encoded)))
    ours = jclip_eval(encoded)
    assert ours.shape == reference.shape == (N_PX, N_PX, 3) and ours.dtype == np.float32
    error = float(np.max(np.abs(ours - reference)))
    assert error <= 1e-6, error
    return error


@pytest.fixture(scope="module")
def cifar_jpegs(shared_dir: pathlib.Path) -> list[bytes]:
    """The first three JPEGs (32x32 real photos) of ../shared/data/cifar10/cifar10-train.tar.gz."""
    path = shared_dir / "data" / "cifar10" / "cifar10-train.tar.gz"
    if not path.is_file():
        pytest.skip(f"{path} is absent (real photos for the parity test live in ../shared/data)")
    jpegs = []
    with tarfile.open(path, "r:gz") as archive:
        for member in archive:
            if member.isfile() and member.name.endswith(".jpg"):
                jpegs.append(archive.extractfile(member).read())
                if len(jpegs) == 3:
                    break
    return jpegs


def test_parity_with_openai_on_a_real_photo_upscaled(cifar_jpegs):
    photo = Image.open(io.BytesIO(cifar_jpegs[0]))
    assert photo.size == (32, 32) and photo.mode == "RGB"
    assert_parity(cifar_jpegs[0])  # the JPEG bytes themselves: decoding is part of the path


def test_parity_with_openai_on_non_square_real_photos(cifar_jpegs):
    photos = [np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")) for jpeg in cifar_jpegs]
    side_by_side = np.concatenate(photos[:2], axis=1)  # 32 x 64: resize to 224 x 448, crop offset 112
    assert side_by_side.shape == (32, 64, 3)
    assert_parity(png_bytes(Image.fromarray(side_by_side)))
    # 63 x 32 (tall, odd): resize to 441 x 224, crop offset round(108.5) = 108 (round half to even).
    stacked = np.concatenate(photos[1:], axis=0)[:63]
    assert_parity(png_bytes(Image.fromarray(stacked)))
    # Greyscale: OpenAI resizes in L and converts after the crop, jclip converts first: same pixels.
    assert_parity(png_bytes(Image.fromarray(side_by_side).convert("L")))


@pytest.mark.parametrize("size", [(101, 37), (517, 300), (224, 300)])  # (W, H): up, down, already 224
def test_parity_with_openai_on_a_synthetic_gradient(size):
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x * y) % 256], axis=-1).astype(np.uint8)
    assert_parity(png_bytes(Image.fromarray(rgb)))


def test_sixteen_bit_and_float_images_scale_instead_of_clipping():
    values = np.arange(256, dtype=np.uint16).reshape(16, 16) * 257
    for image in (Image.fromarray(values), Image.fromarray(values.astype(np.int32))):  # I;16 and I
        assert image.mode in ("I;16", "I")
        rgb = np.asarray(image_ops.to_rgb(image))
        np.testing.assert_array_equal(rgb[..., 0], np.arange(256).reshape(16, 16))
        np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
    floats = Image.fromarray(np.asarray([[-5.0, 0.4, 127.6, 300.0]], np.float32))
    np.testing.assert_array_equal(np.asarray(image_ops.to_rgb(floats))[0, :, 1], [0, 0, 128, 255])


def test_alpha_is_composited_onto_white_or_dropped():
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, :, 0] = 200  # red everywhere, alpha 0, 255, 128
    rgba[0, :, 3] = [0, 255, 128]
    image = Image.fromarray(rgba, "RGBA")
    onto_white = [[255, 255, 255], [200, 0, 0], [227, 127, 127]]
    np.testing.assert_array_equal(np.asarray(image_ops.to_rgb(image))[0], onto_white)
    np.testing.assert_array_equal(np.asarray(image_ops.to_rgb(image, None))[0], [[200, 0, 0]] * 3)
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0  # palette index 0 is transparent
    np.testing.assert_array_equal(np.asarray(image_ops.to_rgb(palette))[0], [[255, 255, 255], [10, 20, 30]])


def coordinate_image(width: int, height: int) -> Image.Image:
    """Red = x, green = y (one level per pixel): bicubic resampling reproduces such ramps, so the crop box
    can be read back from the output's interior pixels."""
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], axis=-1).astype(np.uint8))


def crop_box_from_output(output: np.ndarray, inner: int = 8) -> tuple[float, float, float, float]:
    """(left, top, width, height) of the source box resampled into `output` [S, S, 3]: output column i
    samples source coordinate left + (i + 0.5) * width / S, where source pixel x holds value x at x + 0.5."""
    size = output.shape[0]
    a, b = inner, size - 1 - inner

    def axis(values: np.ndarray) -> tuple[float, float]:
        extent = (values[b] - values[a]) * size / (b - a)
        start = values[a] + 0.5 - (a + 0.5) * extent / size
        return float(start), float(extent)

    left, width = axis(output[:, :, 0].astype(np.float64).mean(axis=0))
    top, height = axis(output[:, :, 1].astype(np.float64).mean(axis=1))
    return left, top, width, height


def test_random_resized_crop_size_determinism_and_area_range():
    width, height, size, scale, ratio = 160, 128, 64, (0.3, 0.6), (3 / 4, 4 / 3)
    image = coordinate_image(width, height)
    areas = []
    for seed in range(40):
        crop = image_ops.random_resized_crop(image, size, np.random.default_rng(seed), scale, ratio)
        assert crop.size == (size, size) and crop.mode == "RGB"
        again = image_ops.random_resized_crop(image, size, np.random.default_rng(seed), scale, ratio)
        np.testing.assert_array_equal(np.asarray(crop), np.asarray(again))
        left, top, crop_w, crop_h = crop_box_from_output(np.asarray(crop))
        assert -1.5 <= left and left + crop_w <= width + 1.5 and -1.5 <= top and top + crop_h <= height + 1.5
        areas.append(crop_w * crop_h / (width * height))
        assert ratio[0] - 0.05 <= crop_w / crop_h <= ratio[1] + 0.05
    assert scale[0] - 0.03 <= min(areas) and max(areas) <= scale[1] + 0.03, (min(areas), max(areas))
    assert min(areas) < 0.4 and max(areas) > 0.5, "areas should spread over the scale range"
    first, second = (image_ops.random_resized_crop(image, size, np.random.default_rng(s), scale) for s in (0, 1))
    assert not np.array_equal(np.asarray(first), np.asarray(second))


def test_random_resized_crop_falls_back_to_torchvision_centre_crop():
    image = coordinate_image(250, 25)  # no box of >= 90% area fits the aspect range: torchvision's fallback
    crop = image_ops.random_resized_crop(image, 64, np.random.default_rng(0), (0.9, 1.0))
    left, top, crop_w, crop_h = crop_box_from_output(np.asarray(crop))
    expected_w = round(25 * 4 / 3)  # the whole height, at the widest allowed ratio, centred
    assert abs(crop_w - expected_w) < 1.5 and abs(left - (250 - expected_w) // 2) < 1.0
    assert abs(crop_h - 25) < 1.5 and abs(top) < 1.0
