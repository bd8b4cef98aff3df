"""CLIP on real photos: CIFAR-10's training images with captions made from class names and templates.

Reproduces: zero-shot CIFAR-10 classification of a model trained on CIFAR-10 photos whose captions are
            OpenAI's 18 CIFAR prompts filled with the image's class ("a blurry photo of a cat."), a
            sanity check on real images rather than a claim about CLIP (the captions carry the label).
Data:       the `<class>/<image>` folders of CIFAR-10 (`../shared/data/cifar10/cifar10-train.tar.gz`
            unpacked, or any export); 90% of them train, the other 10% (a fixed, seeded, disjoint
            slice) are held out for the zero-shot evaluation.
Command:    mkdir -p /tmp/cifar10 && tar xzf ../shared/data/cifar10/cifar10-train.tar.gz -C /tmp/cifar10
            python -m jclip.main --config=configs/cifar10.py:data=classfolders:/tmp/cifar10 --workdir=/tmp/cifar10_run
"""

from ml_collections import config_dict

from configs import common
from jclip.evals import templates


def get_config(arg: str | None = None):
    config = common.base_config(arg, data="classfolders:/tmp/cifar10")
    config.losses = {"clip": {"weight": 1.0}}
    config.data.train_split = "train[:90%]"
    config.data.caption_templates = templates.OPENAI_CIFAR
    config.data.random_crop_scale = (0.8, 1.0)
    config.evals = {
        "zeroshot": {"every": 400, "split": "train[90%:]", "batch_size": 512, "templates": "openai_cifar",
                     "limit": config_dict.placeholder(int), "source": config_dict.placeholder(str)},
    }
    return config
