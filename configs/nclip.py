"""nCLIP (Zhou et al., arXiv 2210.09304, CVPR 2023): the non-contrastive prototype objective alone.

Reproduces: the nCLIP objective of shared/METHODS.md section 3 (no code was released: the heads,
            temperatures and collapse prevention are a reconstruction, all knobs in `config.losses.nclip`
            and `config.model.prototype_heads`).
Recipe:     [recon] collapse = "entropy" (ME-MAX: + mean_i H(p_i) − 5·H(mean_i p_i)) with K = 128 prototypes
            (one per example of the batch of 128). On the embedded dataset this was the only variant of
            those tried that did not collapse: centring and Sinkhorn (K = 128 to 4096) went to uniform
            predictions and entropy with weights 1/1 to a single prototype (README, nCLIP and xCLIP).
            Evaluations compare the heads' prototype logits (`model.embedding = "prototypes"`): nCLIP alone
            never aligns the projected embeddings, only the prototype assignments.
Command:    python -m jclip.main --config=configs/nclip.py --workdir=/tmp/nclip
            python -m jclip.main --config=configs/nclip.py --workdir=... --config.losses.nclip.collapse=sinkhorn
Expect:     the paper reports nCLIP alone as weak at zero-shot recognition; xCLIP (configs/xclip.py) combines
            it with CLIP.
"""

from configs import common


def prototype_heads(num_prototypes: int = 128) -> dict:
    """Heads sized for the tiny model on a CPU; the paper uses K = 32768 with ViT-B (set num_prototypes)."""
    return {"num_prototypes": num_prototypes, "hidden_dim": 512, "bottleneck_dim": 128, "layers": 3}


def nclip_loss() -> dict:
    return {"collapse": "entropy", "student_temperature": 0.1, "teacher_temperature": 0.04,
            "centre_momentum": 0.9, "sinkhorn_epsilon": 0.05, "sinkhorn_iterations": 3,
            "entropy_weight": 1.0, "mean_entropy_weight": 5.0}


def get_config(arg: str | None = None):
    config = common.base_config(arg)
    config.model.prototype_heads = prototype_heads()
    config.model.embedding = "prototypes"
    config.losses = {"nclip": {"weight": 1.0, **nclip_loss()}}
    return config
