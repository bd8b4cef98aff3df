"""Recaptions folders: one caption per example key, looked up exactly; broken folders fail naming the command."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from jclip.data import recaptions

CAPTIONS = {"000010123": "A dog runs on wet sand. Waves break behind it.", "000010007": "A red bus.",
            "jclip_scenes/small:train:3": "Trois cubes.", "dir/ü": "Ein Hund."}


def test_round_trip_by_key(tmp_path):
    directory = recaptions.write_recaptions(tmp_path / "r", CAPTIONS, field="long_caption", source={"source": "x"},
                                            extra_meta={"report": {"joined": 4}})
    store = recaptions.Recaptions(directory)
    assert len(store) == 4 and store.field == "long_caption"
    for key, caption in CAPTIONS.items():
        assert store.caption(key) == caption
    for absent in ("00001012", "000010123 ", "dir/u", ""):
        assert store.caption(absent) is None
    assert list(store.keys) == sorted(CAPTIONS)
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["counts"] == {"keys": 4} and meta["source"] == {"source": "x"} and meta["report"] == {"joined": 4}
    again = pickle.loads(pickle.dumps(store))
    assert again.caption("000010007") == "A red bus."


def test_bad_captions_are_refused_when_writing(tmp_path):
    with pytest.raises(ValueError, match="caption of key 'k' must be a non-blank str"):
        recaptions.write_recaptions(tmp_path / "r", {"k": "  "})
    with pytest.raises(ValueError, match="a key must be a non-empty str"):
        recaptions.write_recaptions(tmp_path / "r", {"": "x"})
    with pytest.raises(ValueError, match="field must be an identifier"):
        recaptions.write_recaptions(tmp_path / "r", {"k": "x"}, field="dense caption")


def test_missing_or_broken_folders_name_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="recaptions: no folder .*absent; make it with python -m jclip.join_captions"):
        recaptions.Recaptions(tmp_path / "absent")
    directory = recaptions.write_recaptions(tmp_path / "r", CAPTIONS)
    (directory / "meta.json").write_text('{"format": 1}')
    with pytest.raises(ValueError, match="is not a recaptions meta file .*python -m jclip.join_captions"):
        recaptions.Recaptions(directory)
    directory = recaptions.write_recaptions(tmp_path / "s", CAPTIONS)
    np.save(directory / "captions_bounds.npy", np.array([0, 3], np.int64))
    np.save(directory / "captions_utf8.npy", np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="1 captions for 4 keys"):
        recaptions.Recaptions(directory)
