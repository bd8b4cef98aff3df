"""Metric maths of the evaluators, in NumPy on gathered embeddings (shared/METHODS.md section 6).

Ties count against the model: a true item is ranked after every other item with an equal score, so a
constant model gets chance-level (not perfect) recall.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def ranks_of_true(scores: np.ndarray, true_mask: np.ndarray) -> np.ndarray:
    """For each row, the 0-based rank of its best-scoring true column (pessimistic on ties).

    `scores` [Q, C]; `true_mask` [Q, C] bool, at least one True per row.
    """
    scores = np.asarray(scores, np.float64)
    true_mask = np.asarray(true_mask, bool)
    if not true_mask.any(axis=1).all():
        raise ValueError("every query needs at least one true candidate")
    best_true = np.where(true_mask, scores, -np.inf).max(axis=1, keepdims=True)
    better_false = ((scores > best_true) & ~true_mask).sum(axis=1)
    tied_false = ((scores == best_true) & ~true_mask).sum(axis=1)
    return better_false + tied_false


def recall_at_k(scores: np.ndarray, true_mask: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    ranks = ranks_of_true(scores, true_mask)
    return {k: float(np.mean(ranks < k)) for k in ks}


def retrieval_metrics(
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    text_to_image: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 1024,
) -> dict[str, float]:
    """Image->text and text->image R@k; texts may be several per image (`text_to_image[t]` = its image).

    An image->text hit is any of the image's captions within the top k. Queries are ranked `chunk` at a
    time, so memory stays O(chunk x candidates) (COCO's 5k x 25k similarities would be 1 GB at once).
    """
    images = np.asarray(image_embeddings, np.float64)
    texts = np.asarray(text_embeddings, np.float64)
    text_to_image = np.asarray(text_to_image)
    image_ids = np.arange(len(images))

    def ranks(queries: np.ndarray, candidates: np.ndarray, true_mask_of) -> np.ndarray:
        return np.concatenate([
            ranks_of_true(queries[start : start + chunk] @ candidates.T, true_mask_of(slice(start, start + chunk)))
            for start in range(0, len(queries), chunk)
        ])

    image_ranks = ranks(images, texts, lambda rows: image_ids[rows, None] == text_to_image[None, :])
    text_ranks = ranks(texts, images, lambda rows: text_to_image[rows, None] == image_ids[None, :])
    out = {f"image_to_text_R@{k}": float(np.mean(image_ranks < k)) for k in ks}
    out.update({f"text_to_image_R@{k}": float(np.mean(text_ranks < k)) for k in ks})
    return out


def class_embeddings(text_embeddings: np.ndarray, num_classes: int, num_templates: int) -> np.ndarray:
    """Per-class mean of L2-normalised template embeddings, re-normalised (CLIP's zero-shot classifier).

    `text_embeddings` [num_classes * num_templates, d], class-major.
    """
    segment = np.repeat(np.arange(num_classes), num_templates)
    return segment_mean_normalised(text_embeddings, segment, num_classes)


def segment_mean_normalised(embeddings: np.ndarray, segment: np.ndarray, num_segments: int) -> np.ndarray:
    """Per segment, the mean of L2-normalised rows, re-normalised (one embedding per multi-part text).

    `segment[i]` is the segment of row i; every segment needs at least one row.
    """
    rows = np.asarray(embeddings, np.float64)
    rows = rows / np.linalg.norm(rows, axis=-1, keepdims=True)
    segment = np.asarray(segment)
    counts = np.bincount(segment, minlength=num_segments)
    if (counts == 0).any():
        raise ValueError(f"segments {np.flatnonzero(counts == 0)[:5].tolist()}... have no rows")
    sums = np.zeros((num_segments, rows.shape[1]))
    np.add.at(sums, segment, rows)
    return sums / np.linalg.norm(sums, axis=-1, keepdims=True)


def zero_shot_accuracy(
    image_embeddings: np.ndarray, classifier: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5), chunk: int = 4096
) -> dict[int, float]:
    """Top-k accuracy of classifying each image by its most similar class embedding, `chunk` images at a
    time (ImageNet's 50k x 1k logits would otherwise be materialised several times over)."""
    images = np.asarray(image_embeddings, np.float64)
    classifier = np.asarray(classifier, np.float64)
    labels = np.asarray(labels)
    classes = np.arange(len(classifier))
    ranks = np.concatenate([
        ranks_of_true(images[start : start + chunk] @ classifier.T, classes[None, :] == labels[start : start + chunk, None])
        for start in range(0, len(images), chunk)
    ]) if len(images) else np.zeros(0, np.int64)
    return {k: float(np.mean(ranks < k)) for k in ks}
