"""CLIP's byte-level BPE tokenizer, with OpenAI CLIP's cleaning, start/end tokens and truncation.

The BPE merges and vocabulary come from the `instant-clip-tokenizer` package, which ships OpenAI's
`bpe_simple_vocab_16e6` (49,408 tokens) and reproduces OpenAI's `SimpleTokenizer`. Around it we apply
OpenAI's `clip.tokenize` conventions: ftfy + HTML-unescape cleaning, whitespace collapsing, lower-casing,
`<start_of_text>` ... `<end_of_text>`, zero padding, and truncation that keeps the end token last.
"""

from __future__ import annotations

import functools
import html
import re
from collections.abc import Sequence

import ftfy
import instant_clip_tokenizer
import numpy as np

VOCAB_SIZE = 49408
START_OF_TEXT = 49406
END_OF_TEXT = 49407
_WHITESPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """OpenAI CLIP's `basic_clean` then `whitespace_clean`, lower-cased."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return _WHITESPACE.sub(" ", text).strip().lower()


@functools.lru_cache(maxsize=1)
def _bpe() -> instant_clip_tokenizer.Tokenizer:
    return instant_clip_tokenizer.Tokenizer()


class _FixedLengthTokenizer:
    """Shared framing: [start tokens] + ids + [end token], zero-padded; truncation keeps the end token last."""

    context_length: int
    end_of_text: int
    start_tokens: tuple[int, ...] = ()

    @property
    def num_start_tokens(self) -> int:
        return len(self.start_tokens)

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def __call__(self, text: str) -> np.ndarray:
        ids = [*self.start_tokens, *self.encode(text), self.end_of_text][: self.context_length]
        ids[-1] = self.end_of_text
        out = np.zeros(self.context_length, dtype=np.int32)
        out[: len(ids)] = ids
        return out

    def truncates(self, text: str) -> bool:
        """Whether `text` with its start and end tokens is longer than the context (and so gets cut)."""
        return len(self.encode(text)) + self.num_start_tokens + 1 > self.context_length

    def batch(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self(text) for text in texts]) if texts else np.zeros((0, self.context_length), np.int32)


class ClipTokenizer(_FixedLengthTokenizer):
    """Text -> fixed-length int32 token ids, identical to OpenAI's `clip.tokenize(..., truncate=True)`."""

    def __init__(self, context_length: int = 77):
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (start and end tokens), got {context_length}")
        self.context_length = context_length
        self.vocab_size = VOCAB_SIZE
        self.end_of_text = END_OF_TEXT
        self.start_tokens = (START_OF_TEXT,)

    def encode(self, text: str) -> list[int]:
        """BPE ids of the cleaned text, without start/end tokens."""
        return list(_bpe().encode(clean_text(text)))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the ids between the start and end tokens (for logs and debugging)."""
        body = [int(i) for i in ids if int(i) not in (0, START_OF_TEXT, END_OF_TEXT)]
        return _bpe().decode(body).strip()


class SentencePieceTokenizer(_FixedLengthTokenizer):
    """Text -> fixed-length int32 ids with a SentencePiece model, for custom vocabularies.

    jclip's text tower pools at the largest id (CLIP's convention: the end token is the last id of the
    vocabulary), so the end token here is `piece_size` (one past the SentencePiece vocabulary) and the
    model's `text.vocab_size` must be at least `piece_size + 1`. No start token; zero padding (padding after
    the end token never reaches the pooled position through the causal mask). Text is whitespace-cleaned,
    and lower-cased only with `lower=True`. Truncation keeps the end token last, as for CLIP.
    """

    def __init__(self, model_path: str, context_length: int = 77, *, lower: bool = False):
        import sentencepiece

        if context_length < 1:
            raise ValueError(f"context_length must be at least 1 (the end token), got {context_length}")
        self.processor = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
        self.context_length = context_length
        self.lower = lower
        self.end_of_text = self.processor.get_piece_size()
        self.vocab_size = self.end_of_text + 1

    def encode(self, text: str) -> list[int]:
        text = _WHITESPACE.sub(" ", html.unescape(ftfy.fix_text(text))).strip()
        return list(self.processor.encode(text.lower() if self.lower else text))

    def decode(self, ids: Sequence[int]) -> str:
        return self.processor.decode([int(i) for i in ids if 0 < int(i) < self.end_of_text])


Tokenizer = ClipTokenizer | SentencePieceTokenizer


@functools.lru_cache(maxsize=16)
def make_tokenizer(spec: str, context_length: int) -> Tokenizer:
    """A tokenizer from a config spec: `clip` (OpenAI's BPE) or `sentencepiece:/path/to/model[:lower]`."""
    kind, _, argument = spec.partition(":")
    if kind == "clip" and not argument:
        return ClipTokenizer(context_length)
    if kind == "sentencepiece" and argument:
        path, _, option = argument.rpartition(":") if argument.endswith(":lower") else (argument, "", "")
        return SentencePieceTokenizer(path, context_length, lower=option == "lower")
    raise ValueError(f"unknown tokenizer {spec!r}; use 'clip' or 'sentencepiece:/path/to/model.model[:lower]'")
