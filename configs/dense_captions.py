"""Improved semantic guidance (Stone et al., arXiv 2412.15396, CVPR 2025): dense captions, sentence sampling, a
pretrained partly frozen text tower with bidirectional top layers, long context (shared/METHODS.md section 5).

Reproduces: the paper's ablation ladder (DOCCI text->image R@1 53.5 scratch + alt-text, 75.6 + recaptions,
            91.6 pretrained tower + recaptions, 93.0 + sentence sampling; a final hard-negative fine-tune
            raises ARO and lowers DOCCI), as rungs of one config on the embedded dataset.
Command:    python -m jclip.tools.ladder --workdir=/tmp/ladder --negatives=/tmp/negatives   # rungs 1-5, 3 seeds
            python -m jclip.main --config=configs/dense_captions.py:rung=4 --workdir=/tmp/dense
            python -m jclip.main --config=configs/dense_captions.py:tower=gemma3-270m,context=512,unlocked=4,\
                data=wds:/data/cc3m/{00000..00331}.tar,recaptions=/data/cc3m-recaps,model=B/16,batch=4096 ...
Args:       rung=1..5 picks the ladder's settings; each can also be set alone:
            tower     scratch (the preset's CLIP text tower, trained from scratch) | minilm-l6 | gemma3-270m |
                      smollm2-135m (pretrained, jclip.models.presets.pretrained_text_tower)
            captions  short | dense | mixed:P | alternate (caption_rule; alt-text vs dense recaption)
            sentences all | uniform | bernoulli:P (sample_sentences on the chosen caption)
            context   text context in tokens (128 fits the embedded dense captions; the paper uses 256-512)
            unlocked  top blocks of a pretrained tower left trainable (the paper: 4 of Gemma's 18)
            bidirectional  top blocks of a decoder tower attending bidirectionally (the paper: 4)
            negatives a make_negatives folder: the hard-negative fine-tune (rung 5, NegCLIP on alt-text)
            init      the run rung 5 fine-tunes (a workdir or params export)
            recaptions a join_captions folder: dense captions joined onto the source by key
Expect:     the README's ladder table (section "Improved captions").
"""

from __future__ import annotations

import ml_collections

from configs import common
from jclip.models import presets

# rung -> (tower, captions, sentences); rung 5 is rung 4 fine-tuned on hard negatives.
RUNGS = {
    1: ("scratch", "short", "all"),
    2: ("scratch", "dense", "all"),
    3: ("minilm-l6", "dense", "all"),
    4: ("minilm-l6", "dense", "uniform"),
    5: ("minilm-l6", "short", "all"),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    own, rest = common.split_arg(arg, rung=0, tower="", captions="", sentences="", context=128, unlocked=2,
                                 bidirectional=4, negatives="", init="", recaptions="", lr=0.0)
    rung = int(own.rung)
    if rung and rung not in RUNGS:
        raise ValueError(f"rung must be one of {sorted(RUNGS)}, got {rung}")
    tower, captions, sentences = RUNGS.get(rung, ("scratch", "dense", "all"))
    tower, captions, sentences = own.tower or tower, own.captions or captions, own.sentences or sentences
    finetune = rung == 5 or bool(own.negatives)
    config = common.base_config(rest, steps=150 if finetune else 1200)

    if tower == "scratch":
        config.model.text.context_length = int(own.context)
    else:
        decoder = presets.PRETRAINED_TEXT_TOWERS.get(tower, {}).get("kind") != "bert"  # BERT is bidirectional
        config.model.text = presets.pretrained_text_tower(tower, context_length=int(own.context),
                                                          bidirectional_top_k=int(own.bidirectional) if decoder else 0)
        unlocked = int(own["unlocked"])  # by item: `own.unlocked` is ConfigDict's method
        config.optim.tower_locks.text = {"enabled": True, "unlocked_layers": unlocked, "freeze_layer_norm": True}

    config.data.caption_rule = captions
    if config.data.source == "embedded" and not own.recaptions:
        config.data.extra_fields = (("dense_caption", "dense_caption"),)  # the embedded dataset's own recaptions
    if sentences != "all":
        config.data.preprocess = config.data.preprocess.replace(
            "choose_caption|", f"choose_caption|sample_sentences(distribution={sentences!r})|", 1)
    if own.recaptions:
        config.data.recaptions = str(own.recaptions)

    config.losses = {"clip": {"weight": 1.0}}
    if finetune:
        if not own.negatives:
            raise ValueError("rung 5 (the hard-negative fine-tune) needs negatives=DIR (python -m jclip.make_negatives)")
        config.data.hard_negatives = str(own.negatives)
        config.losses = {"negclip": {"weight": 1.0}}
        config.optim.learning_rate = 1e-4
        config.optim.warmup_steps = 20
        if own.init:
            config.init_from = str(own.init)
    if own.lr:
        config.optim.learning_rate = float(own.lr)

    # Retrieval of the dense descriptions, DOCCI style: one long text per image, R@1/5/10 both ways.
    config.evals.dense_retrieval = ml_collections.ConfigDict(dict(config.evals.retrieval.to_dict(),
                                                                  type="retrieval", caption_field="dense_caption"))
    return config
