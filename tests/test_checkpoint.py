"""Checkpoints: a state saved on one mesh restores, value for value, onto a differently shaped mesh; every save is
checked before old steps are deleted; restore falls back past damaged steps and moves them aside."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jclip import checkpoint, parallel
from jclip.build import TrainSetup
from jclip.errors import NoIntactCheckpoint
from jclip_testing import micro_config


def test_restore_onto_a_different_mesh(tmp_path):
    config = micro_config()
    saved_mesh = parallel.make_mesh({"data": 8})
    saved_setup = TrainSetup.create(config, saved_mesh)
    state = saved_setup.init_state()
    expected = jax.device_get(state)

    writer = checkpoint.Checkpointer(tmp_path / "checkpoints", keep=2)
    writer.save(7, state, None, config)
    writer.close()

    new_mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    new_setup = TrainSetup.create(config, new_mesh)
    reader = checkpoint.Checkpointer(tmp_path / "checkpoints", keep=2)
    assert reader.latest_step() == 7
    restored = reader.restore(7, new_setup.abstract_state(), None)
    assert reader.restore_config(7)["data"]["batch_size"] == config.data.batch_size
    reader.close()

    for got, want in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(got, want)
    # The restored arrays live on the new mesh with the new layout (fsdp/tensor splits of the weights).
    shardings = [leaf.sharding for leaf in jax.tree.leaves(restored)]
    assert all(s.mesh.shape == new_mesh.shape for s in shardings)
    specs = {str(s.spec) for s in jax.tree.leaves(restored["params"]) for s in [s.sharding]}
    assert any("fsdp" in spec for spec in specs) and any("tensor" in spec for spec in specs)


def test_keeps_only_the_last_k(tmp_path):
    config = micro_config()
    mesh = parallel.make_mesh({"data": 8})
    state = TrainSetup.create(config, mesh).init_state()
    manager = checkpoint.Checkpointer(tmp_path / "checkpoints", keep=2)
    for step in (1, 2, 3):
        manager.save(step, state, None, config)
    manager.wait()
    assert manager.all_steps() == [2, 3]
    manager.close()


def test_has_checkpoints_counts_finished_steps_only(tmp_path):
    from jclip.checkpoint import has_checkpoints

    assert not has_checkpoints(tmp_path / "absent")
    (tmp_path / "3.orbax-checkpoint-tmp-1234").mkdir()  # an interrupted save
    assert not has_checkpoints(tmp_path)
    (tmp_path / "200").mkdir()
    assert has_checkpoints(tmp_path)


def _saved_steps(directory, steps, keep=5):
    config = micro_config()
    state = TrainSetup.create(config, parallel.make_mesh({"data": 8})).init_state()
    manager = checkpoint.Checkpointer(directory, keep=keep)
    for step in steps:
        manager.save(step, state, None, config)
    manager.close()  # closes without checking the last save (finish checks it)
    return config, state


def _truncate_array_files(step_dir):
    """Truncates every array data file of a step (OCDBT's `d/` files). Not only the largest: in a model this small
    it may be a per-process index file that the merged index no longer reads, and the step would restore."""
    for path in (step_dir / "state").rglob("d/*"):
        if path.is_file():
            with open(path, "r+b") as file:
                file.truncate(100)


def test_each_save_is_checked_and_gets_a_manifest(tmp_path):
    config = micro_config()
    state = TrainSetup.create(config, parallel.make_mesh({"data": 8})).init_state()
    manager = checkpoint.Checkpointer(tmp_path, keep=1)
    manager.save(1, state, None, config)
    manager.save(2, state, None, config)  # checks 1 first, deletes nothing yet: 2 is not checked
    assert manager.all_steps() == [1, 2]
    manager.finish()  # checks 2, then keeps 1 step
    assert manager.all_steps() == [2]
    assert (tmp_path / "2" / checkpoint.MANIFEST).is_file()
    manager.close()
    assert checkpoint.check_manifest(tmp_path / "2") is None
    metadata = tmp_path / "2" / "state" / "_METADATA"
    text = metadata.read_text()
    metadata.write_text(text.replace("opt_state", "opt_stat_", 1))  # the same size, other bytes
    assert checkpoint.check_manifest(tmp_path / "2") == "state/_METADATA changed since it was saved (its SHA-256 differs)"
    metadata.write_text(text[:100])
    assert checkpoint.check_manifest(tmp_path / "2") == f"state/_METADATA has 100 bytes, {len(text)} when it was saved"


def test_restore_falls_back_to_the_newest_intact_step_and_moves_the_damaged_aside(tmp_path, capsys):
    config, state = _saved_steps(tmp_path, (1, 2))
    (tmp_path / "2" / checkpoint.MANIFEST).unlink(missing_ok=True)  # no manifest: Orbax's own read fails
    _truncate_array_files(tmp_path / "2")
    setup = TrainSetup.create(config, parallel.make_mesh({"data": 8}))
    manager = checkpoint.Checkpointer(tmp_path, keep=5)
    step, restored, counters = manager.restore_newest(setup.abstract_state(), None)
    assert step == 1 and counters is None
    for got, want in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(jax.device_get(state))):
        np.testing.assert_array_equal(got, want)
    assert manager.all_steps() == [1]
    manager.close()
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith("2.damaged-")]
    assert (aside / "state").is_dir()  # moved, not deleted
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and "the checkpoint of step 2" in warning and "resuming from step 1" in warning
    assert "OUT_OF_RANGE" in warning  # Orbax's reason, in one line


def test_no_intact_step_lists_each_and_moves_nothing(tmp_path):
    config, _ = _saved_steps(tmp_path, (1, 2))
    (tmp_path / "2" / "_CHECKPOINT_METADATA").write_text("{")
    (tmp_path / "1" / "config" / "metadata").unlink()
    setup = TrainSetup.create(config, parallel.make_mesh({"data": 8}))
    manager = checkpoint.Checkpointer(tmp_path, keep=5)
    with pytest.raises(NoIntactCheckpoint) as raised:
        manager.restore_newest(setup.abstract_state(), None)
    manager.close()
    message = str(raised.value)
    assert "\n" not in message
    assert "step 2: _CHECKPOINT_METADATA" in message and "step 1: config/metadata is missing" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]


def test_remove_unfinished(tmp_path):
    (tmp_path / "4.orbax-checkpoint-tmp").mkdir()
    (tmp_path / "4.orbax-checkpoint-tmp" / "x").write_text("partial")
    (tmp_path / "2").mkdir()
    assert checkpoint.remove_unfinished(tmp_path) == ["4.orbax-checkpoint-tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2"]
    assert checkpoint.remove_unfinished(tmp_path / "absent") == []


def test_in_a_bucket_each_save_is_checked_and_a_damaged_step_is_moved_aside(gcs, capsys):
    """The same checks on Cloud Storage (the emulator), where Orbax writes through TensorStore and jclip lists
    and renames through gcsfs: the manifest is written, a shortened array file is caught, and restore goes
    back to the intact step and keeps the damaged one, renamed, in the bucket."""
    from etils import epath
    from gcs_emulator import BUCKET

    directory = f"gs://{BUCKET}/damaged-run/checkpoints"
    config = micro_config()
    state = TrainSetup.create(config, parallel.make_mesh({"data": 8})).init_state()
    manager = checkpoint.Checkpointer(directory, keep=5)
    manager.save(1, state, None, config)
    manager.save(2, state, None, config)
    manager.finish()
    manager.close()
    step_2 = epath.Path(directory) / "2"
    assert checkpoint.check_manifest(step_2) is None and (step_2 / checkpoint.MANIFEST).exists()
    largest = max(checkpoint.file_sizes(step_2).items(), key=lambda item: item[1] if "/d/" in item[0] else -1)[0]
    (step_2 / largest).write_bytes((step_2 / largest).read_bytes()[:100])

    setup = TrainSetup.create(config, parallel.make_mesh({"data": 8}))
    manager = checkpoint.Checkpointer(directory, keep=5)
    step, restored, _ = manager.restore_newest(setup.abstract_state(), None)
    manager.close()
    assert step == 1
    for got, want in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(jax.device_get(state))):
        np.testing.assert_array_equal(got, want)
    names = sorted(p.name for p in epath.Path(directory).iterdir())
    assert names[0] == "1" and len(names) == 2 and names[1].startswith("2.damaged-"), names
    assert (epath.Path(directory) / names[1] / largest).exists()  # moved, not deleted
    warning = capsys.readouterr().err
    assert f"{largest} has 100 bytes" in warning and "resuming from step 1" in warning


def test_a_kill_while_the_manifest_is_written_leaves_a_step_checked_by_its_layout(tmp_path):
    """The manifest is renamed into place: a kill mid-write leaves only `jclip_manifest.json.partial`, which the
    checks ignore, so the step is judged by its layout instead of being moved aside for a half manifest."""
    config = micro_config()
    state = TrainSetup.create(config, parallel.make_mesh({"data": 8})).init_state()
    manager = checkpoint.Checkpointer(tmp_path, keep=2, async_save=False)
    manager.save(1, state, None, config)
    manager.close()
    manifest = tmp_path / "1" / checkpoint.MANIFEST
    assert manifest.is_file() and not (tmp_path / "1" / f"{checkpoint.MANIFEST}.partial").exists()
    text = manifest.read_text()
    manifest.unlink()
    (tmp_path / "1" / f"{checkpoint.MANIFEST}.partial").write_text(text[: len(text) // 2])
    assert checkpoint.inspect(tmp_path / "1", ("state", "config"), 1) is None
    manifest.write_text(text[: len(text) // 2])  # what a non-atomic write would have left
    assert "does not parse" in checkpoint.inspect(tmp_path / "1", ("state", "config"), 1)
