"""Built-in prompt template sets: their published sizes, and the checks on user-given templates."""

from __future__ import annotations

import pytest

from jclip.evals import templates


def test_openai_sets_have_their_published_sizes_and_one_slot_each():
    # CLIP's prompt-engineering notebook: 80 ImageNet prompts, 18 CIFAR prompts, all distinct.
    assert len(templates.OPENAI_IMAGENET) == 80 == len(set(templates.OPENAI_IMAGENET))
    assert len(templates.OPENAI_CIFAR) == 18 == len(set(templates.OPENAI_CIFAR))
    for template in templates.OPENAI_IMAGENET + templates.OPENAI_CIFAR:
        assert template.count("{}") == 1
    assert "itap of a {}." in templates.OPENAI_IMAGENET
    assert templates.OPENAI_CIFAR[0] == "a photo of a {}."


def test_resolve_by_name_or_list():
    assert templates.resolve_templates("single") == ("a photo of a {}.",)
    assert templates.resolve_templates(["a {} here.", "the {}."]) == ("a {} here.", "the {}.")


@pytest.mark.parametrize("bad, message", [
    ("imagenet", "unknown template set"),
    ([], "empty"),
    (["a photo."], "exactly one"),
    (["a {} and a {}."], "exactly one"),
])
def test_bad_templates_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        templates.resolve_templates(bad)

