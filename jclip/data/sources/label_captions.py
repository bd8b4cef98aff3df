"""Captions made from class labels, so that a labelled dataset (CIFAR-10, ImageNet) can train a CLIP model.

`CaptionsFromLabels(source, class_names, ("a photo of a {}.", "a blurry photo of a {}."))` returns each of
the source's examples with `caption` replaced by the list of templates filled with the example's class
name; training (the `choose_caption` op) picks one of them at random per visit. A caption the source already
had is replaced. Underscores in class names become spaces (`maple_tree` -> "a photo of a maple tree.").
"""

from __future__ import annotations

import operator
import string
from collections.abc import Sequence
from typing import Any


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """The templates as a tuple; ValueError unless each is a string with exactly one `{}` field."""
    if isinstance(templates, (str, bytes)) or not isinstance(templates, Sequence) or not templates:
        raise ValueError(f"caption templates must be a non-empty tuple or list of strings with one '{{}}' each, "
                         f"e.g. ('a photo of a {{}}.',); got {templates!r}")
    for template in templates:
        if not isinstance(template, str):
            raise ValueError(f"caption template {template!r} is not a string")
        try:
            fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                      if name is not None]
        except ValueError as error:
            raise ValueError(f"caption template {template!r} is malformed ({error})") from None
        if fields != [("", "", None)]:
            raise ValueError(f"caption template {template!r} must contain exactly one '{{}}' (where the class name "
                             f"goes) and no other fields; write a literal brace as '{{{{' or '}}}}'")
    return tuple(templates)


def caption_name(class_name: str) -> str:
    """A class name as it reads in a caption: underscores become spaces."""
    return " ".join(str(class_name).replace("_", " ").split())


class CaptionsFromLabels:
    """`source`'s examples with `caption` = every template filled with the example's class name.

    Args:
      source: a random-access source whose examples have an int `label`.
      class_names: the class names in label order; None takes `source.class_names()`.
      templates: strings with exactly one `{}` each.
    """

    def __init__(self, source: Any, class_names: Sequence[str] | None, templates: Sequence[str]):
        self.templates = check_templates(templates)
        if class_names is None:
            class_names = source.class_names() if hasattr(source, "class_names") else None
        if class_names is None:
            raise ValueError(f"captions from labels need class names, and {source!r} has none "
                             f"(no labels, or integer labels without names)")
        self.source = source
        self._class_names = [str(name) for name in class_names]
        self._captions = [[t.format(caption_name(name)) for t in self.templates] for name in self._class_names]

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = dict(self.source[operator.index(index)])
        if "label" not in example:
            raise KeyError(f"example {example.get('key')!r} of {self.source!r} has no 'label' to caption")
        label = int(example["label"])
        if not 0 <= label < len(self._captions):
            raise IndexError(f"label {label} of example {example.get('key')!r} is outside the "
                             f"{len(self._captions)} class names")
        example["caption"] = list(self._captions[label])
        return example

    def class_names(self) -> list[str]:
        """The class names, in label order."""
        return list(self._class_names)

    def __repr__(self) -> str:
        return f"CaptionsFromLabels({len(self.templates)} templates, {len(self._class_names)} classes, of {self.source!r})"
