"""The dataset a config names, as random-access splits plus its preprocessing for training and evaluation."""

from __future__ import annotations

import functools
from typing import Any

import ml_collections

from jclip.data import transforms

KNOWN_SOURCES = ("embedded",)


class ConfiguredData:
    """`config.data` made concrete: splits by name, class names, and the preprocessors of the model's inputs."""

    label_key = "label"

    def __init__(self, data_config: ml_collections.ConfigDict, model_config: ml_collections.ConfigDict):
        if data_config.source not in KNOWN_SOURCES:
            raise ValueError(f"unknown data.source {data_config.source!r}; known: {list(KNOWN_SOURCES)}")
        self.config = data_config
        self.image_size = int(model_config.vision.image_size)
        self.context_length = int(model_config.text.context_length)

    @functools.lru_cache(maxsize=None)
    def source(self, split: str) -> Any:
        from jclip.data import embedded

        return embedded.load_source(split, data_dir=self.config.data_dir, config=self.config.embedded_config)

    def class_names(self) -> list[str]:
        from jclip.data import scenes

        return list(scenes.CLASS_NAMES)

    def _preprocessor(self, random_crop_scale, keep=()) -> transforms.ImageTextPreprocessor:
        return transforms.ImageTextPreprocessor(
            image_size=self.image_size,
            context_length=self.context_length,
            image_key=self.config.image_key,
            text_key=self.config.text_key,
            random_crop_scale=None if random_crop_scale is None else tuple(random_crop_scale),
            keep=tuple(keep),
        )

    def train_preprocess(self) -> transforms.ImageTextPreprocessor:
        return self._preprocessor(self.config.random_crop_scale)

    def eval_preprocess(self, keep: tuple[str, ...] = ()) -> transforms.ImageTextPreprocessor:
        return self._preprocessor(None, keep)
