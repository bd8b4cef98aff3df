"""Each file of a checkpoint step damaged in turn (jclip/checkpoint.py, README Failure handling): restore either
falls back to the previous step, naming the file, or, where the damage cannot matter, reads the newest step's
exact values; never wrong values, never an exception. A step whose save was checked has a manifest, and every
file of it is then caught by name; a step without one (its save not yet checked) relies on Orbax's own reads."""

from __future__ import annotations

import pathlib
import shutil

import grain
import jax
import numpy as np
import pytest

from jclip import checkpoint, parallel
from jclip.build import TrainSetup
from jclip_testing import micro_config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Steps 1 and 2 (other values: every leaf + 1) with a data-iterator state and counters, both checked."""
    directory = tmp_path_factory.mktemp("pristine") / "checkpoints"
    config = micro_config()
    setup = TrainSetup.create(config, parallel.make_mesh({"data": 8}))
    state_1 = setup.init_state()
    state_2 = jax.tree.map(lambda leaf: leaf + 1, state_1)
    iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
    manager = checkpoint.Checkpointer(directory, keep=5)
    for step, state in ((1, state_1), (2, state_2)):
        next(iterator)
        manager.save(step, state, iterator, config, counters={"process_0": {"seen": step}})
    manager.finish()
    manager.close()
    files = sorted(checkpoint.file_sizes(directory / "2"))
    return directory, setup, jax.device_get(state_1), jax.device_get(state_2), files


def _damage(path: pathlib.Path) -> None:
    """Half the bytes of a file, or the file gone where it has at most one byte."""
    size = path.stat().st_size
    if size <= 1:
        path.unlink()
    else:
        with open(path, "r+b") as file:
            file.truncate(size // 2)


def _restore(directory: pathlib.Path, setup: TrainSetup):
    manager = checkpoint.Checkpointer(directory, keep=5)
    try:
        iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
        step, state, counters = manager.restore_newest(setup.abstract_state(), iterator)
        return step, jax.device_get(state), counters, next(iterator)
    finally:
        manager.close()


def _equal(got, want) -> bool:
    return all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


@pytest.mark.parametrize("checked", [True, False], ids=["with_manifest", "unchecked"])
def test_each_damaged_file_falls_back_or_reads_exact_values(saved, tmp_path, capsys, checked):
    pristine, setup, state_1, state_2, files = saved
    assert checkpoint.MANIFEST in files and any(name.startswith("data/") for name in files)
    outcomes = {}
    for index, name in enumerate(files):
        if not checked and name == checkpoint.MANIFEST:
            continue
        directory = tmp_path / str(index)
        shutil.copytree(pristine, directory)
        if not checked:
            (directory / "2" / checkpoint.MANIFEST).unlink()
        _damage(directory / "2" / name)
        step, state, counters, next_example = _restore(directory, setup)
        warning = capsys.readouterr().err
        if step == 1:
            assert _equal(state, state_1), name
            assert counters == {"seen": 1} and next_example == 1, name
            assert "the checkpoint of step 2" in warning and "resuming from step 1" in warning, name
            assert [p.name for p in directory.iterdir() if p.name.startswith("2.damaged-")], name
            if checked:
                assert name in warning, warning
        else:
            assert step == 2 and _equal(state, state_2), name
            assert counters == {"seen": 2} and next_example == 2, name
        outcomes[name] = step
    if checked:  # the manifest names every file: each damage is caught before Orbax reads anything
        assert set(outcomes.values()) == {1}, outcomes
    else:  # without one, Orbax's reads must still catch the files that hold the values and the positions (the
        # per-process OCDBT files under state/ocdbt.process_0/ may be superseded by the merged state/d/ ones)
        read = [name for name in outcomes if name.startswith(("state/d/", "data/process_")) or name in (
            "_CHECKPOINT_METADATA", "config/metadata", "counters/metadata", "state/_METADATA", "state/manifest.ocdbt")]
        assert len(read) >= 7 and all(outcomes[name] == 1 for name in read), outcomes
