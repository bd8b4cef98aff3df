"""SigLIP (sigmoid loss, Zhai et al. 2023) on the same two-tower model.

Reproduces: OpenCLIP's `SigLipLoss` objective (shared/METHODS.md section 0): logit scale starts at ln 10
and a learnable bias at -10.
Command:    python -m jclip.main --config=configs/siglip.py --workdir=/tmp/siglip
Expect:     on the embedded dataset with the defaults (tiny model, 1,200 steps at batch 128, 2 CPU cores):
            validation image->text R@1 ~0.34, text->image ~0.30 (chance 0.0005), zero-shot top-1 ~0.23.
"""

import math

from configs import common


def get_config(arg: str | None = None):
    config = common.base_config(arg)
    config.losses = {"siglip": {"weight": 1.0}}
    config.model.init_logit_scale = math.log(10.0)
    config.model.init_logit_bias = -10.0
    return config
