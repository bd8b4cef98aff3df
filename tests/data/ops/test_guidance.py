"""Precomputed guidance features (jclip.data.ops.guidance): every training row carries its own example's
features, looked up by key; a missing key, a malformed folder or a config that cannot use them is refused."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
from PIL import Image

from configs import softclip
from jclip.config_validation import validate_config
from jclip.errors import ConfigError
from jclip.data import configured
from jclip.data.ops import guidance
from jclip.data.pipeline import HostShard
from jclip.data.tokenizer import ClipTokenizer

COUNT = 12


def grey_level(index: int) -> int:
    return 20 * index


def write_folder(root) -> str:
    """COUNT solid-grey images, image i at grey level 20·i captioned 'photo number i'."""
    entries = []
    for i in range(COUNT):
        buffer = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), grey_level(i), np.uint8)).save(buffer, format="PNG")
        (root / f"{i}.png").write_bytes(buffer.getvalue())
        entries.append({"path": f"{i}.png", "caption": f"photo number {i}"})
    (root / "captions.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    return f"folder:{root / 'captions.jsonl'}"


def features_of(index: int) -> tuple[np.ndarray, np.ndarray]:
    """Guidance rows that name their example: image [i, 2i, 3i], text [−i, 1]."""
    return np.array([index, 2 * index, 3 * index], np.float32), np.array([-index, 1], np.float32)


def write_features(directory, indices=range(COUNT)):
    indices = list(indices)
    image = np.stack([features_of(i)[0] for i in indices])
    text = np.stack([features_of(i)[1] for i in indices])
    return guidance.write_guidance_features(directory, [f"{i}.png" for i in indices], image=image, text=text)


def softclip_config(source: str, features_dir) -> object:
    config = softclip.get_config()
    config.data.source = source
    config.data.batch_size = 8
    config.data.num_threads = 1
    config.data.guidance_features = str(features_dir)
    config.losses.softclip.guidance = "batch"
    return config


def test_training_rows_carry_their_own_examples_features(tmp_path):
    (tmp_path / "images").mkdir()
    config = softclip_config(write_folder(tmp_path / "images"), write_features(tmp_path / "guidance"))
    validate_config(config)
    data = configured.ConfiguredData(config.data, config.model)
    data.prepare(set())
    tokenizer = ClipTokenizer(config.model.text.context_length)
    captions = {i: tokenizer(f"photo number {i}") for i in range(COUNT)}
    iterator = iter(data.training_dataset(seed=0, shard=HostShard(0, 1)))
    seen = set()
    for _ in range(4):
        batch = next(iterator)
        assert batch["guidance_image_features"].shape == (8, 3) and batch["guidance_image_features"].dtype == np.float32
        for row in range(8):
            # Which example the row is: from its caption's tokens, and independently from its pixels.
            (index,) = [i for i, tokens in captions.items() if np.array_equal(tokens, batch["token_ids"][row])]
            pixel = batch["images"][row].mean()
            levels = [abs(pixel - normalised_grey(i)) for i in range(COUNT)]
            assert int(np.argmin(levels)) == index
            image_expected, text_expected = features_of(index)
            np.testing.assert_array_equal(batch["guidance_image_features"][row], image_expected)
            np.testing.assert_array_equal(batch["guidance_text_features"][row], text_expected)
            seen.add(index)
    assert seen == set(range(COUNT))


def normalised_grey(index: int) -> float:
    """The mean of a preprocessed solid-grey image (CLIP's per-channel normalisation, averaged)."""
    from jclip.data.ops import image as image_ops

    return float(image_ops.normalise(Image.fromarray(np.full((4, 4, 3), grey_level(index), np.uint8))).mean())


def test_an_example_without_features_stops_the_run_naming_its_key(tmp_path):
    (tmp_path / "images").mkdir()
    config = softclip_config(write_folder(tmp_path / "images"), write_features(tmp_path / "guidance", range(COUNT - 1)))
    data = configured.ConfiguredData(config.data, config.model)
    iterator = iter(data.training_dataset(seed=0, shard=HostShard(0, 1)))
    with pytest.raises(Exception, match=r"'11.png' has no guidance features"):
        for _ in range(5):  # 12 examples, batches of 8: example 11 is read within two epochs
            next(iterator)


def test_folder_round_trip_lookup_and_pickling(tmp_path):
    directory = write_features(tmp_path / "g")
    features = guidance.GuidanceFeatures(directory)
    assert len(features) == COUNT and features.modalities == ("image", "text")
    got = features.lookup("5.png")
    np.testing.assert_array_equal(got["guidance_image_features"], features_of(5)[0])
    np.testing.assert_array_equal(got["guidance_text_features"], features_of(5)[1])
    clone = pickle.loads(pickle.dumps(features))  # Grain worker processes
    np.testing.assert_array_equal(clone.lookup("5.png")["guidance_text_features"], features_of(5)[1])
    with pytest.raises(guidance.MissingGuidanceError, match="'nope' has no guidance"):
        features.lookup("nope")

    image_only = guidance.write_guidance_features(tmp_path / "i", ["a", "b"], image=np.ones((2, 4), np.float32))
    assert guidance.GuidanceFeatures(image_only).lookup("b").keys() == {"guidance_image_features"}


@pytest.mark.parametrize(
    "keys, arrays, message",
    [
        (["a", "b"], {}, "give image and/or text"),
        (["a", "a"], {"image": np.ones((2, 3))}, "duplicate keys"),
        (["a", "b"], {"image": np.ones((3, 3))}, r"image must be \[2, dim\]"),
        (["a", "b"], {"text": np.ones(2)}, r"text must be \[2, dim\]"),
        (["a", "b"], {"image": np.ones((2, 3), np.int32)}, "floating point"),
    ],
)
def test_malformed_features_are_refused(tmp_path, keys, arrays, message):
    with pytest.raises(ValueError, match=message):
        guidance.write_guidance_features(tmp_path, keys, **arrays)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no keys.npy"):
        guidance.GuidanceFeatures(tmp_path / "absent")


def test_config_pairs_batch_guidance_with_features(tmp_path):
    config = softclip.get_config()
    config.losses.softclip.guidance = "batch"
    with pytest.raises(ConfigError, match="losses: term 'softclip' reads the batch field 'guidance_image_features', "
                                          "which no preprocessing op writes"):
        validate_config(config)
    config.data.guidance_features = str(tmp_path)
    validate_config(config)  # the shorthand appends the guidance op, which writes both fields
    config = softclip.get_config()
    config.data.guidance_features = str(tmp_path)
    with pytest.raises(ConfigError, match=r"the preprocessing writes \['guidance_image_features', "
                                          r"'guidance_text_features'\] \(guidance\), which no loss term or tower reads"):
        validate_config(config)


def test_guidance_is_written_only_for_random_access_training_data(tmp_path):
    (tmp_path / "images").mkdir()
    config = softclip.get_config()
    config.data.mixture = {"folder": {"source": write_folder(tmp_path / "images")},
                           "shards": {"source": f"wds:{tmp_path}/shard-{{0..1}}.tar"}}
    data = configured.ConfiguredData(config.data, config.model)
    with pytest.raises(ValueError, match=r"'shards' \(wds:.*\) is a stream without random access"):
        data.random_access_training_sources()
    config.data.mixture = {}
    config.data.source = write_folder(tmp_path / "images")
    ((name, raw),) = configured.ConfiguredData(config.data, config.model).random_access_training_sources()
    assert name == "main" and sorted(raw[i]["key"] for i in range(len(raw))) == sorted(f"{i}.png" for i in range(COUNT))
