"""CLIP (softmax InfoNCE, Radford et al. 2021): the baseline every jclip method builds on.

Reproduces: the CLIP objective of OpenCLIP's `ClipLoss` (shared/METHODS.md section 0).
Command:    python -m jclip.main --config=configs/clip.py --workdir=/tmp/clip
            python -m jclip.main --config=configs/clip.py:model=B/32,batch=4096,steps=100000 --workdir=...
Expect:     on the embedded dataset with the defaults (tiny model, 1,200 steps at batch 128; 2 CPU cores,
            ~6.5 min with the dataset build): validation image->text R@1 ~0.35, text->image ~0.32 (chance
            0.0005), zero-shot top-1 ~0.28 over 48 classes, hard-negative accuracy ~0.63 (chance 0.5).
"""

from configs import common


def get_config(arg: str | None = None):
    config = common.base_config(arg)
    config.losses = {"clip": {"weight": 1.0}}
    return config
