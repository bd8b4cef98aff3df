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
from typing import Any

import ftfy
import instant_clip_tokenizer
import numpy as np

from jclip.paths import is_file, is_url

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
    pad_id: int = 0  # what fills a row after its tokens (and a row for no caption at all)

    def has_content(self, ids: np.ndarray) -> bool:
        """Whether a tokenized row holds a token of the text (not only the framing)."""
        return bool(ids[self.num_start_tokens] != self.end_of_text)

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
        if is_url(model_path):  # SentencePiece reads local files only: give it the model's bytes
            from etils import epath

            self.processor = sentencepiece.SentencePieceProcessor(model_proto=epath.Path(model_path).read_bytes())
        else:
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


class PretrainedTokenizer:
    """Text -> fixed-length int32 ids with a pretrained model's own `tokenizers.Tokenizer` (BERT's WordPiece,
    Gemma's and SmolLM2's BPE), framed by the file's post-processor ([CLS] ... [SEP], Gemma's BOS).

    jclip sets truncation and padding, never the file's defaults (all-MiniLM's tokenizer.json pads and cuts
    at 128): the text is cut to fit `context_length` with the framing kept, as transformers'
    `tokenizer(text, truncation=True, max_length=context_length)` does, then `append_eos` (for tokenizers
    that add no end token, like SmolLM2's) is appended. Rows are padded with `PAD_ID` (-1), which no
    vocabulary uses: the towers take their attention mask from `ids >= 0`, since a vocabulary's own pad id
    may equal its end token (SmolLM2's does).
    """

    PAD_ID = -1

    def __init__(self, tokenizer: Any, context_length: int, *, append_eos: int | None = None, source: str = ""):
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.context_length = int(context_length)
        self.append_eos = append_eos
        self.source = source
        self.pad_id = self.PAD_ID
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        self._framing = int(tokenizer.num_special_tokens_to_add(False)) + (append_eos is not None)
        if context_length <= self._framing:
            raise ValueError(f"context_length {context_length} leaves no room for text after {self._framing} "
                             f"framing tokens of {source or 'the tokenizer'}")

    def _content(self, text: str) -> Any:
        return self.tokenizer.encode(_WHITESPACE.sub(" ", text).strip(), add_special_tokens=False)

    def encode(self, text: str) -> list[int]:
        """The text's ids without framing or truncation."""
        return list(self._content(text).ids)

    def __call__(self, text: str) -> np.ndarray:
        encoding = self._content(text)
        encoding.truncate(self.context_length - self._framing)
        ids = list(self.tokenizer.post_process(encoding).ids)
        if self.append_eos is not None:
            ids.append(self.append_eos)
        out = np.full(self.context_length, self.PAD_ID, dtype=np.int32)
        out[: len(ids)] = ids
        return out

    def has_content(self, ids: np.ndarray) -> bool:
        return len(ids[ids >= 0]) > self._framing

    def truncates(self, text: str) -> bool:
        return len(self._content(text).ids) + self._framing > self.context_length

    def batch(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.context_length), np.int32)
        return np.stack([self(text) for text in texts])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids if int(i) >= 0], skip_special_tokens=True)


Tokenizer = ClipTokenizer | SentencePieceTokenizer | PretrainedTokenizer


def _pretrained_tokenizer(kind: str, argument: str, context_length: int) -> PretrainedTokenizer:
    """`hf:PATH[?append_eos=ID]` (a tokenizer.json) or `gguf:PATH[?append_eos=ID]` (the tokenizer inside a GGUF)."""
    path, _, query = argument.partition("?")
    options = dict(item.partition("=")[::2] for item in query.split("&") if item)
    unknown = sorted(set(options) - {"append_eos"})
    if unknown:
        raise ValueError(f"unknown tokenizer options {unknown} in {kind}:{argument}; known: append_eos")
    append_eos = int(options["append_eos"]) if "append_eos" in options else None
    if not is_file(path):
        raise FileNotFoundError(f"tokenizer file {path} does not exist (model.text.tokenizer {kind}:{argument})")
    if kind == "gguf" and is_url(path):
        raise ValueError(f"model.text.tokenizer {kind}:{argument}: a GGUF tokenizer is read from a local file only; "
                         f"copy it to local disk (gcloud storage cp {path} .)")
    if kind == "hf":
        import tokenizers

        try:
            if is_url(path):
                from etils import epath

                loaded = tokenizers.Tokenizer.from_str(epath.Path(path).read_text())
            else:
                loaded = tokenizers.Tokenizer.from_file(path)
        except Exception as error:  # the library raises a bare Exception for a malformed file
            raise ValueError(f"tokenizer file {path} could not be read as a tokenizer.json: {error}") from None
    else:
        from jclip.data.gguf_tokenizer import tokenizer_from_gguf

        loaded = tokenizer_from_gguf(path)
    return PretrainedTokenizer(loaded, context_length, append_eos=append_eos, source=path)


@functools.lru_cache(maxsize=16)
def make_tokenizer(spec: str, context_length: int) -> Tokenizer:
    """A tokenizer from a config spec: `clip` (OpenAI's BPE), `sentencepiece:/path/to/model[:lower]`, or a
    pretrained tower's `hf:/path/tokenizer.json[?append_eos=ID]` / `gguf:/path/model.gguf[?append_eos=ID]`."""
    kind, _, argument = spec.partition(":")
    if kind == "clip" and not argument:
        return ClipTokenizer(context_length)
    if kind == "sentencepiece" and argument:
        path, _, option = argument.rpartition(":") if argument.endswith(":lower") else (argument, "", "")
        return SentencePieceTokenizer(path, context_length, lower=option == "lower")
    if kind in ("hf", "gguf") and argument:
        return _pretrained_tokenizer(kind, argument, context_length)
    raise ValueError(f"unknown tokenizer {spec!r}; use 'clip', 'sentencepiece:/path/to/model.model[:lower]', "
                     "'hf:/path/tokenizer.json' or 'gguf:/path/model.gguf'")
