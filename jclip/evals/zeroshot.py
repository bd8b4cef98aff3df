"""Zero-shot classification: class names x prompt templates, per-class mean text embedding (CLIP's recipe).

Class names come from the dataset (a TFDS ClassLabel, class folders) or from `class_names`, a file with one
name per line (`.txt`) or a JSON list (`.json`), which ImageNet needs (its TFDS names are WordNet ids).
Templates are a built-in set (`jclip.evals.templates`) or a list. The prompts are tokenised once and their
embeddings computed sharded over every device once per evaluation.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import ml_collections
import numpy as np

from jclip.data.sources import label_captions
from jclip.evals import base, common, metrics, templates


def read_class_names(path: str) -> list[str]:
    """Class names in label order from a `.json` list or a text file with one name per line."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"class names file {path} does not exist")
    text = file.read_text(encoding="utf-8")
    if file.suffix.lower() == ".json":
        names = json.loads(text)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"class names file {path}: expected a JSON list of strings")
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ValueError(f"class names file {path} holds no names")
    return names


class ZeroShotEvaluator(base.Evaluator):
    """Top-1/top-5 accuracy of classifying each image by its nearest class embedding."""

    OPTIONS = ("split", "source", "templates", "class_names", "image_field", "label_field")

    def __init__(self, name: str, config: ml_collections.ConfigDict, data: Any):
        super().__init__(name, config)
        split, spec = config.get("split", "validation"), config.get("source")
        # Classification sources (tfds:cifar10) have labels and no captions.
        fields = {"image_field": config.get("image_field"), "caption_field": "",
                  "label_field": config.get("label_field") or data.config.get("label_field") or "label"}
        self.source = data.source(split, spec, **fields)
        names_file = config.get("class_names")
        self.class_names = tuple(read_class_names(names_file) if names_file else data.class_names(split, spec, **fields))
        self.templates = templates.resolve_templates(config.get("templates") or "single")
        self.label_key = data.label_key
        self.preprocess = common.ImagesOnly(data.eval_preprocess(), keep=(self.label_key,))
        self.prompts = [t.format(label_captions.caption_name(n)) for n in self.class_names for t in self.templates]
        self._token_ids: np.ndarray | None = None

    def classifier(self, params: Any, encoders: common.Encoders) -> np.ndarray:
        """[num_classes, d]: the normalised mean embedding of each class's prompts."""
        if self._token_ids is None:
            self._token_ids = encoders.tokenizer.batch(self.prompts)
        prompts = common.embed_token_ids(params, encoders, self._token_ids, batch_size=self.batch_size)
        return metrics.class_embeddings(prompts, len(self.class_names), len(self.templates))

    def run(self, params: Any, encoders: common.Encoders) -> dict[str, float]:
        classifier = self.classifier(params, encoders)
        embedded = common.embed_split(
            params, encoders, self.source, self.preprocess, batch_size=self.batch_size, limit=self.limit,
            extra_keys=(self.label_key,),
        )
        labels = embedded[self.label_key].astype(np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= len(self.class_names)):
            raise common.EvaluationDataError(
                f"evals.{self.name}: labels range over [{labels.min()}, {labels.max()}] but there are "
                f"{len(self.class_names)} class names"
            )
        ks = (1, 5) if len(self.class_names) > 5 else (1,)
        accuracy = metrics.zero_shot_accuracy(embedded["image_embeddings"], classifier, labels, ks)
        results = {f"top{k}": value for k, value in accuracy.items()}
        results["num_classes"] = float(len(self.class_names))
        results["num_images"] = float(len(labels))
        return results
