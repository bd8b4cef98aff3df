"""Hard-negative candidate pools (jclip.data.negative_pools): written from generator results, read back by
exact caption text with the same candidates; unknown captions, broken folders and bad input are refused."""

from __future__ import annotations

import dataclasses
import json
import pickle

import numpy as np
import pytest

from jclip.data import negative_pools


@dataclasses.dataclass(frozen=True)
class Result:
    """The shape of one generator result (jclip.data.negatives.CaptionNegatives)."""

    caption: str
    pools: dict
    problem: str | None = None


RESULTS = [
    Result("a red cube left of a blue ball", {"swap": ("a blue cube left of a red ball", "a red ball left of a blue cube"),
                                              "replace": ("a red cube right of a blue ball",),
                                              "shuffle": ("left of a red cube a blue ball",)}),
    Result("Zebra café — naïve 東京", {"swap": (), "replace": ("Zebra bar — naïve 東京",), "shuffle": ()}),
    Result("two dogs", {"swap": (), "replace": (), "shuffle": ()}, problem="too short"),
    Result("an apple on a table", {"swap": ("a table on an apple",), "replace": (), "shuffle": ("on a table an apple",)}),
]


def write(directory, results=RESULTS, **kwargs):
    return negative_pools.write_pools(directory, results, backend="fake", seed=7, source="embedded", **kwargs)


def test_round_trip_gives_each_captions_exact_candidates(tmp_path):
    pools = negative_pools.NegativePools(write(tmp_path / "p"))
    assert len(pools) == 4 and pools.kinds == ("swap", "replace", "shuffle")
    for result in RESULTS:
        assert pools.lookup(result.caption) == {kind: tuple(result.pools[kind]) for kind in pools.kinds}
    # Stored sorted (code-point order), as the binary search needs.
    assert list(pools.captions) == sorted(r.caption for r in RESULTS)
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    assert meta["backend"] == "fake" and meta["seed"] == 7 and meta["source"] == "embedded"
    assert meta["counts"] == {"captions": 4, "swap": 3, "replace": 2, "shuffle": 2}
    assert meta["coverage"] == {"swap": 0.5, "replace": 0.5, "shuffle": 0.5, "any": 0.75, "all": 0.25}
    assert meta["problems"] == {"too short": 1}
    assert pools.meta == meta


def test_arrays_are_memory_mapped_and_pickle_as_their_path(tmp_path):
    pools = negative_pools.NegativePools(write(tmp_path / "p"))
    assert isinstance(pools.captions.data.base, np.memmap), "a view of the memory map, not a copy"
    clone = pickle.loads(pickle.dumps(pools))  # a Grain worker process
    assert clone.lookup("two dogs") == {"swap": (), "replace": (), "shuffle": ()}
    assert len(pickle.dumps(pools)) < 1000


def test_unknown_and_near_miss_captions_are_not_found(tmp_path):
    pools = negative_pools.NegativePools(write(tmp_path / "p"))
    for caption in ("", "two dog", "two dogs ", "Two dogs", "zzz", "a"):
        assert pools.lookup(caption) is None and pools.row(caption) is None
    error = pools.missing("two dog")
    assert "'two dog' is not in the negative pools" in str(error) and "python -m jclip.make_negatives" in str(error)


def test_a_missing_or_broken_folder_names_the_file_and_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no folder .*absent; make it with python -m jclip.make_negatives"):
        negative_pools.NegativePools(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no meta.json in .*empty; make the folder with python -m jclip.make_negatives"):
        negative_pools.NegativePools(tmp_path / "empty")
    directory = write(tmp_path / "p")
    (directory / "replace_offsets.npy").unlink()
    with pytest.raises(FileNotFoundError, match="no replace_offsets.npy in .*remake the folder with python -m jclip.make_negatives"):
        negative_pools.NegativePools(directory)
    directory = write(tmp_path / "q")
    np.save(directory / "swap_offsets.npy", np.array([0, 1, 2], np.int64))
    with pytest.raises(ValueError, match=r"swap_offsets.npy is corrupt"):
        negative_pools.NegativePools(directory)
    directory = write(tmp_path / "r")
    (directory / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json is not a pools meta file"):
        negative_pools.NegativePools(directory)


@pytest.mark.parametrize("results, message", [
    ([Result("a", {"swap": ()}), Result("a", {"swap": ()})], "appears twice"),
    ([Result("", {"swap": ()})], "non-empty str"),
])
def test_bad_results_are_refused(tmp_path, results, message):
    with pytest.raises(ValueError, match=message):
        write(tmp_path / "p", results)


def test_a_kind_outside_the_named_kinds_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"kinds \['replace', 'swap'\] that are not among \['shuffle'\]"):
        write(tmp_path / "p", RESULTS[:1], kinds=("shuffle",))


def test_candidates_are_a_lazy_view_of_one_captions_candidates(tmp_path):
    pools = negative_pools.NegativePools(write(tmp_path / "p"))
    row = pools.row("a red cube left of a blue ball")
    swap = pools.candidates(row, "swap")
    assert len(swap) == 2 and swap[-1] == "a red ball left of a blue cube" and list(swap) == list(RESULTS[0].pools["swap"])
    with pytest.raises(IndexError):
        swap[2]
    assert pools.row("\ud800") is None  # a lone surrogate cannot be stored, so it is never found


def test_rewriting_a_folder_replaces_its_pools(tmp_path):
    write(tmp_path / "p")
    write(tmp_path / "p", [Result("two dogs", {"replace": ("two cats",)})])
    pools = negative_pools.NegativePools(tmp_path / "p")
    assert pools.kinds == ("replace",) and pools.lookup("two dogs") == {"replace": ("two cats",)}
    assert pools.lookup("an apple on a table") is None
