"""Image<->text retrieval R@1/5/10 on a split of the configured dataset (shared/METHODS.md section 6)."""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from jclip.evals import common, metrics


class RetrievalEvaluator:
    """Embeds every (image, caption) of a split and ranks all images against all captions."""

    def __init__(self, name: str, config: ml_collections.ConfigDict, data: Any):
        self.name = name
        self.every = int(config.every)
        self.batch_size = int(config.batch_size)
        self.limit = config.get("limit")
        self.ks = tuple(config.get("ks", (1, 5, 10)))
        self.source = data.source(config.split, config.get("source"))
        self.preprocess = data.eval_preprocess()

    def run(self, params: Any, encoders: common.Encoders) -> dict[str, float]:
        embedded = common.embed_split(
            params, encoders, self.source, self.preprocess, batch_size=self.batch_size, limit=self.limit
        )
        num = len(embedded["index"])
        results = metrics.retrieval_metrics(
            embedded["image_embeddings"], embedded["text_embeddings"], np.arange(num), self.ks
        )
        results["num_images"] = float(num)
        results["chance_R@1"] = 1.0 / num
        return results
