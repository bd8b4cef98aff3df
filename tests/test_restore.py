"""jclip.restore: a reader of a finished run (teacher, init_from, evaluate, convert) skips a damaged newest step,
names it on stderr and moves nothing; an explicitly chosen damaged step is a one-line ConfigError."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jclip import checkpoint, parallel, restore
from jclip.build import TrainSetup
from jclip.errors import ConfigError
from jclip_testing import micro_config


def test_a_damaged_newest_step_is_skipped_and_named(tmp_path, capsys):
    config = micro_config()
    mesh = parallel.make_mesh({"data": 8})
    state = TrainSetup.create(config, mesh).init_state()
    manager = checkpoint.Checkpointer(tmp_path / "checkpoints", keep=5, async_save=False)  # checked: manifests
    manager.save(1, state, None, config)
    manager.save(2, state, None, config)
    manager.close()
    largest = max((tmp_path / "checkpoints" / "2" / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[:10])

    _, params, _ = restore.restore_run(str(tmp_path), None, config, mesh)
    for got, want in zip(jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(jax.device_get(state["params"]))):
        np.testing.assert_array_equal(got, want)
    warning = capsys.readouterr().err
    assert "step 2:" in warning and "bytes" in warning and "read step 1" in warning
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]  # nothing moved

    with pytest.raises(ConfigError, match="step 2: .*bytes"):
        restore.restore_run(str(tmp_path), 2, config, mesh)
