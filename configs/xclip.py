"""xCLIP (Zhou et al., arXiv 2210.09304, CVPR 2023): CLIP + λ·nCLIP, trained together.

Reproduces: L = L_clip + λ·L_nCLIP of shared/METHODS.md section 3 (λ = 1 here; one secondary source says
            0.3·CLIP + 0.7·nCLIP, unverified). The nCLIP part is a reconstruction (see configs/nclip.py).
Command:    python -m jclip.main --config=configs/xclip.py --workdir=/tmp/xclip
            python -m jclip.main --config=configs/xclip.py --workdir=... --config.losses.nclip.weight=0.5
"""

from configs import common, nclip


def get_config(arg: str | None = None):
    config = common.base_config(arg)
    config.model.prototype_heads = nclip.prototype_heads()
    config.losses = {"clip": {"weight": 1.0}, "nclip": {"weight": 1.0, **nclip.nclip_loss()}}
    return config
