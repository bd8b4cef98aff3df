"""Packed UTF-8 texts: round trip, exact look-up by sorted text, and folder errors that name what makes them."""

from __future__ import annotations

import numpy as np
import pytest

from jclip.data import packed_texts


def test_pack_round_trip_and_look_up_in_sorted_texts(tmp_path):
    texts = sorted(["", "a", "ab", "b", "é", "日本", "zebra crossing"])
    data, bounds = packed_texts.pack_texts(texts)
    assert data.dtype == np.uint8 and bounds.tolist()[:3] == [0, 0, 1]
    folder = packed_texts.write_folder(tmp_path / "f", {"keys_utf8": data, "keys_bounds": bounds}, {"format": 1})
    stored = packed_texts.StoredFolder(folder, "test texts", "make it")
    packed = stored.texts("keys")
    assert list(packed) == texts and packed[-1] == "日本" and packed[1:3] == ["a", "ab"]
    for index, text in enumerate(texts):
        assert packed_texts.sorted_row(packed, text) == index
    for absent in ("aa", "c", "日", "\udcff", "zebra"):
        assert packed_texts.sorted_row(packed, absent) is None


def test_folder_errors_name_the_folder_kind_and_the_command(tmp_path):
    folder = packed_texts.StoredFolder(tmp_path / "absent", "recaptions", "python -m make")
    with pytest.raises(FileNotFoundError, match="recaptions: no folder .*absent; make it with python -m make"):
        folder.meta_path()
    data, bounds = packed_texts.pack_texts(["x", "y"])
    packed_texts.write_folder(tmp_path / "f", {"keys_utf8": data, "keys_bounds": bounds[:-1] + 0}, {})
    folder = packed_texts.StoredFolder(tmp_path / "f", "recaptions", "python -m make")
    with pytest.raises(ValueError, match=r"recaptions: .*keys_bounds.npy is corrupt .*remake the folder with python -m make"):
        folder.texts("keys")
    with pytest.raises(FileNotFoundError, match="no values_utf8.npy"):
        folder.texts("values")
