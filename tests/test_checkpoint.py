"""Checkpoints: a state saved on one mesh restores, value for value, onto a differently shaped mesh."""

from __future__ import annotations

import jax
import numpy as np

from jclip import checkpoint, parallel
from jclip.build import TrainSetup
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
