"""Evaluation maths on hand-built embeddings whose right answers are obvious."""

from __future__ import annotations

import numpy as np

from jclip.evals import metrics


def one_hot_rows(indices, size):
    out = np.zeros((len(indices), size))
    out[np.arange(len(indices)), indices] = 1.0
    return out


def test_perfect_and_shifted_retrieval():
    images = np.eye(4)
    perfect = metrics.retrieval_metrics(images, np.eye(4), np.arange(4), ks=(1, 5))
    assert perfect == {"image_to_text_R@1": 1.0, "image_to_text_R@5": 1.0, "text_to_image_R@1": 1.0, "text_to_image_R@5": 1.0}
    # Text t is closest to image (t+1) % 4 but belongs to image t: second place for every query.
    texts = 0.9 * one_hot_rows([1, 2, 3, 0], 4) + 0.4 * np.eye(4)
    shifted = metrics.retrieval_metrics(images, texts, np.arange(4), ks=(1, 2))
    assert shifted["image_to_text_R@1"] == 0.0 and shifted["image_to_text_R@2"] == 1.0
    assert shifted["text_to_image_R@1"] == 0.0 and shifted["text_to_image_R@2"] == 1.0


def test_ties_count_against_the_model():
    constant = np.ones((5, 3))
    result = metrics.retrieval_metrics(constant, constant, np.arange(5), ks=(1, 5))
    assert result["image_to_text_R@1"] == 0.0  # four other texts tie with the true one
    assert result["image_to_text_R@5"] == 1.0


def test_several_captions_per_image():
    images = np.eye(3)
    # Six captions, two per image; caption 4 belongs to image 2 but points at image 0.
    texts = one_hot_rows([0, 0, 1, 1, 0, 2], 3)
    text_to_image = np.array([0, 0, 1, 1, 2, 2])
    result = metrics.retrieval_metrics(images, texts, text_to_image, ks=(1,))
    # image->text: image 0's true captions (0, 1) tie with the false caption 4, so pessimistically it
    # misses R@1; images 1 and 2 each have a true caption strictly on top.
    assert result["image_to_text_R@1"] == 2 / 3
    # text->image: caption 4 (of image 2) points at image 0: wrong; the other five are right.
    assert result["text_to_image_R@1"] == 5 / 6


def test_class_embeddings_average_then_renormalise():
    # Two classes x two templates, unnormalised inputs.
    text = np.array([[3.0, 0.0], [0.0, 1.0], [0.0, 2.0], [0.0, 5.0]])
    classes = metrics.class_embeddings(text, num_classes=2, num_templates=2)
    np.testing.assert_allclose(classes[0], [1 / np.sqrt(2), 1 / np.sqrt(2)])
    np.testing.assert_allclose(classes[1], [0.0, 1.0])


def test_zero_shot_accuracy_in_chunks():
    logits = np.array([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3], [0.2, 0.2, 0.6]])
    labels = np.array([1, 2, 0])
    # Identity class embeddings make the image rows the logits; chunks of 2 split the three images.
    accuracy = metrics.zero_shot_accuracy(logits, np.eye(3), labels, ks=(1, 2, 3), chunk=2)
    assert accuracy[1] == 1 / 3
    assert accuracy[2] == 2 / 3  # row 2: class 0 ties with class 1 -> pessimistic rank 2
    assert accuracy[3] == 1.0


def test_segment_mean_normalised_averages_unit_rows():
    rows = np.array([[2.0, 0.0], [0.0, 3.0], [0.0, -1.0], [5.0, 5.0]])
    out = metrics.segment_mean_normalised(rows, np.array([0, 0, 1, 2]), 3)
    np.testing.assert_allclose(out[0], [1 / np.sqrt(2), 1 / np.sqrt(2)])  # mean of (1,0) and (0,1)
    np.testing.assert_allclose(out[1], [0.0, -1.0])
    np.testing.assert_allclose(out[2], [1 / np.sqrt(2), 1 / np.sqrt(2)])


def test_segment_without_rows_is_an_error():
    import pytest

    with pytest.raises(ValueError, match="no rows"):
        metrics.segment_mean_normalised(np.ones((2, 2)), np.array([0, 0]), 2)


def test_chunked_ranking_equals_whole_matrix():
    rng = np.random.default_rng(0)
    images, texts = rng.normal(size=(23, 4)), rng.normal(size=(50, 4))
    owners = rng.integers(0, 23, size=50)
    owners[:23] = np.arange(23)  # every image has at least one caption
    whole = metrics.retrieval_metrics(images, texts, owners, ks=(1, 3, 10), chunk=10_000)
    assert metrics.retrieval_metrics(images, texts, owners, ks=(1, 3, 10), chunk=7) == whole
