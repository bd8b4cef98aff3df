"""A toy method, added without editing jclip: CLIP + a hard-negative term over word-shuffled captions.

Three files: `loss.py` (the term), `op.py` (the preprocessing op) and this config, which imports both so
that they register. Command (tests/ on the path): PYTHONPATH=tests python -m jclip.main
--config=tests/toy_method/config.py --workdir=/tmp/toy
"""

from configs import clip
from toy_method import loss, op

#: Importing these modules registered the term and the op.
REGISTERED = (loss.toy_hard_negatives, op.ShuffleWords)


def get_config(arg=None):
    config = clip.get_config(arg)
    config.data.preprocess = config.data.preprocess + "|shuffle_words(count=3)"
    config.losses = {"clip": {"weight": 1.0}, "toy_hard_negatives": {"weight": 0.5}}
    return config
