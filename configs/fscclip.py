"""FSC-CLIP (Oh et al., arXiv 2410.05210, EMNLP 2024): fine-tuning a pretrained CLIP on hard-negative captions.

Reproduces: the FSC-CLIP objective of shared/METHODS.md section 4, as the official code (ytaek-oh/fsc-clip)
            computes it: L = L_clip + λ_g·L_global_hn + λ_l·L_local_hn, both hard-negative terms with selective
            calibrated regularisation (focal γ = 2, label smoothing β = 0.02), λ_g = 0.5, λ_l = 0.2 (COCO and
            LAION-COCO; 1.0/0.2 for CC3M, 0.5/0.5 for ViT-B/16 and L/14), up to three negatives per caption
            (a swap, a replace and a bigram shuffle, drawn afresh every step from pools made offline);
            AdamW lr 5e-6 (5e-5 with LoRA), weight decay 0.1, cosine with 50 warm-up steps; LoRA rank 4 (alpha 1) on
            the attention, MLP and patch-embedding projections (the official code's second setting), only the
            adapters trained.
Paper:      OpenAI CLIP ViT-B/32, 100K pairs of COCO, CC3M (recaptioned) or LAION-COCO, 5 epochs at batch 256
            (~2,000 steps). On LAION-COCO the compositional average goes 46.1 -> 53.5 and ImageNet zero-shot
            63.3 -> 58.1.

Args (`configs/fscclip.py:variant=negclip,init=DIR,...`, besides common.base_config's model/steps/batch/...):
  variant    fsc (the method), fsc_global (without the local term), fsc_no_scr (both terms as plain
             cross-entropy), negclip (negatives as extra columns of the CLIP softmax, Yuksekgonul et al. 2023)
             or clip (plain fine-tuning, no negatives)
  init       the pretrained weights: a jclip run or a params export (e.g. OpenAI's, imported with
             `python -m jclip.convert import`); sets config.init_from
  negatives  the candidate pools `python -m jclip.make_negatives` wrote for this data; sets
             data.hard_negatives (ignored by variant=clip, which reads no negatives)
  lora       LoRA rank 4 on the attention, MLP and patch-embedding projections; only the adapters train
  lr         the peak learning rate (default: 5e-6, or 5e-5 with lora)

Command (the paper's setting on COCO, prepared as TFDS ArrayRecord; the weights and the pools once, then the run):
    python -m jclip.convert import --source=ViT-B-32.safetensors --preset=B/32 --quick_gelu=true --output=/ckpt/openai-b32
    python -m jclip.make_negatives --config=configs/fscclip.py:model=B/32,data=tfds:coco_captions/2017 \
        --config.data.caption_field=captions/text --config.data.train_split='train[:100000]' --output=/data/coco-negatives
    python -m jclip.main --config=configs/fscclip.py:model=B/32,data=tfds:coco_captions/2017,batch=256,steps=1950,init=/ckpt/openai-b32,negatives=/data/coco-negatives \
        --config.model.quick_gelu=true --config.data.caption_field=captions/text \
        --config.data.train_split='train[:100000]' --workdir=/runs/fscclip
Embedded data (the README's comparison): pretrain with configs/clip.py, make the pools, then
    python -m jclip.main --config=configs/fscclip.py:init=/tmp/jclip-clip,negatives=/tmp/negatives --workdir=/tmp/fsc
"""

from configs import common
from jclip import param_rules

VARIANTS = ("fsc", "fsc_global", "fsc_no_scr", "negclip", "clip")
#: Selective calibrated regularisation at the official defaults: focal exponent and label smoothing.
SCR = {"gamma": 2.0, "beta": 0.02}
NO_SCR = {"gamma": 0.0, "beta": 0.0}
#: The official LoRA setting: rank 4 (alpha 1) on the attention, MLP and patch-embedding projections.
LORA = {"rank": 4, "alpha": 1.0, "targets": ("attention", "mlp", "patch_embedding")}


def losses(variant: str, global_weight: float = 0.5, local_weight: float = 0.2) -> dict:
    """The loss terms of a variant (see the module docstring)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown FSC-CLIP variant {variant!r}; known: {', '.join(VARIANTS)}")
    if variant == "clip":
        return {"clip": {"weight": 1.0}}
    if variant == "negclip":
        return {"negclip": {"weight": 1.0}}
    regulariser = NO_SCR if variant == "fsc_no_scr" else SCR
    terms = {"clip": {"weight": 1.0}, "global_hn": {"weight": global_weight, **regulariser}}
    if variant != "fsc_global":
        terms["local_hn"] = {"weight": local_weight, **regulariser}
    return terms


def get_config(arg: str | None = None):
    args, rest = common.split_arg(arg, variant="fsc", init="", negatives="", lora=False, lr=0.0)
    config = common.base_config(rest, steps=300)
    config.losses = losses(args.variant)
    if args.init:
        config.init_from = args.init
    if args.negatives and args.variant != "clip":
        config.data.hard_negatives = args.negatives

    config.optim.learning_rate = args.lr or (5e-5 if args.lora else 5e-6)
    config.optim.warmup_steps = 50
    config.optim.weight_decay = 0.1
    if args.lora:
        config.model.lora.update(LORA)
        config.optim.param_rules = param_rules.lora_only_rules()  # the adapters alone; the logit scale stays frozen

    for evaluation in config.evals.values():
        evaluation.every = 100
    config.checkpoint_every = 100
    return config
