"""Model presets as plain dicts, ready for `build_model` and for ml_collections configs.

`B/32`, `B/16` and `L/14` have OpenAI CLIP's shapes (Radford et al. 2021, table 20; OpenCLIP's
`ViT-B-32.json`, `ViT-B-16.json`, `ViT-L-14.json`). Like those OpenCLIP configs they use the exact GELU; set
`quick_gelu=True` to match OpenAI's released weights (OpenCLIP's `-quickgelu` variants). `tiny` is for
training on a laptop CPU in minutes with the real 49408-token CLIP tokenizer.
"""

from __future__ import annotations

import copy
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # About 0.34 CPU-core-seconds per AdamW train step at batch 128 (about 0.15-0.2 s on 2 idle cores);
    # the text tower is the narrower one as its 32 tokens cost twice the image tower's 17.
    "tiny": {
        "embed_dim": 128,
        "quick_gelu": False,
        "vision": {"kind": "vit", "image_size": 32, "patch_size": 8, "width": 128, "layers": 2, "head_width": 64,
                   "mlp_ratio": 4.0},
        "text": {"kind": "clip", "context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
    "B/32": {
        "embed_dim": 512,
        "quick_gelu": False,
        "vision": {"kind": "vit", "image_size": 224, "patch_size": 32, "width": 768, "layers": 12, "head_width": 64,
                   "mlp_ratio": 4.0},
        "text": {"kind": "clip", "context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
    },
    "B/16": {
        "embed_dim": 512,
        "quick_gelu": False,
        "vision": {"kind": "vit", "image_size": 224, "patch_size": 16, "width": 768, "layers": 12, "head_width": 64,
                   "mlp_ratio": 4.0},
        "text": {"kind": "clip", "context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
    },
    "L/14": {
        "embed_dim": 768,
        "quick_gelu": False,
        "vision": {"kind": "vit", "image_size": 224, "patch_size": 14, "width": 1024, "layers": 24, "head_width": 64,
                   "mlp_ratio": 4.0},
        "text": {"kind": "clip", "context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12},
    },
}


def get_preset(name: str, **overrides: Any) -> dict[str, Any]:
    """A fresh copy of preset `name` with top-level keys overridden (e.g. `dtype="bfloat16"`, `remat=True`)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; available: {sorted(PRESETS)}")
    config = copy.deepcopy(PRESETS[name])
    config["name"] = name
    config.update(overrides)
    return config
