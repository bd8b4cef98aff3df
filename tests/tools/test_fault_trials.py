"""jclip.tools.fault_trials' report over several trials (the kill trials themselves run in
tests/faults/test_kill_trials.py): its totals and kills by kind, counted here by hand from made-up trials."""

from __future__ import annotations

import signal

from jclip.tools.fault_trials import Kill, Report, Settings, Timings, Trial

KILLED = -signal.SIGKILL


def two_trials() -> list[Trial]:
    clean = Trial(0, kills=[Kill("step", 5, True, hit=["step"]), Kill("save", 12, True, hit=["save"]),
                            Kill("eval", 20, True, hit=["eval"])],
                  exit_codes=[KILLED, KILLED, KILLED, 0], started_at=[0, 0, 10, 20], steps_redone=4)
    # The second trial's save kill hit a step instead, its eval kill never fired (the run ended first), and it
    # lost two steps and a checked checkpoint.
    damaged = Trial(1, kills=[Kill("step", 3, True, hit=["step"]), Kill("save", 9, True, hit=["step"]),
                              Kill("eval", 30, False)],
                    exit_codes=[KILLED, KILLED, 0], started_at=[0, 0, 5], steps_lost=[7, 8], checkpoints_lost=[5],
                    steps_redone=1, bad_metrics_lines=1)
    return [clean, damaged]


def test_the_totals_and_kinds_add_up_over_the_trials(tmp_path):
    report = Report(Settings(workdir=tmp_path, trials=2), 10.0, Timings(0.1, 0.2, {}), two_trials(), 99.0)
    assert report.kills_by_kind() == {
        "step": {"aimed": 2, "injected": 2, "landed": 2, "hit": {"step": 2}},
        "save": {"aimed": 2, "injected": 2, "landed": 1, "hit": {"save": 1, "step": 1}},
        "eval": {"aimed": 2, "injected": 1, "landed": 1, "hit": {"eval": 1}},
    }
    written = report.to_json()
    assert [written[key] for key in ("trials", "reruns", "resumes", "steps_lost", "steps_differ", "steps_redone",
                                     "bad_metrics_lines", "checkpoints_lost")] == [2, 5, 3, 2, 0, 5, 1, 1]
    # The second trial's runs did end as expected (killed twice, then finished), but it lost steps: FAIL.
    assert written["runs_ok"] is True and written["ok"] is False and report.table().endswith("FAIL")
    assert Report(report.settings, 10.0, report.timings, two_trials()[:1], 40.0).table().endswith("PASS")
