"""The tokenizer inside a GGUF file, rebuilt as a `tokenizers.Tokenizer` (no transformers at run time).

A GGUF stores its tokenizer as llama.cpp metadata (`tokenizer.ggml.*`): the model type, the tokens in id
order, their types (1 normal, 3 control, 4 user-defined, 6 byte), scores, BPE merges, the special ids and
whether to add BOS/EOS. `tokenizer_from_gguf` builds the tokenizer transformers builds for
`AutoTokenizer.from_pretrained(dir, gguf_file=...)` (transformers 5.x, the reference of the tests), so the
ids are the same:

- `tokenizer.ggml.model = "llama"` in a Gemma file (architectures gemma, gemma2, gemma3): SentencePiece-style
  BPE over text with spaces written "▁" (no prefix space), with byte fallback (`<0xNN>` tokens) and `<unk>`.
  Gemma files list no merges: they follow from the vocabulary. Every split of a token into two tokens is a
  merge; merges rank by the merged token's position in the file (earlier first), then by a longer left part.
  Tokens of two or more spaces are stored with real spaces and renamed to "▁" runs so that they merge.
- `tokenizer.ggml.model = "gpt2"` (SmolLM2's): byte-level BPE with the file's merges, GPT-2's pre-tokenizer
  regex (`tokenizer.ggml.pre` `gpt2`, `smollm` or `default`: SmolLM2's vocabulary has no token of two
  digits, so its upstream per-digit split gives the same ids), tokens not written in the byte alphabet
  respelled in it.

Control tokens (type 3; in a byte-level vocabulary only those spelled in the byte alphabet) become special
added tokens, user-defined ones (type 4, e.g. Gemma's `<table>`, newline and tab runs) plain added tokens:
both match whole in the raw text. The post-processor adds BOS when `tokenizer.ggml.add_bos_token` says so
(Gemma: yes, id 2; SmolLM2: no; a SentencePiece file without the flag: yes, as llama.cpp does) and EOS when
`add_eos_token` does.

Building Gemma's 262k-token tokenizer takes seconds (and opening the file about three; SmolLM2's under
one), so a tokenizer that took over a second is cached as a tokenizer.json under
`$JCLIP_CACHE/tokenizers` (default `~/.cache/jclip/tokenizers`), keyed by the file's path, size and
modification time; loading Gemma's from there takes about a second.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import time
from typing import Any

#: Bumped when the builder changes what it builds, so that old cache entries are not used.
BUILDER_VERSION = 1
CONTROL, USER_DEFINED = 3, 4
SENTENCEPIECE_GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")
GPT2_PRE_TOKENIZERS = ("default", "gpt2", "smollm")
SPACE = "\u2581"
#: A tokenizer that took longer than this to build is cached as a tokenizer.json.
CACHE_AFTER_SECONDS = 1.0


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the other 68 bytes
    for the characters 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _cache_file(path: str) -> pathlib.Path:
    stat = os.stat(path)
    key = json.dumps([os.path.realpath(path), stat.st_size, stat.st_mtime_ns, BUILDER_VERSION])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = os.environ.get("JCLIP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jclip")
    return pathlib.Path(root) / "tokenizers" / f"{pathlib.Path(path).stem}-{digest}.json"


def tokenizer_from_gguf(path: str) -> Any:
    """The GGUF's tokenizer as a `tokenizers.Tokenizer` (see the module docstring); cached. FileNotFoundError
    for a missing file, ValueError naming the file for one that is not a GGUF or has no (supported) tokenizer."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the GGUF file {path} does not exist")
    return _cached(str(path), *_file_key(path))


def _file_key(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=4)
def _cached(path: str, size: int, mtime_ns: int) -> Any:
    import tokenizers

    del size, mtime_ns  # part of the in-process cache key only
    cache = _cache_file(path)
    if cache.is_file():
        try:
            return tokenizers.Tokenizer.from_file(str(cache))
        except Exception:  # a damaged cache entry: rebuild it
            pass
    started = time.perf_counter()
    tokenizer = build_tokenizer(path)
    if time.perf_counter() - started < CACHE_AFTER_SECONDS:
        return tokenizer
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(f".tmp{os.getpid()}")
        tokenizer.save(str(partial))
        os.replace(partial, cache)
    except OSError:  # a read-only cache is no error; the tokenizer is built each time then
        pass
    return tokenizer


def read_tokenizer_metadata(path: str) -> dict[str, Any]:
    """The `tokenizer.ggml.*` metadata (keys without the prefix) and `architecture`; ValueError naming the file
    when it has none."""
    from jclip.models.gguf_weights import open_gguf

    gguf_file = open_gguf(path)
    prefix = "tokenizer.ggml."
    if not gguf_file.has(prefix + "model") or not gguf_file.has(prefix + "tokens"):
        raise ValueError(f"{path} has no tokenizer metadata (tokenizer.ggml.model and tokenizer.ggml.tokens)")
    metadata = {key[len(prefix):]: gguf_file.value(key) for key in gguf_file.keys() if key.startswith(prefix)}
    metadata["architecture"] = gguf_file.architecture
    return metadata


def build_tokenizer(path: str) -> Any:
    """Builds the tokenizer of the GGUF at `path` (uncached)."""
    metadata = read_tokenizer_metadata(path)
    model = metadata["model"]
    if model == "llama" and metadata["architecture"] in SENTENCEPIECE_GEMMA_ARCHITECTURES:
        tokenizer, vocab = _gemma_bpe(metadata)
        byte_level = False
    elif model == "gpt2":
        pre = metadata.get("pre", "default")
        if pre not in GPT2_PRE_TOKENIZERS:
            raise ValueError(f"{path}: byte-level tokenizer with pre-tokenizer {pre!r} is not supported (known: "
                             f"{list(GPT2_PRE_TOKENIZERS)})")
        tokenizer, vocab = _byte_level_bpe(metadata)
        byte_level = True
    else:
        raise ValueError(f"{path}: tokenizer.ggml.model {model!r} of a {metadata['architecture']!r} model is not "
                         "supported (known: 'llama' in Gemma files, 'gpt2')")
    _add_tokens(tokenizer, metadata, vocab, byte_level)
    add_bos = bool(metadata.get("add_bos_token", model == "llama"))
    add_eos = bool(metadata.get("add_eos_token", False))
    tokenizer.post_processor = _framing(metadata, add_bos, add_eos, path)
    return tokenizer


def gemma_merges(tokens: list[str]) -> list[tuple[str, str]]:
    """The merges a Gemma vocabulary implies (module docstring): for each token in file order, each split into
    two vocabulary tokens, longer left part first."""
    known = set(tokens)
    merges = []
    for token in tokens:
        for cut in range(len(token) - 1, 0, -1):
            left, right = token[:cut], token[cut:]
            if left in known and right in known:
                merges.append((left, right))
    return merges


def _gemma_bpe(metadata: dict[str, Any]) -> tuple[Any, dict[str, int]]:
    from tokenizers import Tokenizer, decoders, models, normalizers

    tokens = [SPACE * len(token) if " " in token and not token.strip() else token for token in metadata["tokens"]]
    vocab = {token: index for index, token in enumerate(tokens)}
    unknown = tokens[int(metadata.get("unknown_token_id", 3))]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=gemma_merges(tokens), unk_token=unknown, fuse_unk=True,
                                     byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", SPACE)
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    return tokenizer, vocab


def _byte_level_bpe(metadata: dict[str, Any]) -> tuple[Any, dict[str, int]]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    table = byte_alphabet()
    alphabet = set(table.values())
    tokens = [token if set(token) <= alphabet else "".join(table[b] for b in token.encode("utf-8"))
              for token in metadata["tokens"]]
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = [tuple(merge.split(" ")) for merge in metadata.get("merges", [])]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="",
                                     fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer, vocab


def _add_tokens(tokenizer: Any, metadata: dict[str, Any], vocab: dict[str, int], byte_level: bool) -> None:
    from tokenizers import AddedToken

    alphabet = set(byte_alphabet().values()) if byte_level else None
    types = metadata.get("token_type") or []
    control, user = [], []
    for token, kind in zip(metadata["tokens"], types):
        if kind == CONTROL and (alphabet is None or set(token) <= alphabet):
            control.append(AddedToken(token, normalized=False, special=True))
        elif kind == USER_DEFINED and token in vocab:
            user.append(AddedToken(token, normalized=False, special=False))
    tokenizer.add_special_tokens(control)
    tokenizer.add_tokens(user)


def _framing(metadata: dict[str, Any], add_bos: bool, add_eos: bool, path: str) -> Any:
    from tokenizers import processors

    specials = []
    for flag, key in ((add_bos, "bos_token_id"), (add_eos, "eos_token_id")):
        if not flag:
            specials.append(None)
            continue
        if key not in metadata:
            raise ValueError(f"{path}: tokenizer.ggml.add_{key[:3]}_token is set but tokenizer.ggml.{key} is missing")
        index = int(metadata[key])
        specials.append((metadata["tokens"][index], index))
    bos, eos = specials
    single = [*([f"{bos[0]}:0"] if bos else []), "$A:0", *([f"{eos[0]}:0"] if eos else [])]
    pair = [*single, *([f"{bos[0]}:1"] if bos else []), "$B:1", *([f"{eos[0]}:1"] if eos else [])]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=[s for s in specials if s])
