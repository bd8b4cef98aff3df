"""CLIP (softmax InfoNCE, Radford et al. 2021): the baseline every jclip method builds on.

Reproduces: the CLIP objective of OpenCLIP's `ClipLoss` (shared/METHODS.md section 0).
Command:    python -m jclip.main --config=configs/clip.py --workdir=/tmp/clip
            python -m jclip.main --config=configs/clip.py:model=B/32,batch=4096,steps=100000 --workdir=...
Expect:     on the embedded dataset with the defaults (tiny model, 1,200 steps, 2 CPU cores, ~6 min),
            validation retrieval R@1 far above chance (see README for the measured numbers).
"""

from configs import common


def get_config(arg: str | None = None):
    config = common.base_config(arg)
    config.losses = {"clip": {"weight": 1.0}}
    return config
