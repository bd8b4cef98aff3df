"""The tokenizer against OpenAI CLIP's own `SimpleTokenizer` (shipped with its vocabulary by `openai-clip`)."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest

from jclip.data.tokenizer import END_OF_TEXT, START_OF_TEXT, ClipTokenizer

CAPTIONS = [
    "A person riding a motorcycle",
    "a red circle to the left of a large blue square",
    "Two dogs playing in the snow!!  ",
    "  Multiple   spaces\tand\nnewlines ",
    "Caf\u00e9 cr\u00e8me &amp; cr\u00eapes &lt;3",
    "MIXED Case, punctuation... and numbers 12345 (2023)",
    "emoji \U0001F600 and accents: na\u00efve fa\u00e7ade",
    "",
]


def openai_simple_tokenizer():
    """OpenAI's `clip/simple_tokenizer.py`, loaded by path (the package's __init__ would import torch)."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("openai-clip is not installed (it is in jclip's `test` extra)")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "simple_tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("openai_simple_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer()


def openai_tokenize(reference, text: str, context_length: int) -> np.ndarray:
    """`clip.tokenize(text, context_length, truncate=True)` written out (OpenAI's clip.py)."""
    sot = reference.encoder["<|startoftext|>"]
    eot = reference.encoder["<|endoftext|>"]
    tokens = [sot] + reference.encode(text) + [eot]
    if len(tokens) > context_length:
        tokens = tokens[:context_length]
        tokens[-1] = eot
    out = np.zeros(context_length, np.int64)
    out[: len(tokens)] = tokens
    return out


@pytest.mark.parametrize("context_length", [77, 8])
def test_ids_equal_openai_tokenizer(context_length):
    reference = openai_simple_tokenizer()
    tokenizer = ClipTokenizer(context_length)
    for caption in CAPTIONS:
        np.testing.assert_array_equal(tokenizer(caption), openai_tokenize(reference, caption, context_length), err_msg=caption)


def test_published_example_and_special_tokens():
    # Token ids of "A person riding a motorcycle" as published for OpenAI's vocabulary.
    ids = ClipTokenizer(77)("A person riding a motorcycle")
    assert list(ids[:7]) == [START_OF_TEXT, 320, 2533, 6765, 320, 10297, END_OF_TEXT]
    assert not ids[7:].any()
    assert END_OF_TEXT == ids.max(), "the end token must be the largest id (EOT pooling takes the argmax)"


def test_truncation_keeps_end_token():
    ids = ClipTokenizer(16)("word " * 100)
    assert ids.shape == (16,) and ids[0] == START_OF_TEXT and ids[-1] == END_OF_TEXT
    assert (ids[1:-1] != 0).all()


def test_truncates_counts_the_start_and_end_tokens():
    # "A person riding a motorcycle" is 5 BPE tokens (ids listed above): 7 with start and end.
    assert not ClipTokenizer(7).truncates("A person riding a motorcycle")
    assert ClipTokenizer(6).truncates("A person riding a motorcycle")


def test_batch_and_decode():
    tokenizer = ClipTokenizer(12)
    batch = tokenizer.batch(["a red circle", "a blue square"])
    assert batch.shape == (2, 12) and batch.dtype == np.int32
    assert tokenizer.decode(batch[0]) == "a red circle"
    with pytest.raises(ValueError, match="context_length"):
        ClipTokenizer(1)


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    """A small SentencePiece model trained here on captions (no download)."""
    sentencepiece = pytest.importorskip("sentencepiece")
    directory = tmp_path_factory.mktemp("spm")
    corpus = directory / "corpus.txt"
    words = ["red", "blue", "green", "circle", "square", "star", "left", "of", "a", "the", "above", "large", "small"]
    rng = np.random.default_rng(0)
    corpus.write_text("\n".join(" ".join(rng.choice(words, size=8)) for _ in range(500)))
    prefix = directory / "captions"
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=32, model_type="unigram", minloglevel=2
    )
    return str(prefix) + ".model"


def test_sentencepiece_option(sentencepiece_model):
    import sentencepiece

    from jclip.data.tokenizer import SentencePieceTokenizer, make_tokenizer

    reference = sentencepiece.SentencePieceProcessor(model_file=sentencepiece_model)
    tokenizer = make_tokenizer(f"sentencepiece:{sentencepiece_model}", 12)
    assert isinstance(tokenizer, SentencePieceTokenizer)
    assert tokenizer.vocab_size == reference.get_piece_size() + 1
    text = "a  red circle left of the large blue square"
    ids = tokenizer(text)
    end = reference.get_piece_size()
    expected = (reference.encode("a red circle left of the large blue square") + [end])[:12]
    expected[-1] = end
    np.testing.assert_array_equal(ids, expected + [0] * (12 - len(expected)))
    assert ids.max() == tokenizer.end_of_text, "the end token must be the largest id (EOT pooling)"
    long_ids = tokenizer("red " * 50)
    assert long_ids[-1] == tokenizer.end_of_text and (long_ids[:-1] != 0).all()
    assert tokenizer.decode(tokenizer("red circle")) == "red circle"
    assert make_tokenizer(f"sentencepiece:{sentencepiece_model}:lower", 12)("RED")[0] == reference.encode("red")[0]
    with pytest.raises(ValueError, match="unknown tokenizer"):
        make_tokenizer("wordpiece:x", 12)


def test_sentencepiece_vocabulary_must_fit_the_model(sentencepiece_model):
    from configs import clip
    from jclip.config_validation import validate_config
    from jclip.errors import ConfigError

    config = clip.get_config()
    config.model.text.tokenizer = f"sentencepiece:{sentencepiece_model}"
    validate_config(config)  # 33 ids fit the default 49,408-token embedding
    config.model.text.vocab_size = 20
    with pytest.raises(ConfigError, match="has 33 ids"):
        validate_config(config)
