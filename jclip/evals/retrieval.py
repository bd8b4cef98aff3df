"""Image<->text retrieval R@1/5/10 with any number of captions per image (shared/METHODS.md section 6).

Reads any random-access source whose caption field holds one caption or a list (COCO and Flickr30k
Karpathy splits via TFDS, JSONL/CSV captions files, DOCCI). Images are embedded once; every caption is
embedded on its own, and an image->text hit is any of the image's captions in the top k.

Long captions (DOCCI's paragraphs) do not fit CLIP's 77 tokens. `long_captions="truncate"` (the default,
what OpenCLIP and most papers do) lets the tokenizer cut them and reports the fraction cut;
`"sentences"` embeds each sentence and averages the normalised sentence embeddings (a caption is then
represented whole, at the cost of word order across sentences).
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from jclip.data import sentences
from jclip.data.ops.captions import caption_candidates
from jclip.evals import base, common, metrics

LONG_CAPTION_MODES = ("truncate", "sentences")


def split_sentences(text: str) -> list[str]:
    """A paragraph's sentences (`jclip.data.sentences`: abbreviations, decimals and ellipses kept whole);
    the text itself if none."""
    return sentences.split_sentences(text) or [text]


def caption_lists(source: Any, count: int) -> list[list[str]]:
    """Every usable caption of the first `count` examples; an example without one is an error."""
    captions = []
    for index in range(count):
        example = source[index]
        try:
            captions.append(caption_candidates(example.get("caption")))
        except Exception as error:
            raise common.EvaluationDataError(
                f"retrieval example {index} ({example.get('key')!r}) of {source!r} has no usable caption "
                f"({getattr(error, 'reason', error)})"
            ) from None
    return captions


class RetrievalEvaluator(base.Evaluator):
    """Embeds the images and all captions of a split and ranks all images against all captions."""

    OPTIONS = ("split", "source", "ks", "image_field", "caption_field", "long_captions")

    def __init__(self, name: str, config: ml_collections.ConfigDict, data: Any):
        super().__init__(name, config)
        self.ks = tuple(int(k) for k in (config.get("ks") or (1, 5, 10)))
        self.long_captions = str(config.get("long_captions") or "truncate")
        if self.long_captions not in LONG_CAPTION_MODES:
            raise ValueError(f"evals.{name}.long_captions must be one of {LONG_CAPTION_MODES}, got {self.long_captions!r}")
        self.source = data.source(
            config.get("split", "validation"), config.get("source"),
            image_field=config.get("image_field"), caption_field=config.get("caption_field"),
        )
        self.preprocess = common.ImagesOnly(data.eval_preprocess())
        self._texts: tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]] | None = None

    def _prepared_texts(self, encoders: common.Encoders, num_images: int):
        """(token ids, caption of each token row, image of each caption, text stats), computed once."""
        if self._texts is None:
            lists = caption_lists(self.source, num_images)
            captions = [caption for captions in lists for caption in captions]
            owners = np.repeat(np.arange(num_images), [len(captions) for captions in lists])
            tokenizer = encoders.tokenizer
            if self.long_captions == "sentences":
                pieces = [split_sentences(caption) for caption in captions]
                texts = [piece for caption_pieces in pieces for piece in caption_pieces]
                segment = np.repeat(np.arange(len(captions)), [len(p) for p in pieces])
            else:
                texts, segment = captions, np.arange(len(captions))
            stats = {
                "num_captions": float(len(captions)),
                "captions_truncated": sum(map(tokenizer.truncates, texts)) / max(1, len(texts)),
            }
            self._texts = (tokenizer.batch(texts), segment, owners, stats)
        return self._texts

    def run(self, params: Any, encoders: common.Encoders) -> dict[str, float]:
        images = common.embed_split(
            params, encoders, self.source, self.preprocess, batch_size=self.batch_size, limit=self.limit
        )
        num_images = len(images["index"])
        token_ids, segment, owners, stats = self._prepared_texts(encoders, num_images)
        pieces = common.embed_token_ids(params, encoders, token_ids, batch_size=self.batch_size)
        caption_embeddings = metrics.segment_mean_normalised(pieces, segment, len(owners))
        results = metrics.retrieval_metrics(images["image_embeddings"], caption_embeddings, owners, self.ks)
        results.update(stats)
        results["num_images"] = float(num_images)
        return results
