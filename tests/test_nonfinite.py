"""Non-finite steps (jclip.nonfinite, jclip.step): the guard's decisions and message, and end to end with real
NaNs, no test hook: learning rate 1e9 blows the micro model up for good after a few steps (halt: exit 5, one
message, nothing non-finite saved); NaN rows in SoftCLIP's precomputed guidance features (a corrupt feature
file) make some batches' loss NaN (skip: those updates are dropped and counted, too many halt, and the count
survives a resume)."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jclip.nonfinite import EXIT_CODE, SHOWN_KEYS, NonfiniteGuard, NonfiniteHalt
from jclip_testing import REPO_ROOT, checkpoint_steps, micro_run_flags

BAD = {"loss/clip": np.float32(np.nan), "loss/total": np.float32(np.nan), "train/grad_norm": np.float32(np.inf),
       "train/learning_rate": np.float32(0.5), "train/nonfinite": np.int32(1)}
GOOD = {**BAD, "loss/clip": 1.0, "loss/total": 1.0, "train/grad_norm": 2.0, "train/nonfinite": np.int32(0)}


def guard(policy="skip", max_skips=2, window=10, state=None):
    return NonfiniteGuard.from_config({"policy": policy, "max_skips": max_skips, "window": window}, state)


def test_halt_stops_at_the_first_non_finite_step_with_step_losses_grad_norm_and_keys():
    halting = guard("halt")
    halting.observe(3, GOOD, ["a"])
    with pytest.raises(NonfiniteHalt) as error:
        halting.observe(4, BAD, ["scene:1", "scene:2"])
    message = str(error.value)
    assert error.value.step == 4
    for part in ("non-finite step 4", "nonfinite.policy='halt'", "loss/clip nan", "loss/total nan",
                 "gradient norm inf", "learning rate 0.5", "2 on this process: scene:1, scene:2",
                 "The update of step 4 was not applied"):
        assert part in message, (part, message)
    with pytest.raises(NonfiniteHalt) as error:  # a long batch shows the first keys and how many more
        guard("halt").observe(1, BAD, [f"k{i}" for i in range(SHOWN_KEYS + 5)])
    assert f"k{SHOWN_KEYS - 1}, ... (5 more)" in str(error.value) and f"k{SHOWN_KEYS}," not in str(error.value)


def test_skip_halts_after_more_than_max_skips_within_the_window_and_its_state_resumes_the_same():
    skipping = guard(max_skips=2, window=10)
    for step in (1, 2, 13, 14):  # 1 and 2 leave the window (steps 4..13) before the skip at 13
        skipping.observe(step, BAD)
    skipping.observe(14, GOOD)  # a finite step changes nothing
    assert skipping.metrics() == {"nonfinite/skipped": 4} and skipping.recent == [13, 14]
    resumed = guard(max_skips=2, window=10, state=json.loads(json.dumps(skipping.state())))
    for decided in (skipping, resumed):
        with pytest.raises(NonfiniteHalt, match=r"3 updates skipped within the last 10 steps, more than "
                                                r"nonfinite.max_skips=2 \(steps 13, 14, 15\)"):
            decided.observe(15, BAD, ["x"])
    with pytest.raises(NonfiniteHalt):  # max_skips 0: the first non-finite step halts, as `halt` does
        guard(max_skips=0).observe(7, BAD)


def test_a_long_batch_has_all_its_keys_written_to_the_workdir(tmp_path):
    from jclip.paths import as_path
    from jclip.train import _keys_file

    keys = [f"shard-{i:05d}" for i in range(SHOWN_KEYS + 1)]
    with pytest.raises(NonfiniteHalt) as error:
        guard("halt").observe(9, BAD, keys)
    halt = _keys_file(error.value, as_path(tmp_path))
    path = tmp_path / "nonfinite_step_9_keys.txt"
    assert str(halt).endswith(f"All {SHOWN_KEYS + 1} keys: {path}") and halt.step == 9
    assert path.read_text().splitlines() == keys
    short = NonfiniteHalt("message", 3, keys[:2])
    assert _keys_file(short, as_path(tmp_path)) is short  # the message shows them all: no file


# End to end: micro runs (learning rate 1e9 unless a test sets it).


def run_main(workdir, data_dir, config="configs/clip.py", **overrides):
    flags = micro_run_flags(data_dir, **{"optim.learning_rate": 1e9, "keep_checkpoints": 20, **overrides})
    command = [sys.executable, "-m", "jclip.main", f"--config={config}", f"--workdir={workdir}",
               f"--status_file={workdir.parent / (workdir.name + '.status.json')}", *flags]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


def checkpointed_states(workdir) -> dict[int, dict]:
    checkpointer = ocp.StandardCheckpointer()
    states = {step: jax.device_get(checkpointer.restore(workdir / "checkpoints" / str(step) / "state"))
              for step in checkpoint_steps(workdir)}
    checkpointer.close()
    return states


def assert_all_finite(states):
    for step, state in states.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
            assert np.all(np.isfinite(leaf)), f"checkpoint {step}: {jax.tree_util.keystr(path)} is not finite"


def metrics_by_step(workdir) -> dict[int, dict]:
    """step -> every value metrics.jsonl holds for it (a later line's values win, as after a resume)."""
    steps: dict[int, dict] = {}
    for record in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()):
        steps.setdefault(record["step"], {}).update(record)
    return steps


def test_halt_exits_5_with_one_message_and_saves_nothing_non_finite(tmp_path, scenes_data_dir):
    """Flags are read one step late between saves: step 4's flag is read while step 5 runs, before its save."""
    workdir = tmp_path / "run"
    result = run_main(workdir, scenes_data_dir, **{"total_steps": 8, "checkpoint_every": 3,
                                  "log_every": 3})
    assert result.returncode == EXIT_CODE, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "Traceback" not in output and "FloatingPointError" not in output
    [line] = [line for line in result.stderr.splitlines() if line.startswith("jclip: stopped:")]
    halted = int(line.split("non-finite step ")[1].split()[0])
    assert halted == 4, line  # the first NaN of this set-up (steps 1-3 are finite)
    for part in ("loss/clip nan", "loss/total nan", "gradient norm nan", "Batch example keys: 16 on this process: "
                 "jclip_scenes/small:train:", "nothing of it was saved"):
        assert part in line, (part, line)
    assert checkpoint_steps(workdir) == [3]
    assert_all_finite(checkpointed_states(workdir))
    assert json.loads((tmp_path / "run.status.json").read_text()) == {"state": "failed", "step": 4, "exit_code": 5}


@pytest.fixture
def corrupt_guidance(tmp_path):
    """SoftCLIP guidance features (guidance="batch") with NaN rows for every 40th training example, as a corrupt
    feature file would have them: the batches holding one of those examples have a NaN loss, the others train."""
    from jclip.data.ops.guidance import write_guidance_features

    rng = np.random.default_rng(0)
    image, text = rng.normal(size=(2, 4096, 8)).astype(np.float32)
    image[::40] = np.nan
    keys = [f"jclip_scenes/small:train:{index}" for index in range(4096)]
    return write_guidance_features(tmp_path / "guidance", keys, image=image, text=text)


def test_skip_drops_and_counts_updates_halts_after_max_skips_and_the_count_survives_resume(
        tmp_path, scenes_data_dir, corrupt_guidance):
    flags = {"config": "configs/softclip.py", "losses.softclip.guidance": "batch",
             "data.guidance_features": corrupt_guidance, "optim.learning_rate": 1e-3, "total_steps": 8,
             "checkpoint_every": 2, "nonfinite.policy": "skip", "nonfinite.max_skips": 1}
    workdir = tmp_path / "run"
    halted = run_main(workdir, scenes_data_dir, **flags)
    # The batches of steps 4 and 5 hold a corrupt example (the seeded order): step 4's update is skipped, and
    # step 5's is one more than nonfinite.max_skips allows.
    assert halted.returncode == EXIT_CODE, halted.stderr[-3000:]
    [line] = [line for line in halted.stderr.splitlines() if line.startswith("jclip: stopped:")]
    assert line.startswith("jclip: stopped: non-finite step 5 (2 updates skipped within the last 1000 steps, more "
                           "than nonfinite.max_skips=1 (steps 4, 5)): loss/softclip nan, loss/total nan; gradient "
                           "norm nan"), line
    keys = line.split("16 on this process: ")[1].split(". Lower")[0].split(", ")
    assert any(int(key.rsplit(":", 1)[1]) % 40 == 0 for key in keys), "the corrupt example is among the keys"
    assert "Traceback" not in halted.stderr
    metrics = metrics_by_step(workdir)
    assert sorted(metrics) == [1, 2, 3, 4]
    assert [metrics[step]["train/nonfinite"] for step in (1, 2, 3, 4)] == [0, 0, 0, 1]
    assert [metrics[step]["nonfinite/skipped"] for step in (1, 2, 3, 4)] == [0, 0, 0, 1]
    assert np.isnan(metrics[4]["loss/total"]) and not np.isnan(metrics[3]["loss/total"])
    states = checkpointed_states(workdir)
    assert sorted(states) == [2, 4]
    assert_all_finite(states)
    assert int(states[4]["step"]) == 4  # the skip moved the data on, not the parameters
    for got, want in zip(jax.tree.leaves(states[4]["params"]), jax.tree.leaves(states[2]["params"])):
        assert np.any(got != want)  # step 3 trained

    # Rerun with room for more skips: it resumes at step 4 with the skip counted, skips step 5 (two in all)
    # and finishes, evaluations included.
    finished = run_main(workdir, scenes_data_dir, **{**flags, "nonfinite.max_skips": 10})
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "resumed from" in finished.stdout and "at step 4" in finished.stdout
    metrics = metrics_by_step(workdir)
    assert [metrics[step]["train/nonfinite"] for step in range(5, 9)] == [1, 0, 0, 0]
    assert [metrics[step]["nonfinite/skipped"] for step in range(5, 9)] == [2, 2, 2, 2]
    assert np.isnan(metrics[5]["loss/total"]) and all(np.isfinite(metrics[step]["loss/total"]) for step in (6, 7, 8))
    assert "eval/retrieval/image_to_text_R@1" in metrics[8]
    assert checkpoint_steps(workdir) == [2, 4, 6, 8]
    assert_all_finite(checkpointed_states(workdir))
