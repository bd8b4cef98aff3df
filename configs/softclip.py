"""SoftCLIP (Gao et al., arXiv 2303.17561, AAAI 2024): soft intra-modal targets plus a negatives-only KL.

Reproduces: the SoftCLIP objective as reconstructed in shared/METHODS.md section 2 (the paper has no
            official code). Every default below is a reconstruction ([recon]), not a value read in code:
            alpha = 0.2 (weight of the guidance in Q = (1-alpha)·I + alpha·G), neg_weight = 1 (lambda of the
            negatives-only KL), guidance_temperature = None (tau_g = the model's current 1/s), guidance =
            "self" (the model's own embeddings under stop-gradient; "batch" reads precomputed features
            batch["guidance_{image,text}_features"], "outputs" a frozen teacher's
            outputs["teacher_{image,text}_embeddings"]), pairing = "same" (G^I supervises image->text, G^T
            text->image; "swapped", "image", "text" are the alternatives).
Command:    python -m jclip.main --config=configs/softclip.py --workdir=/tmp/soft
            python -m jclip.main --config=configs/softclip.py --workdir=/tmp/soft --config.losses.softclip.alpha=0.5
Expect:     on the embedded dataset with the defaults (tiny model, 1,200 steps at batch 128; 2 shared CPU
            cores, 11m44s wall on a loaded machine, one seed): validation image->text R@1 ~0.32, text->image
            ~0.27 (chance 0.0005), zero-shot top-1 ~0.22 over 48 classes, hard-negative accuracy ~0.61
            (chance 0.5); final softclip/soft ~0.65, softclip/neg ~0.52. alpha = 0 is exactly configs/clip.py.
"""

from ml_collections import config_dict

from configs import common


def get_config(arg: str | None = None):
    config = common.base_config(arg)
    config.losses = {
        "softclip": {
            "weight": 1.0,
            "alpha": 0.2,  # [recon]
            "neg_weight": 1.0,  # [recon]
            "guidance_temperature": config_dict.placeholder(float),  # [recon] None: the current 1/s
            "guidance": "self",  # [recon] "self" | "batch" | "outputs"
            "pairing": "same",  # [recon] "same" | "swapped" | "image" | "text"
        }
    }
    return config
