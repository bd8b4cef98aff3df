"""The evaluators end to end on a micro model: sharded (8 devices) equals one device, and each metric equals
an independent reference built from per-example embeddings (no batching, padding, masking or gathering)
and plain NumPy loops."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from jclip import evals, parallel
from jclip.data import configured
from jclip.data.ops import image as image_ops
from jclip.data.tokenizer import make_tokenizer
from jclip.evals import common
from jclip.build import TrainSetup
from jclip_testing import micro_config


@pytest.fixture(scope="module")
def model(scenes_data_dir):
    config = micro_config(**{"model.text.vocab_size": 49408, "data.embedded_config": "small",
                             "data.data_dir": str(scenes_data_dir)})
    sharded = TrainSetup.create(config, parallel.make_mesh({"data": -1}))
    single = TrainSetup.create(config, parallel.make_mesh({"data": 1}, devices=jax.devices()[:1]))
    params = jax.device_get(sharded.init_state()["params"])
    return config, params, sharded, single


def evaluator(config, name, **options):
    entry = ml_collections.ConfigDict(options)
    data = configured.ConfiguredData(config.data, config.model)
    return evals.EVALUATORS[entry.get("type") or name](name, entry, data)


def reference_image_embeddings(config, setup, params, raw_images):
    pre = image_ops.ImageTextPreprocessor(config.model.vision.image_size, config.model.text.context_length)
    encode = jax.jit(setup.functions.encode_images)
    return np.concatenate([np.asarray(encode(params, pre.image(raw)[None])) for raw in raw_images]).astype(np.float64)


def reference_text_embeddings(config, setup, params, texts):
    tokenizer = make_tokenizer("clip", config.model.text.context_length)
    encode = jax.jit(setup.functions.encode_texts)
    return np.concatenate([np.asarray(encode(params, tokenizer(t)[None])) for t in texts]).astype(np.float64)


def pessimistic_rank(scores, true):
    """Loop: how many false candidates score at least as high as the best true one."""
    best = max(s for s, t in zip(scores, true) if t)
    return sum(1 for s, t in zip(scores, true) if not t and s >= best)


def write_png(path: pathlib.Path, seed: int, size=(20, 20)) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, size=(*size, 3), dtype=np.uint8)).save(path)


@pytest.mark.parametrize("name, options", [
    ("retrieval", {"split": "validation", "limit": 37, "batch_size": 16}),
    ("zeroshot", {"split": "validation", "limit": 37, "batch_size": 16, "templates": "scenes"}),
])
def test_sharded_equals_single_device(model, name, options):
    config, params, sharded, single = model
    on_eight = evaluator(config, name, **options).run(params, sharded.encoders())
    on_one = evaluator(config, name, **options).run(params, single.encoders())
    assert on_eight.keys() == on_one.keys()
    count = on_eight.get("num_images", on_eight.get("num_items"))
    assert count == 37  # padding (to 48) dropped, nothing lost
    for key in on_eight:
        assert on_eight[key] == pytest.approx(on_one[key], abs=1e-9), key


def test_compositional_scores_sharded_equal_single_device(model):
    # An untrained model scores a probe and its word-swapped negative almost equally, so float rounding
    # may flip a near-tie in the accuracy: compare the scores themselves.
    config, params, sharded, single = model
    options = {"format": "embedded", "split": "validation", "limit": 13, "batch_size": 16}
    on_eight = evaluator(config, "compositional", **options).scores(params, sharded.encoders())
    on_one = evaluator(config, "compositional", **options).scores(params, single.encoders())
    assert on_eight[0].shape == (13 * 3,) and on_eight[1].shape == (13 * 3, 1)
    for eight, one in zip(on_eight, on_one):
        np.testing.assert_allclose(eight, one, atol=2e-6)


def test_sharded_embeddings_equal_single_device_in_split_order(model):
    config, params, sharded, single = model
    data = configured.ConfiguredData(config.data, config.model)
    source = data.source("validation")
    preprocess = common.ImagesOnly(data.eval_preprocess(), keep=("label",))
    on_eight = common.embed_split(params, sharded.encoders(), source, preprocess, batch_size=16, limit=37, extra_keys=("label",))
    on_one = common.embed_split(params, single.encoders(), source, preprocess, batch_size=16, limit=37, extra_keys=("label",))
    np.testing.assert_array_equal(on_eight["index"], np.arange(37))
    np.testing.assert_array_equal(on_one["index"], np.arange(37))
    labels = [source[i]["label"] for i in range(37)]
    np.testing.assert_array_equal(on_eight["label"], labels)  # extra keys follow their rows
    np.testing.assert_allclose(on_eight["image_embeddings"], on_one["image_embeddings"], atol=2e-6)
    # And both equal the per-example reference (no batching at all).
    reference = reference_image_embeddings(config, sharded, params, [source[i]["image"] for i in range(37)])
    np.testing.assert_allclose(on_eight["image_embeddings"], reference, atol=2e-6)
    texts = [f"text number {i}" for i in range(21)]  # 21 prompts: padded to 32 over 8 devices
    np.testing.assert_allclose(
        common.embed_texts(params, sharded.encoders(), texts, batch_size=16),
        reference_text_embeddings(config, sharded, params, texts), atol=2e-6,
    )


def test_retrieval_with_several_captions_matches_reference(model, tmp_path):
    config, params, sharded, _ = model
    captions = [["a red cat"], ["a dog", "two dogs", "a brown dog"], ["a boat"], ["a car", "a red car"],
                ["a tree", "green leaves"], ["a house"]]
    lines = []
    for i, caps in enumerate(captions):
        write_png(tmp_path / f"{i}.png", seed=i)
        lines.append(json.dumps({"path": f"{i}.png", "caption": caps}))
    (tmp_path / "captions.jsonl").write_text("\n".join(lines))
    config.data.source = f"folder:{tmp_path / 'captions.jsonl'}"
    # 6 images with batch 8 over 8 devices: two padding rows per pass.
    result = evaluator(config, "retrieval", split="test", batch_size=8, ks=(1, 2, 3)).run(params, sharded.encoders())

    images = reference_image_embeddings(config, sharded, params, [(tmp_path / f"{i}.png").read_bytes() for i in range(6)])
    flat = [c for caps in captions for c in caps]
    owner = [i for i, caps in enumerate(captions) for _ in caps]
    texts = reference_text_embeddings(config, sharded, params, flat)
    similarity = images @ texts.T
    for k in (1, 2, 3):
        i2t = np.mean([pessimistic_rank(similarity[i], [o == i for o in owner]) < k for i in range(6)])
        t2i = np.mean([pessimistic_rank(similarity[:, t], [i == owner[t] for i in range(6)]) < k for t in range(len(flat))])
        assert result[f"image_to_text_R@{k}"] == pytest.approx(i2t)
        assert result[f"text_to_image_R@{k}"] == pytest.approx(t2i)
    assert result["num_images"] == 6 and result["num_captions"] == len(flat)


def test_zero_shot_matches_reference(model, tmp_path):
    config, params, sharded, _ = model
    classes = ["cat", "dog", "sea_lion"]
    files = []
    for c, name in enumerate(classes):
        for j in range(3):
            write_png(tmp_path / "images" / name / f"{j}.png", seed=10 * c + j)
            files.append((tmp_path / "images" / name / f"{j}.png", c))
    config.data.source = f"classfolders:{tmp_path / 'images'}"
    templates = ["a photo of a {}.", "a {} again."]
    result = evaluator(config, "zeroshot", split="test", batch_size=8, templates=templates).run(params, sharded.encoders())

    images = reference_image_embeddings(config, sharded, params, [f.read_bytes() for f, _ in files])
    classifier = []
    for name in ["cat", "dog", "sea lion"]:
        prompts = reference_text_embeddings(config, sharded, params, [t.format(name) for t in templates])
        mean = sum(p / np.linalg.norm(p) for p in prompts) / len(prompts)
        classifier.append(mean / np.linalg.norm(mean))
    logits = images @ np.array(classifier).T
    correct = [pessimistic_rank(logits[i], [c == label for c in range(3)]) == 0 for i, (_, label) in enumerate(files)]
    assert result["top1"] == pytest.approx(np.mean(correct))
    assert result["num_classes"] == 3 and result["num_images"] == 9

    # Class names from a file replace the folder names (same order as the labels).
    names_file = tmp_path / "names.txt"
    names_file.write_text("kitten\npuppy\nseal\n")
    renamed = evaluator(config, "zeroshot", split="test", batch_size=8, templates=templates, class_names=str(names_file))
    assert renamed.prompts[0] == "a photo of a kitten." and len(renamed.prompts) == 6


def test_sugarcrepe_layout_per_category_matches_reference(model, tmp_path):
    config, params, sharded, _ = model
    for i in range(3):
        write_png(tmp_path / "val2017" / f"{i:012d}.jpg".replace(".jpg", ".png"), seed=100 + i)
    layout = {
        "replace_att": {"0": ("000000000000.png", "a red ball", "a blue ball"),
                        "1": ("000000000001.png", "a tall tree", "a short tree"),
                        "2": ("000000000002.png", "a wet road", "a dry road")},
        "swap_obj": {"5": ("000000000001.png", "a cat on a mat", "a mat on a cat"),
                     "6": ("000000000000.png", "a dog and a boy", "a boy and a dog")},
    }
    folder = tmp_path / "sugarcrepe"
    folder.mkdir()
    for category, entries in layout.items():
        body = {key: {"filename": f, "caption": p, "negative_caption": n} for key, (f, p, n) in entries.items()}
        (folder / f"{category}.json").write_text(json.dumps(body))
    result = evaluator(config, "compositional", format="sugarcrepe", path=str(folder),
                       image_root=str(tmp_path / "val2017"), batch_size=8).run(params, sharded.encoders())

    for category, entries in layout.items():
        correct = []
        for filename, positive, negative in entries.values():
            image = reference_image_embeddings(config, sharded, params, [(tmp_path / "val2017" / filename).read_bytes()])[0]
            pos, neg = reference_text_embeddings(config, sharded, params, [positive, negative]) @ image
            correct.append(pos > neg)
        assert result[f"accuracy/{category}"] == pytest.approx(np.mean(correct)), category
    assert result["num_items"] == 5


def test_unknown_evaluator_option_is_refused(model):
    config, *_ = model
    with pytest.raises(ValueError, match="unknown option"):
        evaluator(config, "retrieval", split="validation", templtes="single")


def test_an_unreadable_evaluation_image_stops_with_its_key(model, tmp_path):
    config, params, sharded, _ = model
    write_png(tmp_path / "0.png", seed=0)
    (tmp_path / "1.png").write_bytes(b"not an image")
    lines = [json.dumps({"path": f"{i}.png", "caption": "a thing"}) for i in range(2)]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines))
    config.data.source = f"folder:{tmp_path / 'captions.jsonl'}"
    with pytest.raises(common.EvaluationDataError, match="'1.png'"):
        evaluator(config, "retrieval", split="test", batch_size=8).run(params, sharded.encoders())


def test_docci_long_descriptions_truncated_or_by_sentences(model, tmp_path):
    config, params, sharded, _ = model
    descriptions = [
        "A red kite flies high. It has a long tail. The sky is clear and blue.",
        "Two boats rest on a lake! Their sails are white.",
        "An old brick house. Ivy covers the wall. A cat sleeps on the step. The door is green.",
    ]
    lines = []
    for i, text in enumerate(descriptions):
        write_png(tmp_path / "images" / f"test_{i}.png", seed=200 + i)
        lines.append(json.dumps({"example_id": f"t{i}", "split": "test", "image_file": f"test_{i}.png", "description": text}))
    lines.append(json.dumps({"example_id": "q0", "split": "qual_dev", "image_file": "test_0.png", "description": "other"}))
    (tmp_path / "docci_descriptions.jsonlines").write_text("\n".join(lines))
    spec = f"docci:{tmp_path / 'docci_descriptions.jsonlines'}"

    # The micro model's context is 8 tokens: every description is cut.
    truncated = evaluator(config, "retrieval", source=spec, split="test", batch_size=8).run(params, sharded.encoders())
    assert truncated["captions_truncated"] == 1.0 and truncated["num_images"] == 3

    by_sentence = evaluator(config, "retrieval", source=spec, split="test", batch_size=8, long_captions="sentences", ks=(1,))
    result = by_sentence.run(params, sharded.encoders())
    images = reference_image_embeddings(config, sharded, params, [(tmp_path / "images" / f"test_{i}.png").read_bytes() for i in range(3)])
    captions = []
    for text in descriptions:
        sentences = [s.strip() for s in text.replace("!", "!|").replace(".", ".|").split("|") if s.strip()]
        rows = reference_text_embeddings(config, sharded, params, sentences)
        mean = sum(r / np.linalg.norm(r) for r in rows)
        captions.append(mean / np.linalg.norm(mean))
    similarity = images @ np.array(captions).T
    i2t = np.mean([pessimistic_rank(similarity[i], [j == i for j in range(3)]) == 0 for i in range(3)])
    t2i = np.mean([pessimistic_rank(similarity[:, j], [i == j for i in range(3)]) == 0 for j in range(3)])
    assert result["image_to_text_R@1"] == pytest.approx(i2t)
    assert result["text_to_image_R@1"] == pytest.approx(t2i)
    assert result["captions_truncated"] < 1.0  # sentences are shorter than paragraphs


def test_aro_relation_crops_and_per_relation_accuracy_match_reference(model, tmp_path):
    config, params, sharded, _ = model
    rng = np.random.default_rng(7)
    (tmp_path / "images").mkdir()
    Image.fromarray(rng.integers(0, 255, size=(30, 40, 3), dtype=np.uint8)).save(tmp_path / "images" / "1.png")
    Image.fromarray(rng.integers(0, 255, size=(24, 24, 3), dtype=np.uint8)).save(tmp_path / "images" / "2.png")
    entries = [
        ("1.png", (0, 0, 20, 15), "the horse is on the grass", "the grass is on the horse", "on"),
        ("1.png", (20, 15, 20, 15), "the man is holding the cup", "the cup is holding the man", "holding"),
        ("2.png", (2, 4, 18, 16), "the cat is on the mat", "the mat is on the cat", "on"),
        ("2.png", (0, 0, 24, 24), "the dog is holding the ball", "the ball is holding the dog", "holding"),
        ("1.png", (0, 0, 20, 15), "the bird is on the roof", "the roof is on the bird", "on"),
    ]
    annotations = [
        {"image_path": image, "bbox_x": x, "bbox_y": y, "bbox_w": w, "bbox_h": h, "true_caption": pos,
         "false_caption": neg, "relation_name": relation}
        for image, (x, y, w, h), pos, neg, relation in entries
    ]
    path = tmp_path / "visual_genome_relation.json"
    path.write_text(json.dumps(annotations))
    result = evaluator(config, "compositional", format="aro_relation", path=str(path),
                       image_root=str(tmp_path / "images"), batch_size=8).run(params, sharded.encoders())

    correct = {"on": [], "holding": []}
    for image, (x, y, w, h), pos, neg, relation in entries:
        crop = Image.open(tmp_path / "images" / image).convert("RGB").crop((x, y, x + w, y + h))
        embedding = reference_image_embeddings(config, sharded, params, [crop])[0]
        pos_score, neg_score = reference_text_embeddings(config, sharded, params, [pos, neg]) @ embedding
        correct[relation].append(pos_score > neg_score)
    for relation, values in correct.items():
        assert result[f"accuracy/{relation}"] == pytest.approx(np.mean(values)), relation
    assert result["accuracy"] == pytest.approx(np.mean(correct["on"] + correct["holding"]))
    assert result["num_items"] == 5


def test_text_embeddings_cut_columns_of_padding_without_changing_results(scenes_data_dir):
    config = micro_config(**{"model.text.vocab_size": 49408, "model.text.context_length": 48})
    setup = TrainSetup.create(config, parallel.make_mesh({"data": -1}))
    params = jax.device_get(setup.init_state()["params"])
    encoders = setup.encoders()
    shapes = []

    def recording_encode(p, ids):
        shapes.append(ids.shape)
        return encoders.encode_texts(p, ids)

    texts = ["a red circle", "a small blue square to the left of a large green star"]
    ids = make_tokenizer("clip", 48).batch(texts)
    embeddings = common.embed_token_ids(params, dataclasses.replace(encoders, encode_texts=recording_encode), ids,
                                        batch_size=8)
    assert shapes and all(shape[1] == 16 for shape in shapes)  # both captions end within 16 of the 48 tokens
    np.testing.assert_allclose(embeddings, reference_text_embeddings(config, setup, params, texts), atol=2e-6)
    np.testing.assert_array_equal(common.trim_padding(np.array([[5, 1, 0, 0], [7, 0, 0, 0]]), 0, multiple=2),
                                  [[5, 1], [7, 0]])
    np.testing.assert_array_equal(common.trim_padding(np.full((2, 4), -1), -1, multiple=2), np.full((2, 2), -1))
