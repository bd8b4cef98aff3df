"""Zero-shot classification: class names x prompt templates, per-class mean text embedding (CLIP's recipe)."""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from jclip.evals import common, metrics

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "single": ("a photo of a {}.",),
    # For the embedded scenes: the class is the largest object, "<colour> <shape>".
    "scenes": ("a {}.", "a picture of a {}.", "a large {}.", "a scene with a large {}.", "a drawing of a {}."),
}


class ZeroShotEvaluator:
    """Top-1/top-5 of classifying each image by its nearest class embedding."""

    def __init__(self, name: str, config: ml_collections.ConfigDict, data: Any):
        self.name = name
        self.every = int(config.every)
        self.batch_size = int(config.batch_size)
        self.limit = config.get("limit")
        self.source = data.source(config.split, config.get("source"))
        self.class_names = tuple(data.class_names(config.split, config.get("source")))
        templates = config.templates
        if isinstance(templates, str):
            if templates not in TEMPLATE_SETS:
                raise ValueError(f"unknown template set {templates!r}; known: {sorted(TEMPLATE_SETS)}")
            templates = TEMPLATE_SETS[templates]
        self.templates = tuple(templates)
        self.preprocess = data.eval_preprocess(keep=(data.label_key,))
        self.label_key = data.label_key

    def run(self, params: Any, encoders: common.Encoders) -> dict[str, float]:
        prompts = [template.format(name) for name in self.class_names for template in self.templates]
        text_embeddings = common.embed_texts(params, encoders, prompts, batch_size=self.batch_size)
        classifier = metrics.class_embeddings(text_embeddings, len(self.class_names), len(self.templates))
        embedded = common.embed_split(
            params, encoders, self.source, self.preprocess, batch_size=self.batch_size, limit=self.limit,
            extra_keys=(self.label_key,),
        )
        logits = embedded["image_embeddings"].astype(np.float64) @ classifier.T
        accuracy = metrics.topk_accuracy(logits, embedded[self.label_key], (1, 5))
        return {"top1": accuracy[1], "top5": accuracy[5], "num_classes": float(len(self.class_names))}
