"""Preprocessing as a configured list of named ops (`config.data.preprocess`), big_vision style.

Syntax: op names separated by `|`, each optionally called with keyword arguments that are Python literals:

    choose_caption|decode_image|crop_image(scale=(0.9, 1.0))|normalise_image|tokenize(field='caption', out='token_ids')

Each op reads and writes fields of the example dict; the batch holds every field an op writes that no later
op consumes, and each must be a NumPy array of one shape for all examples. Built-in ops (see their modules):

| op | module | reads -> writes |
|---|---|---|
| `choose_caption(field='caption')` | captions | one of several captions (random in training, else the first) |
| `keep(fields=('label',))` | captions | raw fields passed into the batch as arrays |
| `decode_image(field='image', max_pixels=, max_aspect_ratio=, alpha_background=, draft=None)` | image | checked RGB image (large JPEGs DCT-scaled for the crop after it: `data.jpeg_draft`) |
| `crop_image(field='image', size=None, scale=None)` | image | centre crop, or RandomResizedCrop in training |
| `normalise_image(field='image', out='images')` | image | float32 [H, W, 3], CLIP-normalised |
| `tokenize(field='caption', out='token_ids', max_count=None, mask=None, count_truncated=None)` | text | ids |
| `guidance(dir=..., modalities=('image', 'text'), key_field='key')` | guidance | guidance feature rows |
| `hard_negatives(dir=..., field='caption', out='negative_captions', kinds=('swap', 'replace', 'shuffle'))` | hard_negatives | one stored hard negative per kind |
| `joined_captions(dir=..., field='dense_caption', key_field='key', missing='skip')` | recaptions | the example's recaption, by key |
| `caption_rule(rule='dense', short_field='caption', dense_field='dense_caption', out='caption')` | captions | alt-text or dense caption: `dense`, `short`, `mixed:p`, `alternate` |
| `sample_sentences(field='caption', out=None, distribution='uniform', min_sentences=1, max_sentences=None)` | captions | a random subset of the sentences, in order |

A new op: `from jclip.data.ops import register_op` and decorate a factory `(context, **kwargs) -> op`
anywhere that is imported before the config is read (a test, a method's module); nothing in jclip changes.
"""

from jclip.data.ops.registry import (
    Op,
    OpContext,
    Preprocess,
    batch_fields,
    known_ops,
    make_op,
    make_ops,
    parse_ops,
    register_op,
)
from jclip.data.ops import captions, guidance, hard_negatives, image, recaptions, text  # the built-ins register

__all__ = ["Op", "OpContext", "Preprocess", "batch_fields", "known_ops", "make_op", "make_ops", "parse_ops",
           "register_op", "captions", "guidance", "hard_negatives", "image", "recaptions", "text"]
