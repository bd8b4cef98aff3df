"""SIGKILL at seeded random moments, rerun after each kill (jclip.tools.fault_trials): killed in a train step, in an
asynchronous checkpoint save and in an evaluation, a micro run finishes with the uninterrupted run's loss at every
step, and no checkpoint that had been checked is lost."""

from __future__ import annotations

import json
import signal

import pytest

from jclip.tools import fault_trials
from jclip_testing import read_losses


@pytest.mark.slow
def test_a_trial_killed_in_a_step_a_save_and_an_evaluation_ends_with_the_reference_losses(tmp_path, scenes_data_dir):
    settings = fault_trials.Settings(workdir=tmp_path, trials=1, kills=3, seed=0, steps=60, data_dir=scenes_data_dir)
    report = fault_trials.run_trials(settings, log=lambda line: None)
    table = report.table()

    kills = report.kills_by_kind()
    assert {kind: (row["aimed"], row["injected"]) for kind, row in kills.items()} == {
        "step": (1, 1), "save": (1, 1), "eval": (1, 1)}, table
    reference = read_losses(tmp_path / "reference")
    assert sorted(reference) == list(range(1, 61))
    for trial in report.trials:
        assert [kill.kind for kill in trial.kills] == ["step", "save", "eval"], table
        assert trial.exit_codes == [-signal.SIGKILL] * 3 + [0], table  # each killed run died of its kill
        assert read_losses(tmp_path / f"trial_{trial.index}") == reference, table  # every step, bit for bit
        assert (trial.steps_lost, trial.steps_differ, trial.checkpoints_lost) == ([], [], []), table
        assert trial.bad_metrics_lines == 0, table
    written = json.loads((tmp_path / "fault_trials.json").read_text())
    totals = [written[key] for key in ("trials", "steps_lost", "steps_differ", "checkpoints_lost")]
    assert totals == [1, 0, 0, 0]
    assert written["ok"] is True and table.endswith("PASS")
